"""Capability requirements: skip (never fail) with the capability's name and value."""

from __future__ import annotations

import pytest

from ..system import Kvm
from ..uapi import Cap, VmType
from ..vm import Vm


def where(obj: Kvm | Vm) -> str:
    b = obj.backend
    if isinstance(obj, Vm):
        return f"a KVM_X86_{VmType(obj.type).name}_VM on {b.describe()}"
    return b.describe()


def require_cap(obj: Kvm | Vm, cap: Cap, mask: int | None = None) -> int:
    """Skip unless KVM_CHECK_EXTENSION(cap) is non-zero (and has every bit of ``mask``)."""
    val = obj.check_extension(cap)
    if not val or (mask is not None and (val & mask) != mask):
        need = f" (need bits {mask:#x})" if mask is not None else ""
        pytest.skip(f"KVM_CAP_{cap.name}={val:#x}{need} on {where(obj)}")
    return val


def require_vm_type(kvm: Kvm, vm_type: VmType) -> None:
    """Skip unless KVM_CAP_VM_TYPES offers ``vm_type``."""
    mask = kvm.check_extension(Cap.VM_TYPES)
    if not mask & (1 << vm_type):
        pytest.skip(f"KVM_X86_{vm_type.name}_VM not in KVM_CAP_VM_TYPES={mask:#x} on "
                    f"{where(kvm)}")
