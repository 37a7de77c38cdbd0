"""Kernel profiles: what the emulated KVM presents (caps, VM types, guest_memfd flags, errnos).

A profile is data, never a version check scattered through the code: everything that differs
between kernels lives here. ``upstream`` models 6.18+ with KVM_X86_SW_PROTECTED_VM built in and
the TDP MMU enabled; ``7.3`` is the newest kernel CI boots (7.3.4): every answer checked against
the real kernel in the VM stage (ci/compare-profiles, docs/running.md); ``6.12`` models v6.12 (no guest_memfd mmap, gmem binding only on VM types
with private memory, EINVAL for overlapping guest_memfd bindings); ``host`` mirrors this
machine's real KVM, probed at run time above the seam (kvmpy.caps.probe_profile).

KVM_CHECK_EXTENSION answers only for the capabilities in :data:`MODELLED_CAPS`; every other
capability is 0, so tests needing it skip exactly as on a kernel without it.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from collections.abc import Mapping

from ...uapi import (
    Cap,
    GuestMemfdFlag,
    MemoryAttribute,
    VmType,
)

#: VM types the emulator can run (KVM_X86_DEFAULT_VM, KVM_X86_SW_PROTECTED_VM).
MODELLED_VM_TYPES = (1 << VmType.DEFAULT) | (1 << VmType.SW_PROTECTED)

#: Capabilities whose semantics the emulator implements. Everything else answers 0.
MODELLED_CAPS: frozenset[int] = frozenset({
    Cap.IRQCHIP, Cap.HLT, Cap.USER_MEMORY, Cap.SET_TSS_ADDR, Cap.EXT_CPUID, Cap.NR_VCPUS,
    Cap.NR_MEMSLOTS, Cap.SYNC_MMU, Cap.MAX_VCPUS, Cap.READONLY_MEM, Cap.CHECK_EXTENSION_VM,
    Cap.IMMEDIATE_EXIT, Cap.EXIT_HYPERCALL, Cap.USER_MEMORY2, Cap.MEMORY_FAULT_INFO,
    Cap.MEMORY_ATTRIBUTES, Cap.GUEST_MEMFD, Cap.VM_TYPES, Cap.PRE_FAULT_MEMORY,
    Cap.GUEST_MEMFD_FLAGS, Cap.DISABLE_QUIRKS2,
    # MULTI_ADDRESS_SPACE: memslots in address space 1 (memslots.py); X86_SMM: KVM_SMI, SMM
    # entry and RSM (emu/vcpu.py, x86/smm.py).
    Cap.X86_SMM, Cap.MULTI_ADDRESS_SPACE,
})

KVM_HC_MAP_GPA_RANGE_BIT = 1 << 12
# KVM_CAP_DISABLE_QUIRKS2 = kvm_caps.supported_quirks, from arch/x86/include/asm/kvm_host.h
# KVM_X86_VALID_QUIRKS: 6.12.117 has bits 0-10 (LINT0_REENABLED .. VMCS12_ALLOW_FREEZE_IN_SMM);
# 7.3.4 answers 0xfff (one more quirk, bit 11; measured in the CI VM, results/vm-7.3/
# profile.json). x86.c kvm_x86_vendor_init() drops IGNORE_GUEST_PAT only without TDP (and vmx.c
# on Intel without self-snoop): the AMD NPT kernels CI runs keep every bit.
KVM_X86_VALID_QUIRKS_6_12 = 0x7FF
KVM_X86_VALID_QUIRKS_7_3 = 0xFFF
KVM_USER_MEM_SLOTS = 32764          # x86: KVM_MEM_SLOTS_NUM (32767) - 3 private slots
KVM_MAX_VCPUS = 1024
KVM_MAX_VCPU_IDS = 4096
KVM_MAX_CPUID_ENTRIES = 256
VCPU_MMAP_SIZE = 3 * 4096           # kvm_run page, PIO data page, coalesced MMIO page

GUEST_MEMFD_MAGIC = 0x474D454D    # include/uapi/linux/magic.h: "GMEM"
ANON_INODE_FS_MAGIC = 0x09041934


@dataclasses.dataclass(frozen=True)
class Profile:
    """One kernel as the emulator presents it."""

    name: str
    description: str
    #: KVM_CAP_VM_TYPES (only modelled types).
    vm_types: int
    #: KVM_CHECK_EXTENSION on /dev/kvm.
    system_caps: Mapping[int, int]
    #: KVM_CHECK_EXTENSION on a VM fd, per VM type.
    vm_caps: Mapping[int, Mapping[int, int]]
    #: Valid KVM_CREATE_GUEST_MEMFD flags per VM type (api.rst 4.141).
    gmem_flags: Mapping[int, int]
    #: VM types whose memslots accept KVM_MEM_GUEST_MEMFD (6.12: private-memory VMs only).
    gmem_slot_vm_types: int
    #: False: KVM_SET_MEMORY_ATTRIBUTES is not compiled in (ENOTTY).
    memory_attributes_ioctl: bool
    #: Binding a guest_memfd range that overlaps an existing binding (EINVAL on 6.12,
    #: EEXIST in newer upstream).
    gmem_overlap_errno: int
    #: read/write/pread/pwrite on a guest_memfd (no read_iter/write_iter: EINVAL).
    gmem_rw_errno: int = errno.EINVAL
    #: pread/pwrite on a guest_memfd (the file is not FMODE_PREAD/PWRITE: ESPIPE).
    gmem_prw_errno: int = errno.ESPIPE
    #: mmap of a guest_memfd created without GUEST_MEMFD_FLAG_MMAP.
    gmem_mmap_noflag_errno: int = errno.ENODEV
    #: The guest_memfd mount is noexec (7.3 virt/kvm/guest_memfd.c kvm_gmem_init_mount():
    #: MNT_NOEXEC), so do_mmap() refuses PROT_EXEC with EPERM before f_op->mmap. 6.12's
    #: anon_inode mount is not (fs/libfs.c init_pseudo() sets no SB_I_NOEXEC there).
    gmem_noexec: bool = True
    #: fstatfs(2) f_type of a guest_memfd: 7.3 has its own pseudo-filesystem
    #: (virt/kvm/guest_memfd.c kvm_gmem_init_fs_context(): init_pseudo(fc, GUEST_MEMFD_MAGIC));
    #: 6.12..6.18 made the file with anon_inode_create_getfile() (ANON_INODE_FS_MAGIC, measured
    #: on 6.18 here). include/uapi/linux/magic.h.
    gmem_fs_magic: int = ANON_INODE_FS_MAGIC
    #: CONFIG_MEMORY_FAILURE: MADV_HWPOISON of a guest_memfd page is modelled (the CI's 7.3.4
    #: config has it, its 6.12.117 config not: there MADV_HWPOISON is EINVAL).
    memory_failure: bool = True
    #: madvise(MADV_COLLAPSE) on a guest_memfd mapping.
    gmem_collapse_errno: int = errno.EINVAL
    #: KVM_PRE_FAULT_MEMORY when the VM cannot pre-fault (cap 0) but the ioctl exists.
    pre_fault_absent_errno: int = errno.EOPNOTSUPP
    #: kvm_mmu_max_gfn(): memslots must end below 1 << max_gpa_bits.
    max_gpa_bits: int = 52
    #: A plain OUT that exits (KVM_EXIT_IO) reports RIP at the OUT; the next KVM_RUN skips it
    #: (x86.c kvm_fast_pio_out() -> complete_fast_pio_out(), reached from svm.c
    #: io_interception() / vmx.c handle_io()), but for port 0x7e with
    #: KVM_X86_QUIRK_OUT_7E_INC_RIP. False: RIP after the OUT at the exit, as the out-of-tree
    #: kvm_pvm does (its instruction emulator retires every OUT). Behaviour, not a capability:
    #: not in profile_answers(), so ci/compare-profiles does not compare it.
    out_exit_rip_at_insn: bool = True
    #: Whether a guest_memfd slot may pass userspace_addr 0 (not validated by KVM at all).
    extra: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def cap(self, cap: int, vm_type: int | None = None) -> int:
        """KVM_CHECK_EXTENSION answer (0 for anything not modelled)."""
        if cap not in MODELLED_CAPS:
            return 0
        table = self.system_caps if vm_type is None else self.vm_caps.get(vm_type, {})
        return int(table.get(cap, 0))

    def nr_memslots(self) -> int:
        return self.cap(Cap.NR_MEMSLOTS) or KVM_USER_MEM_SLOTS


def _upstream() -> Profile:
    base: dict[int, int] = {
        Cap.IRQCHIP: 1, Cap.HLT: 1, Cap.USER_MEMORY: 1, Cap.SET_TSS_ADDR: 1,
        Cap.EXT_CPUID: 1, Cap.NR_VCPUS: min(os.cpu_count() or 1, KVM_MAX_VCPUS),
        Cap.NR_MEMSLOTS: KVM_USER_MEM_SLOTS, Cap.SYNC_MMU: 1, Cap.MAX_VCPUS: KVM_MAX_VCPUS,
        Cap.READONLY_MEM: 1, Cap.CHECK_EXTENSION_VM: 1, Cap.IMMEDIATE_EXIT: 1,
        # api.rst 7.37 KVM_CAP_EXIT_HYPERCALL: bitmask of hypercalls that can exit.
        Cap.EXIT_HYPERCALL: KVM_HC_MAP_GPA_RANGE_BIT,
        Cap.USER_MEMORY2: 1, Cap.MEMORY_FAULT_INFO: 1, Cap.GUEST_MEMFD: 1,
        Cap.VM_TYPES: MODELLED_VM_TYPES,
        # x86 reports PRE_FAULT_MEMORY with the TDP MMU (tdp_enabled).
        Cap.PRE_FAULT_MEMORY: 1,
        # x86.c kvm_vm_ioctl_check_extension(): kvm_caps.supported_quirks, the same on
        # /dev/kvm and every VM type.
        Cap.DISABLE_QUIRKS2: KVM_X86_VALID_QUIRKS_7_3,
        # kvm_vm_ioctl_check_extension(): CONFIG_KVM_SMM and svm_has_emulated_msr(SMBASE),
        # true but for SEV-ES VMs (not modelled), so on both VM types and /dev/kvm.
        Cap.X86_SMM: 1,
    }
    both = int(GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED)
    # kvm_supported_mem_attributes(): PRIVATE when kvm is NULL (/dev/kvm) or the VM has
    # private memory. INIT_SHARED is refused for VMs with private memory
    # (kvm_arch_supports_gmem_init_shared() is !kvm_arch_has_private_mem() on x86).
    # KVM_CAP_MULTI_ADDRESS_SPACE (kvm_main.c, x86 with CONFIG_KVM_SMM): KVM_MAX_NR_ADDRESS_SPACES
    # (2) on /dev/kvm, kvm_arch_nr_memslot_as_ids() on a VM: 1 with private memory, else 2.
    system: dict[int, int] = {**base, Cap.MEMORY_ATTRIBUTES: int(MemoryAttribute.PRIVATE),
                              Cap.GUEST_MEMFD_FLAGS: both, Cap.MULTI_ADDRESS_SPACE: 2}
    default_vm: dict[int, int] = {**base, Cap.MEMORY_ATTRIBUTES: 0, Cap.GUEST_MEMFD_FLAGS: both,
                                  Cap.MULTI_ADDRESS_SPACE: 2}
    sw_vm: dict[int, int] = {**base, Cap.MEMORY_ATTRIBUTES: int(MemoryAttribute.PRIVATE),
             Cap.GUEST_MEMFD_FLAGS: int(GuestMemfdFlag.MMAP), Cap.MULTI_ADDRESS_SPACE: 1}
    return Profile(
        name="upstream",
        description="upstream 6.18+ (SW_PROTECTED VMs, memory attributes, guest_memfd "
                    "MMAP|INIT_SHARED, EXIT_HYPERCALL, PRE_FAULT_MEMORY)",
        vm_types=MODELLED_VM_TYPES,
        system_caps=system,
        vm_caps={int(VmType.DEFAULT): default_vm, int(VmType.SW_PROTECTED): sw_vm},
        gmem_flags={VmType.DEFAULT: both, VmType.SW_PROTECTED: int(GuestMemfdFlag.MMAP)},
        gmem_slot_vm_types=MODELLED_VM_TYPES,
        memory_attributes_ioctl=True,
        # set_memory_region_test (newest upstream) expects EEXIST for overlapping bindings.
        gmem_overlap_errno=errno.EEXIST,
        # With TDP, kvm_mmu_max_gfn() is the host's MAXPHYADDR; here: the emulated CPU's
        # (QEMU TCG / unicorn: 40 bits), so CPUID 0x80000008 and the memslot limit agree.
        max_gpa_bits=40,
    )


def _v6_12() -> Profile:
    up = _upstream()
    system = {k: v for k, v in up.system_caps.items() if k != Cap.GUEST_MEMFD_FLAGS}
    default_vm = {k: v for k, v in up.vm_caps[VmType.DEFAULT].items()
                  if k != Cap.GUEST_MEMFD_FLAGS}
    # 6.12: KVM_CAP_GUEST_MEMFD is "!kvm || kvm_arch_has_private_mem(kvm)".
    default_vm[Cap.GUEST_MEMFD] = 0
    system[Cap.DISABLE_QUIRKS2] = default_vm[Cap.DISABLE_QUIRKS2] = KVM_X86_VALID_QUIRKS_6_12
    sw_vm = {k: v for k, v in up.vm_caps[VmType.SW_PROTECTED].items()
             if k != Cap.GUEST_MEMFD_FLAGS}
    sw_vm[Cap.DISABLE_QUIRKS2] = KVM_X86_VALID_QUIRKS_6_12
    return dataclasses.replace(
        up, name="6.12",
        description="v6.12 (SW_PROTECTED VMs, memory attributes; no guest_memfd flags)",
        system_caps=system,
        vm_caps={VmType.DEFAULT: default_vm, VmType.SW_PROTECTED: sw_vm},
        gmem_flags={VmType.DEFAULT: 0, VmType.SW_PROTECTED: 0},
        gmem_slot_vm_types=1 << VmType.SW_PROTECTED,
        gmem_overlap_errno=errno.EINVAL,
        gmem_noexec=False,
        memory_failure=False,
    )


def _v7_3() -> Profile:
    # Linux 7.3.4 (Debian's linux-source-7.3) answers exactly as the upstream model: VM types
    # 0x3, guest_memfd on both VM types with MMAP|INIT_SHARED on DEFAULT and MMAP on
    # SW_PROTECTED VMs, PRIVATE attributes on SW_PROTECTED VMs only, EEXIST for overlapping
    # bindings (measured: ../shared/kernels/linux-7.3.4-sw-protected/README.md, and in every CI
    # run by ci/compare-profiles against probe_host() inside the VM).
    return dataclasses.replace(
        _upstream(), name="7.3", gmem_fs_magic=GUEST_MEMFD_MAGIC,
        description="v7.3 (as upstream: SW_PROTECTED VMs, memory attributes, guest_memfd "
                    "MMAP|INIT_SHARED on DEFAULT VMs, MMAP on SW_PROTECTED VMs)")


#: The profiles the CLI and pytest options offer (kvmpy/backend/select.py EMU_PROFILES mirrors
#: this, and tests/test_cli_bad_input.py checks they are equal). CI compares 7.3.4 with "7.3".
PROFILES = ("upstream", "7.3", "6.12", "host")
KNOWN_PROFILES = PROFILES


def get_profile(name: str) -> Profile:
    """A profile by name: "upstream" (default), "7.3" or "6.12" ("host" is built from a real
    kernel by kvmpy.caps.probe_profile)."""
    if name == "upstream":
        return _upstream()
    if name == "7.3":
        return _v7_3()
    if name == "6.12":
        return _v6_12()
    if name == "host":
        # Probing a real kernel happens above the seam (the emulator imports no real backend).
        raise ValueError("the 'host' profile is probed by kvmpy.caps.probe_profile(); pass "
                         "EmuBackend(profile=probe_profile()) or make_backend('emu', 'host')")
    raise ValueError(f"unknown emulator profile {name!r} (one of {', '.join(PROFILES)})")


def profile_answers(p: Profile) -> dict[str, object]:
    """What a profile answers, as JSON-ready data keyed by names (capabilities by their Cap
    name, VM types by theirs), so a real kernel's answers (:func:`probe_host` in a VM) and an
    emulator profile's can be compared field by field (ci/compare-profiles)."""
    def caps(table: Mapping[int, int]) -> dict[str, int]:
        return {Cap(c).name: p.cap(c) if table is p.system_caps else int(table.get(c, 0))
                for c in sorted(MODELLED_CAPS)}

    return {
        "name": p.name,
        "vm_types": p.vm_types,
        "system_caps": caps(p.system_caps),
        "vm_caps": {VmType(t).name: caps(v) for t, v in sorted(p.vm_caps.items())},
        "gmem_flags": {VmType(t).name: int(v) for t, v in sorted(p.gmem_flags.items())},
        "gmem_slot_vm_types": p.gmem_slot_vm_types,
        "memory_attributes_ioctl": p.memory_attributes_ioctl,
        "errnos": {k: errno.errorcode.get(v, str(v)) if v else "0" for k, v in (
            ("gmem_overlap", p.gmem_overlap_errno), ("gmem_rw", p.gmem_rw_errno),
            ("gmem_prw", p.gmem_prw_errno), ("gmem_mmap_noflag", p.gmem_mmap_noflag_errno),
            ("gmem_collapse", p.gmem_collapse_errno),
            # Only meaningful where pre-faulting is absent: probe_host() measures a pre-fault
            # without memslot, which a capable kernel answers with ENOENT.
            *((("pre_fault_absent", p.pre_fault_absent_errno),)
              if not p.cap(Cap.PRE_FAULT_MEMORY) else ()))},
        "max_gpa_bits": p.max_gpa_bits,
    }


__all__ = ["KNOWN_PROFILES", "MODELLED_CAPS", "PROFILES", "Profile", "get_profile",
           "profile_answers"]
