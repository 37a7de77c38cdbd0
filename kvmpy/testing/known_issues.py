"""Known bugs of real kernels, expected to fail until the kernel has the fix.

Capabilities decide what a test expects; a kernel BUG has no capability, so this table (as kernel
CI's known-issue lists do) names the test, the fix and the first release carrying it. Matching
tests on real KVM of an older kernel become non-strict xfails carrying the reason: they still run,
a failure is reported as XFAIL with the bug named, and a kernel with a backported fix shows XPASS.
The emulated KVM models fixed kernels and is never marked.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import platform
import re


@dataclasses.dataclass(frozen=True)
class KnownIssue:
    #: fnmatch pattern over the pytest node id (the backend suffix is added by the match).
    nodeid: str
    #: First mainline release with the fix.
    fixed_in: tuple[int, int]
    #: What goes wrong, and the fix (subject line or pull) to look for in a backport.
    reason: str


KNOWN_ISSUES: tuple[KnownIssue, ...] = (
    KnownIssue(
        nodeid="selftests/test_pre_fault_memory.py::test_pre_fault_memory[*",
        fixed_in=(6, 18),
        reason="KVM_PRE_FAULT_MEMORY deadlocks with a concurrent memslot deletion until a signal "
               "arrives; fixed by 'KVM: x86/mmu: Return -EAGAIN if userspace deletes/moves "
               "memslot during prefault' (KVM x86 MMU changes for 6.18)",
    ),
)


def kernel_version(release: str | None = None) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", release or platform.release())
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def known_issue(nodeid: str, backend: str, release: str | None = None) -> KnownIssue | None:
    """The known kernel bug expected to make ``nodeid`` fail on ``backend``, if any."""
    if backend != "kvm":
        return None
    version = kernel_version(release)
    for issue in KNOWN_ISSUES:
        if version < issue.fixed_in and fnmatch.fnmatchcase(nodeid, issue.nodeid):
            return issue
    return None
