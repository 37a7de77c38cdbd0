"""The capability report: what a KVM (real or emulated) offers and what that enables in the suite."""

from __future__ import annotations

import dataclasses
import errno
import platform
import sys
from typing import TYPE_CHECKING, Any

from .backend import Backend
from .errors import KvmError, KvmUnavailable
from .system import Kvm
from .uapi import Cap, GuestMemfdFlag, MemFlag, VmType, kvm_pre_fault_memory
from .vm import Vm

if TYPE_CHECKING:
    from .backend.emu.profiles import Profile

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


# --- a kernel's answers as an emulator profile -------------------------------------------------
# The emulator's profiles (kvmpy/backend/emu/profiles.py) are the record of what each kernel
# answers; this probes a real kernel for the same fields, with the object layer, so the
# emulator can mirror it ("host" profile) and CI can compare a kernel under test with the
# profile of its name (ci/compare-profiles). The emulator itself never imports a real backend.

#: An hva KVM never touches during these probes (page aligned, below TASK_SIZE).
_PROBE_HVA = 0x7F00_0000_0000
_MADV_COLLAPSE = 25


def probe_profile(backend: Backend | None = None) -> Profile:
    """This machine's KVM (``backend``: real KVM by default) as an emulator Profile: caps on
    /dev/kvm and per modelled VM type, valid guest_memfd flags (each bit tried), whether
    GUEST_MEMFD slots bind, the overlap errno, attribute ioctl presence, file errnos, max GPA."""
    from .backend.emu.profiles import MODELLED_CAPS, MODELLED_VM_TYPES, Profile

    try:
        kvm = Kvm(backend)
    except KvmUnavailable as e:
        raise HostProbeError(f"probing a kernel profile needs real KVM: {e}") from e
    with kvm:
        system = {int(c): kvm.check_extension(c) for c in MODELLED_CAPS}
        raw_types = system.get(Cap.VM_TYPES, 0)
        vm_types = (raw_types or 1) & MODELLED_VM_TYPES
        system[Cap.VM_TYPES] = vm_types if raw_types else 0
        p: dict[str, Any] = dict(vm_caps={}, gmem_flags={}, gmem_slot_vm_types=0,
                                 memory_attributes_ioctl=True, gmem_overlap_errno=errno.EINVAL,
                                 gmem_rw_errno=errno.EINVAL, gmem_prw_errno=errno.ESPIPE,
                                 gmem_mmap_noflag_errno=errno.ENODEV,
                                 gmem_collapse_errno=errno.EINVAL,
                                 pre_fault_absent_errno=errno.EOPNOTSUPP, max_gpa_bits=52)
        for t in VmType.from_mask(vm_types):
            if kvm.try_create_vm(t):
                continue
            with kvm.create_vm(t) as vm:
                caps = {int(c): vm.check_extension(c) for c in MODELLED_CAPS}
                p["vm_caps"][int(t)] = caps
                flags = 0
                if caps.get(Cap.GUEST_MEMFD):
                    flags = sum(1 << b for b in range(64)
                                if not vm.try_create_guest_memfd(4096, 1 << b))
                    _probe_gmem(vm, flags, p)
                p["gmem_flags"][int(t)] = flags
                if vm.try_set_memory_attributes(0, 0, 0) == errno.ENOTTY:
                    p["memory_attributes_ioctl"] = False
                if t == VmType.DEFAULT:
                    p["max_gpa_bits"] = _probe_max_gpa_bits(vm)
                    p["out_exit_rip_at_insn"] = _probe_out_rip(vm)
                    with vm.create_vcpu(0) as v:
                        pf = v.try_pre_fault_memory(kvm_pre_fault_memory(gpa=0, size=4096))
                    if pf:
                        p["pre_fault_absent_errno"] = int(pf)
    from .backend.host import kvm_module

    module = kvm_module()
    return Profile(name="host", description=f"mirror of this machine's KVM ({module}, probed)",
                   vm_types=vm_types, system_caps=system, extra={"module": module}, **p)


