"""Expectations that differ between kernels, in ONE place, keyed by capability or emulator profile.

Tests never compare kernel versions. What they may expect comes from:

* capabilities probed on the VM fd (valid guest_memfd flags, valid memslot flags, supported memory
  attributes): the helpers below turn those into the masks a test checks every other bit against;
* :data:`VERSIONED`: behaviours whose errno changed between kernels without any capability telling
  them apart. The backend is asked which variant it gives (``Backend.modelled_errno``: the emulated
  KVM answers from its kernel profile, which is the one record of kernel variants); a real kernel
  cannot say, so every documented variant is accepted and the test pins that the kernel answers
  *consistently* (see :func:`expected_errnos`).
"""

from __future__ import annotations

import dataclasses
import enum
import errno
from collections.abc import Callable, Iterable

from ..errors import Errno
from ..system import Kvm
from ..uapi import Cap, GuestMemfdFlag, MemFlag
from ..vm import Vm


class Behaviour(enum.Enum):
    """Behaviours whose errno is version dependent."""

    #: KVM_SET_USER_MEMORY_REGION2 binding a guest_memfd range that another slot of the same VM
    #: already binds (the GPA ranges themselves do not overlap).
    GMEM_BIND_OVERLAP = "gmem_bind_overlap"


@dataclasses.dataclass(frozen=True)
class Variant:
    """One documented answer to a :class:`Behaviour`."""

    errno: int
    kernels: str
    source: str


@dataclasses.dataclass(frozen=True)
class Versioned:
    """Every documented variant."""

    variants: tuple[Variant, ...]

    @property
    def all_errnos(self) -> frozenset[int]:
        return frozenset(v.errno for v in self.variants)


VERSIONED: dict[Behaviour, Versioned] = {
    Behaviour.GMEM_BIND_OVERLAP: Versioned(
        variants=(
            Variant(errno.EINVAL, "6.8 to 6.12 (measured on 6.12.117)",
                    "virt/kvm/guest_memfd.c kvm_gmem_bind(): -EINVAL when any index of the range is "
                    "already bound (set_memory_region_test 6.12: test_add_overlapping_private_"
                    "memory_regions expects EINVAL)"),
            Variant(errno.EEXIST, "newer upstream (measured on 7.3.4)",
                    "set_memory_region_test (kvm-x86 36a06256): recreating slot 10 over a bound "
                    "guest_memfd range expects EEXIST, matching overlapping GPA ranges"),
        ),
    ),
}


def expected_errnos(obj: Kvm | Vm, behaviour: Behaviour) -> tuple[frozenset[int], str]:
    """The errnos ``behaviour`` may give on ``obj``'s kernel, and why (for assert messages).

    A real kernel offers no capability that tells the variants apart, so every documented variant
    is allowed; callers that exercise the behaviour several times must also check that the kernel
    answered the same errno each time.
    """
    row = VERSIONED[behaviour]
    e = obj.backend.modelled_errno(behaviour.value)
    if e is not None:
        return frozenset({e}), f"{obj.backend.describe()} models {errno.errorcode[e]}"
    names = " or ".join(f"{errno.errorcode[v.errno]} ({v.kernels})" for v in row.variants)
    return row.all_errnos, f"{obj.backend.describe()}: no capability distinguishes {names}"


# --- capability-keyed masks ---------------------------------------------------------------

def valid_gmem_flags(vm: Vm) -> int:
    """KVM_CREATE_GUEST_MEMFD flags this VM accepts: KVM_CAP_GUEST_MEMFD_FLAGS on the VM fd
    (0 on kernels before the capability existed, which accept no flag at all)."""
    return vm.check_extension(Cap.GUEST_MEMFD_FLAGS)


def gmem_flag_sets(vm: Vm) -> list[int]:
    """The flag sets guest_memfd_test covers, as offered: 0, MMAP, MMAP|INIT_SHARED."""
    valid = valid_gmem_flags(vm)
    sets = [0]
    if valid & GuestMemfdFlag.MMAP:
        sets.append(int(GuestMemfdFlag.MMAP))
        if valid & GuestMemfdFlag.INIT_SHARED:
            sets.append(int(GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED))
    return sets


def memslot_accepts_guest_memfd(vm: Vm) -> bool:
    """Whether KVM_MEM_GUEST_MEMFD is a valid memslot flag on this VM: KVM_CAP_GUEST_MEMFD on the
    VM fd (6.12 answers it per VM type through kvm_arch_has_private_mem())."""
    return bool(vm.check_extension(Cap.GUEST_MEMFD))


