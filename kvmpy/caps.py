"""The capability report: what a KVM (real or emulated) offers and what that enables in the suite."""

from __future__ import annotations

import dataclasses
import platform
from typing import Any

from .backend import Backend
from .errors import KvmError
from .system import Kvm
from .uapi import Cap, GuestMemfdFlag, VmType

#: Capabilities the mission cares about, with what each enables in the suite.
CAPS_OF_INTEREST: dict[Cap, str] = {
    Cap.USER_MEMORY: "memslots (KVM_SET_USER_MEMORY_REGION)",
    Cap.NR_MEMSLOTS: "max-memslots test",
    Cap.READONLY_MEM: "KVM_MEM_READONLY flag cases",
    Cap.CHECK_EXTENSION_VM: "per-VM-type capability checks",
    Cap.IMMEDIATE_EXIT: "PIO completion and watchdog (immediate_exit)",
    Cap.SYNC_REGS: "sync regs",
    Cap.DISABLE_QUIRKS2: "slot-zap quirk cases of set_memory_region_test",
    Cap.EXIT_HYPERCALL: "KVM_HC_MAP_GPA_RANGE exits (conversion tests)",
    Cap.USER_MEMORY2: "KVM_SET_USER_MEMORY_REGION2",
    Cap.MEMORY_FAULT_INFO: "KVM_EXIT_MEMORY_FAULT details",
    Cap.MEMORY_ATTRIBUTES: "KVM_SET_MEMORY_ATTRIBUTES, private memory, conversions",
    Cap.GUEST_MEMFD: "KVM_CREATE_GUEST_MEMFD and guest_memfd memslots",
    Cap.VM_TYPES: "VM types (KVM_X86_SW_PROTECTED_VM for private-memory tests)",
    Cap.PRE_FAULT_MEMORY: "KVM_PRE_FAULT_MEMORY tests",
    Cap.GUEST_MEMFD_FLAGS: "guest_memfd mmap cases (MMAP, INIT_SHARED)",
}


@dataclasses.dataclass
class CapReport:
    backend: str
    kernel: str
    api_version: int
    system: dict[str, int]
    vm: dict[str, dict[str, int]]
    vm_types: list[str]
    guest_memfd_flags: int

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["guest_memfd_flags_names"] = _flag_names(self.guest_memfd_flags)
        # "vm" maps cap names to values on the first (DEFAULT) VM type; per-type under vm_by_type.
        d["vm_by_type"] = d.pop("vm")
        first = next(iter(self.vm.values()), {})
        d["vm"] = dict(first)
        d["enables"] = {f"KVM_CAP_{c.name}": what for c, what in CAPS_OF_INTEREST.items()}
        return d


def _flag_names(flags: int) -> list[str]:
    return [f"GUEST_MEMFD_FLAG_{f.name}" for f in GuestMemfdFlag if f and flags & f]


def probe(backend: Backend | None = None) -> CapReport:
    """Query /dev/kvm and one VM of each offered type."""
    with Kvm(backend) as kvm:
        system = {f"KVM_CAP_{c.name}": kvm.check_extension(c) for c in CAPS_OF_INTEREST}
        types = kvm.vm_types()
        vm_caps: dict[str, dict[str, int]] = {}
        gmem_flags = 0
        for t in types:
            try:
                with kvm.create_vm(t) as vm:
                    caps = {f"KVM_CAP_{c.name}": vm.check_extension(c) for c in CAPS_OF_INTEREST}
            except KvmError as e:
                caps = {"error": e.errno or -1}
            vm_caps[f"KVM_X86_{t.name}_VM"] = caps
            if t == VmType.DEFAULT:
                gmem_flags = caps.get("KVM_CAP_GUEST_MEMFD_FLAGS", 0)
        return CapReport(
            backend=kvm.backend.describe(),
            kernel=platform.release(),
            api_version=kvm.get_api_version(),
            system=system,
            vm=vm_caps,
            vm_types=[f"KVM_X86_{t.name}_VM" for t in types],
            guest_memfd_flags=gmem_flags,
        )
