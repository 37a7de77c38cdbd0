"""KVM_PRE_FAULT_MEMORY beyond upstream's pre_fault_memory_test: each call's contract without a
racing memslot deletion, and the EINVAL table. Same slot 10, variants and Setup as
selftests/test_pre_fault_memory.py (imported from it, with its per-call check ``_one``).

Pinned (Documentation/virt/kvm/api.rst 4.143; virt/kvm/kvm_main.c kvm_vcpu_pre_fault_memory()):

* test_pre_fault_progress: calls repeat (EINTR/EAGAIN retried) until done or an error. A range in
  the slot completes with size 0; one running past the slot maps what the slot covers and returns
  0 for that progress (success when at least one page was mapped), then the next call is ENOENT
  with the rest left; a range with no slot is ENOENT at once, untouched (arch/x86/kvm/mmu/mmu.c
  kvm_arch_vcpu_pre_fault_memory(): RET_PF_EMULATE -> -ENOENT).
* test_pre_fault_invalid_range: an unaligned gpa or size, or size 0, is EINVAL and leaves the
  range untouched (PAGE_ALIGNED checks);
* test_pre_fault_wrapping_range: a range wrapping past 2^64, or ending exactly at it, is EINVAL
  (gpa + size <= gpa);
* test_pre_fault_flags: every non-zero flags bit is EINVAL, even for a valid range (flags must
  be 0).
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest

from kvmpy.system import Kvm
from kvmpy.testing.errnos import errname, expect_errno, expect_errnos
from kvmpy.uapi import PAGE_SIZE, kvm_pre_fault_memory

from .test_pre_fault_memory import M2, TEST_SIZE, VARIANTS, Setup, _call, _one

P = PAGE_SIZE
U64 = 2**64


@pytest.fixture(params=VARIANTS)
def setup(request: pytest.FixtureRequest, kvm: Kvm, vm_type: int,
          make_vm: object) -> Iterator[Setup]:
    """``make_vm`` first: it skips VM types the backend does not offer."""
    s = Setup(kvm, vm_type, str(request.param), "at_4g")
    try:
        yield s
    finally:
        s.g.close()


ROWS = [
    # (id, offset from the slot base, size, bytes expected left, final errno)
    ("whole_2m", 0, M2, 0, 0),
    ("whole_slot", 0, TEST_SIZE, 0, 0),
    ("last_page_then_past_slot", M2, 2 * P, P, errno.ENOENT),
    ("past_slot", TEST_SIZE, P, P, errno.ENOENT),
    ("far_past_slot", TEST_SIZE + M2, 4 * P, 4 * P, errno.ENOENT),
]


@pytest.mark.parametrize("offset,size,left,final", [r[1:] for r in ROWS],
                         ids=[r[0] for r in ROWS])
def test_pre_fault_progress(setup: Setup, offset: int, size: int, left: int,
                            final: int) -> None:
    """The per-call contract without the race (module docstring), then upstream's epilogue."""
    r = kvm_pre_fault_memory(gpa=setup.gpa + offset, size=size)
    errs = []
    while True:
        err = _one(setup.vcpu, r)
        errs.append(err)
        if err in (errno.EINTR, errno.EAGAIN):
            continue
        if err or r.size == 0:
            break
    expect_errno(err, final, f"pre-fault of (+{offset:#x}, {size:#x}): calls gave "
                 f"{[errname(e) for e in errs]}")
    assert r.size == left, f"{_call(r)}: {r.size:#x} bytes left, expected {left:#x}"
    assert r.gpa == setup.gpa + offset + size - left, f"{_call(r)}: gpa not advanced to the end"
    if left and left < size:
        assert 0 in errs, f"partial progress was not reported as success first: {errs}"
    setup.guest_reads_every_page()


INVALID = [
    # (id, offset from the slot base, size)
    ("size_zero", 0, 0),
    ("gpa_unaligned", 1, P),
    ("gpa_unaligned_half_page", P // 2, P),
    ("size_unaligned", 0, P + 1),
    ("size_unaligned_small", 0, 1),
]


@pytest.mark.parametrize("offset,size", [r[1:] for r in INVALID], ids=[r[0] for r in INVALID])
def test_pre_fault_invalid_range(setup: Setup, offset: int, size: int) -> None:
    """Unaligned gpa or size, or size 0: EINVAL, the range untouched."""
    r = kvm_pre_fault_memory(gpa=setup.gpa + offset, size=size)
    expect_errno(setup.vcpu.try_pre_fault_memory(r), errno.EINVAL)
    assert (r.gpa, r.size) == (setup.gpa + offset, size), f"EINVAL changed the range: {_call(r)}"


@pytest.mark.parametrize("gpa,size", [(U64 - P, 2 * P), (U64 - P, P), (2 * P, U64 - P)],
                         ids=["wraps_past_u64", "wraps_to_zero", "huge_size_wraps"])
def test_pre_fault_wrapping_range(setup: Setup, gpa: int, size: int) -> None:
    """A range wrapping past 2^64 (or ending at it): EINVAL."""
    expect_errno(setup.vcpu.try_pre_fault_memory(kvm_pre_fault_memory(gpa=gpa, size=size)),
                 errno.EINVAL)


def test_pre_fault_flags(setup: Setup) -> None:
    """Each flags bit 0..63 on a valid one-page range: EINVAL, nothing done."""
    rs = [kvm_pre_fault_memory(gpa=setup.gpa, size=P, flags=1 << bit) for bit in range(64)]
    expect_errnos((setup.vcpu.try_pre_fault_memory(r), errno.EINVAL) for r in rs)
    moved = [_call(r) for r in rs if r.size != P]
    assert not moved, f"flags != 0 pre-faulted memory: {moved[:20]}"
