"""Capability requirements: skip (never fail) with the capability's name and value.

A case that x86 KVM's design rules out for a VM type on every kernel is reported as *not
applicable*, apart from real skips (a skip reason starting with :data:`NOT_APPLICABLE`; the
summary, KTAP and JUnit count it separately). The rules are x86 KVM facts, cited below; a kernel
that offers the capability after all runs the case, so nothing is hidden if a rule changes.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ..system import Kvm
from ..uapi import Cap, VmType
from ..vm import Vm


def where(obj: Kvm | Vm) -> str:
    b = obj.backend
    if isinstance(obj, Vm):
        return f"a KVM_X86_{VmType(obj.type).name}_VM on {b.describe()}"
    return b.describe()


#: Prefix of a not-applicable skip reason.
NOT_APPLICABLE = "not applicable: "

#: VM types with private memory: kvm->arch.has_private_mem is set for SW_PROTECTED in
#: kvm_arch_init_vm() (arch/x86/kvm/x86.c), for SNP in sev.c and for TDX in tdx.c.
PRIVATE_MEM_VM_TYPES = frozenset({VmType.SW_PROTECTED, VmType.SNP, VmType.TDX})

#: feature -> (does the rule exclude this VM type, why): x86 KVM design, not a kernel version.
_RULES: dict[str, tuple[Callable[[int], bool], str]] = {
    # kvm_supported_mem_attributes() (virt/kvm/kvm_main.c): PRIVATE only with private memory.
    "private_attributes": (lambda t: t not in PRIVATE_MEM_VM_TYPES,
                           "KVM_MEMORY_ATTRIBUTE_PRIVATE exists only for VM types with private "
                           "memory (kvm_supported_mem_attributes)"),
    # kvm_gmem_get_supported_flags() + x86's kvm_arch_supports_gmem_init_shared():
    # INIT_SHARED only without private memory.
    "gmem_init_shared": (lambda t: t in PRIVATE_MEM_VM_TYPES,
                         "GUEST_MEMFD_FLAG_INIT_SHARED is offered only to VMs without private "
                         "memory (kvm_arch_supports_gmem_init_shared)"),
}


def skip_missing(obj: Kvm | Vm, feature: str, reason: str) -> None:
    """Skip for ``reason`` - as not applicable when x86's rules exclude ``feature`` for this VM
    type on any kernel."""
    rule = _RULES.get(feature)
    if rule is not None and isinstance(obj, Vm) and rule[0](obj.type):
        pytest.skip(f"{NOT_APPLICABLE}{rule[1]}; {reason}")
    pytest.skip(reason)


def require_cap(obj: Kvm | Vm, cap: Cap, mask: int | None = None) -> int:
    """Skip unless KVM_CHECK_EXTENSION(cap) is non-zero (and has every bit of ``mask``)."""
    val = obj.check_extension(cap)
    if not val or (mask is not None and (val & mask) != mask):
        need = f" (need bits {mask:#x})" if mask is not None else ""
        pytest.skip(f"KVM_CAP_{cap.name}={val:#x}{need} on {where(obj)}")
    return val


def require_vm_type(kvm: Kvm, vm_type: VmType) -> None:
    """Skip unless KVM_CAP_VM_TYPES offers ``vm_type`` (a kernel without the capability, before
    6.8, answers 0 and offers KVM_X86_DEFAULT_VM alone)."""
    mask = kvm.check_extension(Cap.VM_TYPES) or 1 << VmType.DEFAULT
    if not mask & (1 << vm_type):
        pytest.skip(f"KVM_X86_{vm_type.name}_VM not in KVM_CAP_VM_TYPES={mask:#x} on "
                    f"{where(kvm)}")
