"""KVM_SET_MEMORY_ATTRIBUTES: validation, ranges with and without memslots, and what it changes.

Upstream has no dedicated test (private_mem_* and pre_fault_memory_test only call it through
vm_mem_set_private()); this file pins the ioctl's contract. Attributes are not readable by
userspace, so besides the errnos the effect is observed through KVM_PRE_FAULT_MEMORY: a gfn marked
PRIVATE in a memslot without guest_memfd cannot be faulted in (EFAULT), a shared gfn can, and a
PRIVATE gfn in a guest_memfd slot is faulted in from the guest_memfd.

Requires KVM_CAP_MEMORY_ATTRIBUTES with KVM_MEMORY_ATTRIBUTE_PRIVATE on the VM fd (every case runs
per VM type offered and skips where the VM type has no private memory); the observation cases also
need KVM_CAP_PRE_FAULT_MEMORY.

Behaviour sources: Documentation/virt/kvm/api.rst 4.141 "KVM_SET_MEMORY_ATTRIBUTES" (address and
size page aligned, flags 0, attributes from KVM_CAP_MEMORY_ATTRIBUTES); virt/kvm/kvm_main.c
kvm_vm_ioctl_set_mem_attributes() (flags, unknown bits, size 0 or wrap, alignment: EINVAL; the
attribute array is per gfn, independent of memslots; an unchanged range returns 0 early);
arch/x86/kvm/mmu/mmu.c kvm_arch_vcpu_pre_fault_memory() (PFERR_PRIVATE_ACCESS from the attribute)
and kvm_mmu_faultin_pfn_private() (-EFAULT when the slot has no guest_memfd).
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest

from kvmpy.memory import SharedMemory
from kvmpy.system import Kvm
from kvmpy.testing.errnos import (
    errname,
    expect_errno,
    expect_errnos,
    memslot_accepts_guest_memfd,
    supported_attributes,
)
from kvmpy.testing.require import require_cap, skip_missing, where
from kvmpy.uapi import PAGE_SIZE, Cap, MemFlag, MemoryAttribute, kvm_pre_fault_memory
from kvmpy.vcpu import Vcpu
from kvmpy.vm import Vm

P = PAGE_SIZE
PRIVATE = int(MemoryAttribute.PRIVATE)
GPA = 1 << 32
NPAGES = 8
U64 = 2**64


@pytest.fixture
def attr_vm(vm: Vm) -> Vm:
    """A VM whose KVM_CAP_MEMORY_ATTRIBUTES includes KVM_MEMORY_ATTRIBUTE_PRIVATE."""
    val = supported_attributes(vm)
    if not val & PRIVATE:
        skip_missing(vm, "private_attributes", f"KVM_CAP_MEMORY_ATTRIBUTES={val:#x} (need "
                     f"KVM_MEMORY_ATTRIBUTE_PRIVATE={PRIVATE:#x}) on {where(vm)}")
    return vm


@pytest.fixture
def host_mem(kvm: Kvm) -> Iterator[SharedMemory]:
    with SharedMemory(kvm.backend, 4 * NPAGES * P, "attr-backing") as m:
        yield m


def _call(gpa: int, size: int, attrs: int = PRIVATE, flags: int = 0) -> str:
    return (f"KVM_SET_MEMORY_ATTRIBUTES(address={gpa % U64:#x}, size={size % U64:#x}, "
            f"attributes={attrs:#x}, flags={flags:#x})")


def _set(vm: Vm, gpa: int, size: int, attrs: int = PRIVATE, flags: int = 0,
         want: int = 0) -> None:
    expect_errno(vm.try_set_memory_attributes(gpa, size, attrs, flags), want)


# --- validation ------------------------------------------------------------------------------

INVALID_RANGES = [
    # (id, address, size)
    ("address_unaligned_1", GPA + 1, P),
    ("address_unaligned_half_page", GPA + P // 2, P),
    ("address_unaligned_last_byte", GPA + P - 1, P),
    ("size_unaligned_1", GPA, 1),
    ("size_unaligned_page_minus_1", GPA, P - 1),
    ("size_unaligned_page_plus_1", GPA, P + 1),
    ("size_zero", GPA, 0),
    ("size_zero_unaligned_address", GPA + 1, 0),
    ("wraps_past_u64", U64 - P, 2 * P),
    ("wraps_to_zero", U64 - P, P),
    ("huge_size_wraps", 2 * P, U64 - P),
    ("size_u64_max", 0, U64 - 1),
]


@pytest.mark.parametrize("gpa,size", [r[1:] for r in INVALID_RANGES],
                         ids=[r[0] for r in INVALID_RANGES])
@pytest.mark.parametrize("attrs", [PRIVATE, 0], ids=["private", "shared"])
def test_invalid_range(attr_vm: Vm, gpa: int, size: int, attrs: int) -> None:
    """An unaligned address or size, a zero size, or a range that wraps past 2^64 is EINVAL,
    whether setting or clearing PRIVATE (api.rst 4.141; kvm_vm_ioctl_set_mem_attributes())."""
    _set(attr_vm, gpa, size, attrs, want=errno.EINVAL)


VALID_EDGES = [
    ("one_page", GPA, P),
    ("no_memslot_high", 1 << 46, 4 * P),
    ("top_of_u64", U64 - 2 * P, P),
]


@pytest.mark.parametrize("gpa,size", [r[1:] for r in VALID_EDGES], ids=[r[0] for r in VALID_EDGES])
def test_valid_range_edges(attr_vm: Vm, gpa: int, size: int) -> None:
    """Valid ranges need no memslot and no particular GPA limit: attributes are a per-gfn array,
    and only alignment, size 0 and wrapping are checked (kvm_vm_ioctl_set_mem_attributes())."""
    _set(attr_vm, gpa, size, PRIVATE)
    _set(attr_vm, gpa, size, 0)


def test_unknown_attribute_bits(attr_vm: Vm) -> None:
    """Every attribute bit outside KVM_CAP_MEMORY_ATTRIBUTES is EINVAL, alone or with PRIVATE;
    each supported bit is accepted (api.rst 4.141; kvm_supported_mem_attributes())."""
    supported = supported_attributes(attr_vm)
    expect_errnos(((attr_vm.try_set_memory_attributes(GPA, P, a), errno.EINVAL if a & ~supported
                    else 0) for bit in range(64) for a in (1 << bit, 1 << bit | PRIVATE)),
                  f"KVM_CAP_MEMORY_ATTRIBUTES={supported:#x}")


def test_nonzero_flags(attr_vm: Vm) -> None:
    """flags must be 0: each of bits 0..63 is EINVAL, for setting and clearing (api.rst 4.141:
    "The flags field is reserved for future extensions and must be '0'")."""
    expect_errnos((attr_vm.try_set_memory_attributes(GPA, P, attrs, 1 << bit), errno.EINVAL)
                  for bit in range(64) for attrs in (PRIVATE, 0))


# --- ranges and memslots ------------------------------------------------------------------------

def _slots(vm: Vm, mem: SharedMemory, kind: str) -> list[tuple[int, int]]:
    """Two adjacent slots of NPAGES pages at GPA: (gpa, size) each. kind: plain | guest_memfd |
    mixed (first plain, second guest_memfd)."""
    out = []
    for i, use_gmem in enumerate((kind == "guest_memfd", kind in ("guest_memfd", "mixed"))):
        gpa, size = GPA + i * NPAGES * P, NPAGES * P
        hva = mem.addr + i * NPAGES * P
        if use_gmem:
            g = vm.create_guest_memfd(size)
            vm.set_user_memory_region2(10 + i, MemFlag.GUEST_MEMFD, gpa, size, hva, g, 0)
        else:
            vm.set_user_memory_region2(10 + i, 0, gpa, size, hva)
        out.append((gpa, size))
    return out


def _need_gmem_slots(vm: Vm, kind: str) -> None:
    if kind != "plain" and not memslot_accepts_guest_memfd(vm):
        pytest.skip(f"KVM_CAP_GUEST_MEMFD={vm.check_extension(Cap.GUEST_MEMFD):#x} "
                    f"(KVM_MEM_GUEST_MEMFD memslots) on {where(vm)}")


RANGES = [
    # (id, offset from GPA in pages, pages): two slots cover pages [0, 2 * NPAGES)
    ("inside_first_slot", 1, 2),
    ("whole_first_slot", 0, NPAGES),
    ("crossing_slots", NPAGES - 2, 4),
    ("both_slots", 0, 2 * NPAGES),
    ("slot_and_hole_after", NPAGES, 2 * NPAGES),
    ("hole_only", 4 * NPAGES, NPAGES),
]


@pytest.mark.parametrize("kind", ["plain", "guest_memfd", "mixed"])
@pytest.mark.parametrize("first,pages", [r[1:] for r in RANGES], ids=[r[0] for r in RANGES])
def test_set_and_clear_ranges(attr_vm: Vm, host_mem: SharedMemory, kind: str, first: int,
                              pages: int) -> None:
    """Setting and clearing PRIVATE succeeds inside a slot, across two adjacent slots, over a
    slot and the hole after it, and with no slot at all; repeating an identical call succeeds
    each time (api.rst 4.141: attributes apply to guest physical addresses, not memslots;
    kvm_vm_set_mem_attributes() returns 0 early for an unchanged range)."""
    _need_gmem_slots(attr_vm, kind)
    _slots(attr_vm, host_mem, kind)
    gpa, size = GPA + first * P, pages * P
    for attrs in (PRIVATE, PRIVATE, 0, 0, PRIVATE, 0):
        _set(attr_vm, gpa, size, attrs)


def test_partial_overlaps(attr_vm: Vm) -> None:
    """Overlapping set/clear calls on sub-ranges all succeed (the array is split and merged per
    gfn; kvm_vm_set_mem_attributes())."""
    seq = [(0, 8, PRIVATE), (2, 2, 0), (1, 4, PRIVATE), (3, 5, 0), (0, 1, 0), (7, 3, PRIVATE),
           (0, 16, 0)]
    for first, pages, attrs in seq:
        _set(attr_vm, GPA + first * P, pages * P, attrs)


# --- what the attribute does, seen through KVM_PRE_FAULT_MEMORY --------------------------------

@pytest.fixture
def pf_vcpu(attr_vm: Vm) -> Vcpu:
    require_cap(attr_vm, Cap.PRE_FAULT_MEMORY)
    return attr_vm.create_vcpu()


def _prefault_page(vcpu: Vcpu, gpa: int) -> int:
    """Pre-fault one page: 0 if it was mapped, else the errno (EINTR/EAGAIN retried)."""
    while True:
        r = kvm_pre_fault_memory(gpa=gpa, size=P)
        err = vcpu.try_pre_fault_memory(r)
        if err in (errno.EINTR, errno.EAGAIN):
            continue
        if not err:
            assert r.size == 0, f"KVM_PRE_FAULT_MEMORY(gpa={gpa:#x}, size={P:#x}) left {r.size:#x}"
        return err


def _observe(vcpu: Vcpu, pages: list[int]) -> dict[int, str]:
    return {i: errname(_prefault_page(vcpu, GPA + i * P)) for i in pages}


def test_private_seen_by_prefault(attr_vm: Vm, pf_vcpu: Vcpu, host_mem: SharedMemory) -> None:
    """In two plain slots, exactly the pages marked PRIVATE refuse to fault in (EFAULT: private
    access to a slot without guest_memfd), including across the slot boundary; clearing the
    attribute makes them fault in again (kvm_arch_vcpu_pre_fault_memory() sets
    PFERR_PRIVATE_ACCESS from the attribute; kvm_mmu_faultin_pfn_private() -EFAULT)."""
    _slots(attr_vm, host_mem, "plain")
    pages = list(range(2 * NPAGES))
    shared = dict.fromkeys(pages, "0 (success)")
    assert _observe(pf_vcpu, pages) == shared, "pre-faulting shared pages of plain slots"
    private = set(range(NPAGES - 2, NPAGES + 2))
    _set(attr_vm, GPA + (NPAGES - 2) * P, 4 * P, PRIVATE)
    got = _observe(pf_vcpu, pages)
    want = {i: "EFAULT" if i in private else "0 (success)" for i in pages}
    assert got == want, (f"KVM_PRE_FAULT_MEMORY per page after {_call(GPA + (NPAGES - 2) * P, 4 * P)}"
                         f": got {got}, expected {want}")
    _set(attr_vm, GPA + (NPAGES - 2) * P, 4 * P, 0)
    assert _observe(pf_vcpu, pages) == shared, "pages still private after clearing PRIVATE"


def test_private_served_by_guest_memfd(attr_vm: Vm, pf_vcpu: Vcpu,
                                       host_mem: SharedMemory) -> None:
    """In a guest_memfd slot, PRIVATE pages fault in from the guest_memfd and shared pages from
    userspace_addr: both pre-fault successfully; in the plain slot next to it the same attribute
    gives EFAULT (kvm_mmu_faultin_pfn_private(): guest_memfd slots serve private faults)."""
    _need_gmem_slots(attr_vm, "mixed")
    _slots(attr_vm, host_mem, "mixed")  # slot 10 plain, slot 11 guest_memfd
    _set(attr_vm, GPA, 2 * NPAGES * P, PRIVATE)
    pages = list(range(2 * NPAGES))
    got = _observe(pf_vcpu, pages)
    want = {i: "EFAULT" if i < NPAGES else "0 (success)" for i in pages}
    assert got == want, f"pre-fault with everything PRIVATE: got {got}, expected {want}"


def test_attributes_outlive_memslots(attr_vm: Vm, pf_vcpu: Vcpu, host_mem: SharedMemory) -> None:
    """Attributes belong to the VM's gfns, not to memslots: set before the slot exists, they
    apply once it is created, and survive deleting and recreating it (api.rst 4.141)."""
    _set(attr_vm, GPA + P, P, PRIVATE)
    attr_vm.set_user_memory_region2(10, 0, GPA, NPAGES * P, host_mem.addr)
    want = {0: "0 (success)", 1: "EFAULT", 2: "0 (success)"}
    assert _observe(pf_vcpu, [0, 1, 2]) == want, "attribute set before the slot existed"
    attr_vm.delete_memslot(10)
    attr_vm.set_user_memory_region2(10, 0, GPA, NPAGES * P, host_mem.addr)
    assert _observe(pf_vcpu, [0, 1, 2]) == want, "attribute lost when the slot was recreated"
