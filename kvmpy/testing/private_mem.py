"""What the private-memory selftests need from the host beyond the object layer.

* :func:`require_private_mem` skips unless the kernel offers what KVM's private_mem tests need:
  KVM_X86_SW_PROTECTED_VM in KVM_CAP_VM_TYPES, KVM_MEMORY_ATTRIBUTE_PRIVATE in
  KVM_CAP_MEMORY_ATTRIBUTES, KVM_CAP_GUEST_MEMFD and (optionally) KVM_HC_MAP_GPA_RANGE in
  KVM_CAP_EXIT_HYPERCALL, each probed on a VM of that type.
* :func:`guest_accesses_emulated` tells whether KVM runs a guest in its instruction emulator.
* :func:`emu_gap` marks a known gap of the emulated KVM as a strict xfail there.

The KVM_HC_MAP_GPA_RANGE exit is kvmpy.guest.hypercall; the conversions host loop lives in
selftests/test_private_mem_conversions.py, next to its guest.
"""

from __future__ import annotations

import errno

import pytest

from ..errors import KvmError
from ..guest.hypercall import MAP_GPA_RANGE_BIT
from ..guest.stats import read_stats
from ..guest.vm import GuestVm
from ..system import Kvm
from ..uapi import (
    Cap,
    MemoryAttribute,
    VmType,
)
from .require import require_cap, require_vm_type, where


def require_private_mem(kvm: Kvm, *, hypercall_exit: bool = True) -> None:
    """Skip unless SW_PROTECTED VMs with private memory are offered (private_mem_*_test's
    TEST_REQUIRE(kvm_check_cap(KVM_CAP_VM_TYPES) & BIT(KVM_X86_SW_PROTECTED_VM)), plus the
    capabilities that implies, probed on such a VM so a skip names the one missing)."""
    require_vm_type(kvm, VmType.SW_PROTECTED)
    with kvm.create_vm(VmType.SW_PROTECTED) as vm:
        require_cap(vm, Cap.MEMORY_ATTRIBUTES, int(MemoryAttribute.PRIVATE))
        require_cap(vm, Cap.GUEST_MEMFD)
        require_cap(vm, Cap.USER_MEMORY2)
        if hypercall_exit:
            require_cap(vm, Cap.EXIT_HYPERCALL, MAP_GPA_RANGE_BIT)


# --- how KVM reaches guest memory -------------------------------------------------------------
def guest_accesses_emulated(g: GuestVm, probe_entry: str) -> tuple[bool, str]:
    """Whether KVM runs this guest in its instruction emulator (which reaches memory through the
    slot's userspace_addr), from the vCPU stat insn_emulation (KVM_GET_STATS_FD) over one ucall
    round trip of ``probe_entry`` (a guest function that SYNCs once). Returns the verdict and the
    observed fact, for messages. Without the stats fd there is no sign of emulation."""
    probe = g.vcpu(probe_entry)
    try:
        before = read_stats(probe).get("insn_emulation")
    except KvmError as e:
        g.run_until_ucall(probe)
        return False, f"no vCPU stats ({e.call}: {errno.errorcode.get(e.errno or 0, str(e.errno))})"
    g.run_until_ucall(probe)
    if before is None:
        return False, "no insn_emulation vCPU stat"
    grew = read_stats(probe)["insn_emulation"] - before
    return grew >= 20, f"insn_emulation grew by {grew} over one ucall round trip"


# --- known gaps of the emulated KVM --------------------------------------------------------------
#: Reported to the emulator's owners; each names the kernel behaviour the emulator misses.
EMU_GAP_NOSLOT_PRIVATE = (
    "a private gfn with no memslot gives KVM_EXIT_MMIO instead of KVM_EXIT_MEMORY_FAULT "
    "(arch/x86/kvm/mmu/mmu.c: a private fault goes to kvm_faultin_pfn_private(), which exits "
    "with KVM_MEMORY_EXIT_FLAG_PRIVATE when the slot cannot be private, before the no-slot "
    "MMIO path)")
EMU_GAP_ANON_HLT = (
    "with a private-anonymous shared backing (mapped directly, not aliased) a vmcall after "
    "several conversions is reported as KVM_EXIT_HLT at the vmcall's RIP (minimal: "
    "test_private_mem_beyond.py::test_scripted_conversions[overlapping_2m_then_free_all-anonymous])")


def emu_gap(request: pytest.FixtureRequest, kvm: Kvm, what: str) -> None:
    """Mark the running test as a strict xfail on the emulated KVM only: the gap stays visible
    in every run, and a fixed emulator turns the XPASS into a failure that asks for the marker
    to go. On real KVM the test runs normally."""
    if kvm.backend.name == "emu":
        request.node.add_marker(pytest.mark.xfail(strict=True, reason=f"emulated KVM: {what}"))


__all__ = [
    "EMU_GAP_ANON_HLT",
    "EMU_GAP_NOSLOT_PRIVATE",
    "emu_gap",
    "guest_accesses_emulated",
    "require_private_mem",
    "where",
]
