"""KVM_PRE_FAULT_MEMORY over a range that is already mapped succeeds again, with nothing left.

Upstream's pre_fault_memory_test pre-faults each range once. arch/x86/kvm/mmu/mmu.c
kvm_tdp_page_prefault() (7.3; kvm_tdp_map_page() in 6.12) maps RET_PF_SPURIOUS (the SPTE is
already present) to 0 like RET_PF_FIXED, so kvm_arch_vcpu_pre_fault_memory() reports the page
done and virt/kvm/kvm_main.c kvm_vcpu_pre_fault_memory() returns 0 with size 0 and gpa advanced
by the whole range. Also after the guest itself touched the pages. Per VM type and per upstream
variant (shared; private: a guest_memfd slot set PRIVATE), reusing test_pre_fault_memory's
Setup; the guest then reads every page as upstream's epilogue.
"""

from __future__ import annotations

import errno

import pytest

from kvmpy.testing.errnos import errname, expect_errno
from kvmpy.uapi import kvm_pre_fault_memory

from .test_pre_fault_beyond import setup as variant_setup
from .test_pre_fault_memory import TEST_SIZE, Setup, _one

M2 = 2 << 20
setup = variant_setup  # fixture ``setup``: a Setup at 4 GiB per upstream variant


def _whole(s: Setup, offset: int, size: int) -> kvm_pre_fault_memory:
    r = kvm_pre_fault_memory(gpa=s.gpa + offset, size=size)
    errs = []
    while True:
        err = _one(s.vcpu, r)  # checks size shrank XOR error, and the gpa advance
        errs.append(err)
        if err not in (errno.EINTR, errno.EAGAIN):  # retried, as api.rst 4.143 says
            break
    expect_errno(err, 0, f"calls gave {[errname(e) for e in errs]}")
    assert r.size == 0, f"pre-fault of ({s.gpa + offset:#x}, {size:#x}): {r.size:#x} bytes left"
    assert r.gpa == s.gpa + offset + size, f"gpa ended at {r.gpa:#x}, not the range's end"
    return r


ROWS = [
    # (id, first range (offset, size), second range)
    ("same_range", (0, M2), (0, M2)),
    ("whole_slot_twice", (0, TEST_SIZE), (0, TEST_SIZE)),
    ("inside_a_done_range", (0, M2), (M2 // 2, 4096)),
    ("overlapping_done_and_new", (0, M2), (M2 - 4096, 2 * 4096)),
]


@pytest.mark.parametrize("first,second", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_pre_fault_already_mapped(setup: Setup, first: tuple[int, int],
                                  second: tuple[int, int]) -> None:
    """The second call over mapped pages returns 0, size 0 (RET_PF_SPURIOUS counts as done in
    kvm_tdp_page_prefault()); then the guest reads every page and reaches UCALL_DONE."""
    _whole(setup, *first)
    _whole(setup, *second)
    setup.guest_reads_every_page()


def test_pre_fault_after_guest_ran(setup: Setup) -> None:
    """Pages the guest has faulted in itself pre-fault again with success and nothing left."""
    setup.guest_reads_every_page()
    _whole(setup, 0, TEST_SIZE)
    _whole(setup, 0, TEST_SIZE)
