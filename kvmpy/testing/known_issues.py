"""Known bugs of real kernels, expected to fail until the kernel has the fix.

Capabilities decide what a test expects; a kernel BUG has no capability, so this table (as kernel
CI's known-issue lists do) names the test, the fix and the first release carrying it. Matching
tests on real KVM of an older kernel become non-strict xfails carrying the reason: they still run,
a failure is reported as XFAIL with the bug named, and a kernel with a backported fix shows XPASS.
The emulated KVM models fixed kernels and is never marked.

:data:`OPEN_ISSUES` are bugs with no fix yet: they name the kernels they were seen on and apply
to real KVM of every version (a fixed kernel shows XPASS); their tests mark themselves with
:func:`xfail_open_issue`. ci/compare-results reads both tables, so a case that is a known kernel
bug on the real side is reported as such rather than as a disagreement with the emulator.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import platform
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pytest

    from ..system import Kvm


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
    KnownIssue(
        nodeid="selftests/test_memslots_vcpu.py::test_mmio_during_vectoring*",
        fixed_in=(6, 14),
        reason="an event whose IDT lies in MMIO is re-delivered forever instead of exiting "
               "(seen on 6.12.117: the guest never exits); 6.14 added X86EMUL_UNHANDLEABLE_"
               "VECTORING and kvm_prepare_event_vectoring_exit() ('KVM: SVM: Handle vectoring "
               "error in check_emulate_instruction', with set_memory_region_test's "
               "test_mmio_during_vectoring)",
    ),
)


@dataclasses.dataclass(frozen=True)
class OpenIssue:
    #: fnmatch pattern over the pytest node id.
    nodeid: str
    #: Kernel releases (uname -r) where real KVM was seen to fail this way.
    seen_in: tuple[str, ...]
    #: What goes wrong and where (docs/findings.md has the code path and a C reproducer).
    reason: str
    #: Where the analysis and the upstream-style reproducer live.
    details: str = "docs/findings.md"


OPEN_ISSUES: tuple[OpenIssue, ...] = (
    OpenIssue(
        # The cases of selftests/test_known_issue_mmio_spte.py with a first MMIO read.
        nodeid="selftests/test_known_issue_mmio_spte.py" "::test_private_*_after_mmio*",
        seen_in=("6.12.117", "7.3.4"),
        reason="stale MMIO SPTE: on a KVM_X86_SW_PROTECTED_VM an MMIO SPTE cached by an access "
               "to a gfn without memslot survives KVM_SET_MEMORY_ATTRIBUTES(PRIVATE) "
               "(kvm_vm_set_mem_attributes zaps only memslot ranges), and the reserved-bit "
               "fault path treats the next access as shared (kvm_mmu_page_fault, "
               "handle_mmio_page_fault): emulated MMIO instead of KVM_EXIT_MEMORY_FAULT(PRIVATE)",
    ),
)


def open_issue(nodeid: str, backend: str) -> OpenIssue | None:
    """The unfixed kernel bug expected to make ``nodeid`` fail on ``backend``, if any."""
    if backend != "kvm":
        return None
    for issue in OPEN_ISSUES:
        if fnmatch.fnmatchcase(nodeid, issue.nodeid):
            return issue
    return None


def xfail_open_issue(request: pytest.FixtureRequest, kvm: Kvm) -> OpenIssue | None:
    """Mark the running test a non-strict xfail if it is an open issue on this backend (from
    a fixture or the test body: pytest evaluates xfail marks added there after the call)."""
    import pytest

    issue = open_issue(request.node.nodeid, "kvm" if kvm.backend.is_real else "emu")
    if issue is not None:
        request.node.add_marker(pytest.mark.xfail(
            strict=False, reason=f"known KVM bug, no fix yet (seen on Linux "
                                 f"{', '.join(issue.seen_in)}; this is {platform.release()}): "
                                 f"{issue.reason}; see {issue.details}"))
    return issue


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


#: How long a test waits for a hang that a known bug of this kernel makes expected. The test is
#: a non-strict xfail there, so a longer wait cannot turn its result into a pass or a failure; it
#: only confirms the hang. Fixed kernels keep the test's own budget.
KNOWN_HANG_BUDGET = 1.5


def hang_budget(request: pytest.FixtureRequest, kvm: Kvm, budget: float) -> float:
    """``budget``, or :data:`KNOWN_HANG_BUDGET` when known_issue() expects this test to hang on
    this kernel and backend."""
    if known_issue(request.node.nodeid, kvm.backend.name):
        return min(budget, KNOWN_HANG_BUDGET)
    return budget