def valid_memslot_flags(vm: Vm, *, v2: bool, guest_memfd: bool = False) -> int:
    """The kvm_userspace_memory_region{,2}.flags bits this VM accepts (api.rst 4.35 and 4.140;
    virt/kvm/kvm_main.c check_memory_region_flags()).

    LOG_DIRTY_PAGES always; READONLY with KVM_CAP_READONLY_MEM; GUEST_MEMFD only through
    KVM_SET_USER_MEMORY_REGION2 and only where the VM supports guest_memfd. A GUEST_MEMFD slot
    accepts neither LOG_DIRTY_PAGES (no dirty logging of private memory) nor READONLY (read-only
    slots have MMIO semantics for writes, which private memory cannot have).
    """
    valid = int(MemFlag.LOG_DIRTY_PAGES)
    if vm.check_extension(Cap.READONLY_MEM):
        valid |= MemFlag.READONLY
    if v2 and memslot_accepts_guest_memfd(vm):
        valid |= MemFlag.GUEST_MEMFD
    if guest_memfd:
        valid &= ~(MemFlag.LOG_DIRTY_PAGES | MemFlag.READONLY)
    return valid


def supported_attributes(vm: Vm) -> int:
    """KVM_MEMORY_ATTRIBUTE_* bits KVM_SET_MEMORY_ATTRIBUTES accepts on this VM: the VM fd's
    KVM_CAP_MEMORY_ATTRIBUTES (api.rst 4.141; every other bit is EINVAL)."""
    return vm.check_extension(Cap.MEMORY_ATTRIBUTES)


def expect_errno(result: int, want: int | Iterable[int], why: str = "") -> None:
    """Assert a ``try_*`` result; the message names the call and its arguments (an
    :class:`~kvmpy.errors.Errno` carries them), what came back and what was expected.
    ``want`` is one errno (0: success) or several, any of which passes."""
    wrong = _mismatch(result, want)
    if wrong:
        raise AssertionError(wrong + (f" ({why})" if why else ""))


def expect_errnos(cases: Iterable[tuple[int, int | Iterable[int]]], why: str = "",
                  limit: int = 20) -> None:
    """:func:`expect_errno` over a table of ``(result, want)`` pairs: every case is checked and
    one failure lists each mismatch (the first ``limit`` of them, and how many in all)."""
    wrong = [w for result, want in cases if (w := _mismatch(result, want))]
    if wrong:
        more = f" (+{len(wrong) - limit} more)" if len(wrong) > limit else ""
        raise AssertionError(f"{len(wrong)} case(s) wrong" + (f" ({why})" if why else "")
                             + ": " + "; ".join(wrong[:limit]) + more)


def _mismatch(result: int, want: int | Iterable[int]) -> str:
    wants = {want} if isinstance(want, int) else set(want)
    if result in wants:
        return ""
    call = f"{result.call}({result.detail})" if isinstance(result, Errno) else "call"
    exp = " or ".join(sorted(errname(w) for w in wants))
    return f"{call} -> {errname(result)}, expected {exp}"


def errno_of(call: str, fn: Callable[..., object], *args: object, detail: str = "") -> Errno:
    """``try_*`` for a call outside the object layer (libc or os: mbind, mprotect, ftruncate):
    run ``fn(*args)`` and return its errno (0 on success) as an :class:`~kvmpy.errors.Errno`
    naming ``call`` and its arguments (``detail``, else the arguments, ints in hex)."""
    text = detail or ", ".join(hex(a) if isinstance(a, int) else repr(a) for a in args)
    try:
        fn(*args)
    except OSError as e:
        if e.errno is None:  # raised by a signal handler during the call, not the kernel
            raise
        return Errno(e.errno, call, text)
    return Errno(0, call, text)


def errname(err: int) -> str:
    """'EINVAL' for 22, '0' for success: for assert messages."""
    return errno.errorcode.get(err, str(err)) if err else "0 (success)"


__all__ = [
    "VERSIONED",
    "Behaviour",
    "Variant",
    "Versioned",
    "errname",
    "errno_of",
    "expect_errno",
    "expect_errnos",
    "expected_errnos",
    "gmem_flag_sets",
    "memslot_accepts_guest_memfd",
    "supported_attributes",
    "valid_gmem_flags",
    "valid_memslot_flags",
]