def _probe_gmem(vm: Vm, flags: int, p: dict[str, Any]) -> None:
    """The guest_memfd file's errnos, and whether (and with which overlap errno) slots bind."""
    with vm.create_guest_memfd(4 * 4096) as g:
        p["gmem_rw_errno"], p["gmem_prw_errno"] = int(g.try_read()), int(g.try_pread())
        p["gmem_mmap_noflag_errno"] = int(g.try_mmap(4096))
        g2 = MemFlag.GUEST_MEMFD
        if not vm.try_set_user_memory_region2(0, g2, 1 << 32, 8192, _PROBE_HVA, g, 0):
            p["gmem_slot_vm_types"] |= 1 << vm.type
            p["gmem_overlap_errno"] = int(vm.try_set_user_memory_region2(
                1, g2, (1 << 32) + (1 << 20), 8192, _PROBE_HVA, g, 4096))
            for slot in (0, 1):
                if slot in vm.memslots:
                    vm.delete_memslot(slot)
    mm = int(GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED)
    if flags & mm == mm:
        with vm.create_guest_memfd(2 << 20, mm) as g, g.mmap() as m:
            try:
                vm.backend.madvise(m.addr, m.length, _MADV_COLLAPSE)
                p["gmem_collapse_errno"] = 0
            except OSError as e:
                p["gmem_collapse_errno"] = e.errno or 0


#: The OUT probe's real-mode code at gpa 0: "out 0x80, al; hlt".
_OUT_PROBE_CODE = bytes([0xE6, 0x80, 0xF4])


def _probe_out_rip(vm: Vm) -> bool:
    """Whether a plain OUT exit reports RIP at the OUT (profiles.py out_exit_rip_at_insn).

    Measured, not inferred from the vendor module: a real-mode vCPU (the reset mode, so no
    CPUID or page tables) runs the OUT, and KVM_GET_REGS at the exit tells. A few ms on this
    host, and right for any module, including the kernel under test in the CI VM. If the
    guest does not reach the OUT exit (a KVM that cannot run real mode), fall back to the
    only module known to differ, kvm_pvm (RIP after the OUT)."""
    from .backend.host import kvm_module
    from .memory import anonymous
    from .uapi import ExitReason, IoDirection

    slot = max(vm.memslots, default=-1) + 1
    with anonymous(vm.backend, 4096, "OUT probe") as m:
        m.write(0, _OUT_PROBE_CODE)
        vm.set_user_memory_region(slot, 0, 0, 4096, m.addr)
        try:
            with vm.create_vcpu(1) as v:
                s = v.get_sregs()
                s.cs.base = s.cs.selector = 0
                v.set_sregs(s)
                r = v.get_regs()
                r.rip, r.rflags = 0, 2
                v.set_regs(r)
                ex = v.run()
                if ex.reason == ExitReason.IO and ex.io is not None and \
                        ex.io.direction == IoDirection.OUT and ex.io.port == 0x80:
                    return int(v.get_regs().rip) == 0
        except KvmError:
            pass
        finally:
            vm.set_user_memory_region(slot, 0, 0, 0, 0)
    return "kvm_pvm" not in kvm_module().split(",")


def _probe_max_gpa_bits(vm: Vm) -> int:
    """The largest b such that a one-page slot ending at 1 << b is accepted."""
    best = 32
    for bits in range(33, 65):
        if not vm.try_set_user_memory_region(0, 0, (1 << bits) - 4096, 4096, _PROBE_HVA):
            vm.set_user_memory_region(0, 0, (1 << bits) - 4096, 0, _PROBE_HVA)
            best = bits
    return best


class HostProbeError(RuntimeError):
    """A kernel profile could not be probed (no usable /dev/kvm)."""


def main(argv: list[str] | None = None) -> int:
    """``python -m kvmpy.caps --profile NAME``: a profile's answers as JSON (profile_answers);
    NAME "host" probes this machine's /dev/kvm (what the VM stage records for the kernel under
    test), any other name is an emulator profile."""
    import argparse
    import json

    from .backend.emu.profiles import PROFILES, get_profile, profile_answers

    ap = argparse.ArgumentParser(prog="python -m kvmpy.caps")
    ap.add_argument("--profile", required=True, choices=PROFILES)
    a = ap.parse_args(argv)
    try:
        prof = probe_profile() if a.profile == "host" else get_profile(a.profile)
    except HostProbeError as e:
        print(f"kvmpy.caps: {e}", file=sys.stderr)
        return 1
    print(json.dumps(profile_answers(prof), indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
