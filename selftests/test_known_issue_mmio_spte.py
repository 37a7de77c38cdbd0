"""Known KVM issue: a stale MMIO SPTE outlives KVM_SET_MEMORY_ATTRIBUTES (docs/findings.md).

On a KVM_X86_SW_PROTECTED_VM, a guest access to a gfn with no memslot exits with
KVM_EXIT_MMIO, and KVM caches that as an MMIO SPTE (arch/x86/kvm/mmu/mmu.c
kvm_handle_noslot_fault -> make_mmio_spte, tagged with the memslot generation). Making the gfn
private zaps SPTEs only inside memslots (virt/kvm/kvm_main.c kvm_vm_set_mem_attributes ->
kvm_handle_gfn_range iterates memslots), so the MMIO SPTE survives; the next access takes the
reserved-bit fault path (kvm_mmu_page_fault: PFERR_PRIVATE_ACCESS is not set for
PFERR_RSVD_MASK faults; handle_mmio_page_fault) and is emulated as MMIO although the gfn is now
private, where KVM's own no-slot path (kvm_handle_noslot_fault: "fault->is_private" ->
KVM_EXIT_MEMORY_FAULT) and a fresh VM give KVM_EXIT_MEMORY_FAULT with
KVM_MEMORY_EXIT_FLAG_PRIVATE.

These tests assert the documented behaviour (the emulated KVM has it). On real KVM they are
known failures (kvmpy.testing.known_issues.OPEN_ISSUES: non-strict xfail, XPASS once fixed).
Seen on Linux 6.12.117 and 7.3.4 (nested kvm_amd, TDP MMU, in ci/vm-run).
"""

from __future__ import annotations

import pytest

from kvmpy.model.harness import GPA_BASE, ModelHarness
from kvmpy.model.state import MEM_EXIT_FLAG_PRIVATE, PAGE, Fault, Mem, Mmio
from kvmpy.system import Kvm
from kvmpy.testing.known_issues import xfail_open_issue
from kvmpy.testing.require import require_cap, require_vm_type
from kvmpy.uapi import Cap, MemoryAttribute, VmType

pytestmark = pytest.mark.guest

GPA = GPA_BASE          # 0x100000000: no memslot there until a test adds one


@pytest.fixture
def h(kvm: Kvm, request: pytest.FixtureRequest) -> ModelHarness:
    require_vm_type(kvm, VmType.SW_PROTECTED)
    xfail_open_issue(request, kvm)
    harness = ModelHarness(kvm, VmType.SW_PROTECTED, known_issues=False)
    request.addfinalizer(harness.close)
    require_cap(harness.g.vm, Cap.MEMORY_ATTRIBUTES, MemoryAttribute.PRIVATE)
    return harness


def test_private_noslot_gpa_after_mmio_exit_is_memory_fault(h: ModelHarness) -> None:
    """The issue's three steps: MMIO exit; set the gpa private; the same read must now be
    KVM_EXIT_MEMORY_FAULT(PRIVATE) as it is without the first read (real KVM: MMIO again)."""
    assert h.guest_read(GPA) == Mmio(GPA, False)
    h.set_attributes(GPA, PAGE, private=True)
    assert h.guest_read(GPA) == Fault(MEM_EXIT_FLAG_PRIVATE, GPA)


def test_private_noslot_gpa_without_prior_mmio_is_memory_fault(h: ModelHarness) -> None:
    """Control: without the first read, real KVM already gives KVM_EXIT_MEMORY_FAULT."""
    h.set_attributes(GPA, PAGE, private=True)
    assert h.guest_read(GPA) == Fault(MEM_EXIT_FLAG_PRIVATE, GPA)


def test_private_gmem_slot_after_mmio_exit_reads_gmem(h: ModelHarness) -> None:
    """MMIO exit; set private; then a guest_memfd slot appears over the gpa: the read must be
    served from the guest_memfd (the memslot change bumps the generation, so the old MMIO SPTE
    no longer matches, but the fault it takes is a reserved-bit one)."""
    assert h.guest_read(GPA) == Mmio(GPA, False)
    h.set_attributes(GPA, PAGE, private=True)
    gid = h.create_gmem(PAGE)
    assert gid is not None
    h.set_slot(0, GPA, PAGE, gmem=gid)
    assert h.guest_read(GPA) == Mem(0, "?")


def test_private_noslot_gpa_after_mmio_and_other_slot_change_is_private_fault(
        h: ModelHarness) -> None:
    """MMIO exit; set private; a memslot elsewhere is created: the read must still be a
    private KVM_EXIT_MEMORY_FAULT."""
    assert h.guest_read(GPA) == Mmio(GPA, False)
    h.set_attributes(GPA, PAGE, private=True)
    h.set_slot(0, GPA + 16 * PAGE, PAGE)
    assert h.guest_read(GPA) == Fault(MEM_EXIT_FLAG_PRIVATE, GPA)


def test_private_noslot_gpa_after_mmio_and_other_slot_deleted_is_private_fault(
        h: ModelHarness) -> None:
    """As above, then that memslot is deleted. Only a KVM_X86_DEFAULT_VM zaps every SPTE on a
    deletion (kvm_arch_flush_shadow_memslot()); a SW_PROTECTED VM unmaps the slot's gfns, so
    the MMIO SPTE survives, stale. The read must still be a private KVM_EXIT_MEMORY_FAULT."""
    assert h.guest_read(GPA) == Mmio(GPA, False)
    h.set_attributes(GPA, PAGE, private=True)
    h.set_slot(0, GPA + 16 * PAGE, PAGE)
    h.delete_slot(0)
    assert h.guest_read(GPA) == Fault(MEM_EXIT_FLAG_PRIVATE, GPA)
