"""The emulated vCPU's architectural state: KVM_GET/SET_REGS, KVM_GET/SET_SREGS (with
__set_sregs()'s validity checks), KVM_SET/GET_CPUID2 and the guest's CPUID answers
(kvm_cpuid()), KVM_GET/SET_MP_STATE, and the CR/EFER/MSR constants the intercepts check
(arch/x86/kvm/x86.c, cpuid.c). A base of EmuVcpu (vcpu.py); docs/emulator.md, "vCPU"."""

from __future__ import annotations

import ctypes
import errno
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from unicorn import x86_const as X

from ...uapi import Cap, MpState, kvm_cpuid2, kvm_cpuid_entry2, kvm_regs, kvm_segment, kvm_sregs
from ..libc import copy_from_user, copy_to_user
from .x86 import engine as E

if TYPE_CHECKING:
    from .vm import EmuVm
    from .x86.physmem import PhysMap

MASK64 = (1 << 64) - 1
HDR, ENT = ctypes.sizeof(kvm_cpuid2), ctypes.sizeof(kvm_cpuid_entry2)   # kvm_cpuid2 + entries[]
KVM_MAX_CPUID_ENTRIES = 256
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1

CR0_PE, CR0_TS, CR0_ET, CR0_NW, CR0_CD, CR0_PG = 1, 1 << 3, 1 << 4, 1 << 29, 1 << 30, 1 << 31
CR4_PAE, CR4_LA57, CR4_PCIDE = 1 << 5, 1 << 12, 1 << 17
EFER_SCE, EFER_LME, EFER_LMA, EFER_NXE = 1, 1 << 8, 1 << 10, 1 << 11
# MSRs the emulated vCPU answers (arch/x86/include/asm/msr-index.h); every other RDMSR/WRMSR is
# #GP(0) and stops a KVM_GET/SET_MSRS batch. MSR_IA32_TSC is guest-readable (unicorn reads it as
# 0 and drops writes) but not offered to KVM_GET/SET_MSRS, whose callers expect a running clock.
MSR_TSC, MSR_APIC_BASE = 0x10, 0x1B
MSR_SYSENTER_CS, MSR_SYSENTER_ESP, MSR_SYSENTER_EIP = 0x174, 0x175, 0x176
MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SFMASK, MSR_PAT = (0xC0000081, 0xC0000082, 0xC0000083,
                                                       0xC0000084, 0x277)
MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS_BASE, MSR_TSC_AUX = (0xC0000100, 0xC0000101,
                                                             0xC0000102, 0xC0000103)
MODELLED_MSRS = frozenset({MSR_TSC, MSR_APIC_BASE, MSR_SYSENTER_CS, MSR_SYSENTER_ESP,
                           MSR_SYSENTER_EIP, MSR_PAT, 0xC0000080, MSR_STAR, MSR_LSTAR,
                           MSR_CSTAR, MSR_SFMASK, MSR_FS_BASE, MSR_GS_BASE,
                           MSR_KERNEL_GS_BASE, MSR_TSC_AUX})
HOST_MSRS = MODELLED_MSRS - {MSR_TSC}
MSR_SMBASE = 0x9E               # userspace only, with KVM_CAP_X86_SMM (x86/smm.py)
SMM_SEGMENT_MSRS = frozenset({0xC0000080, MSR_FS_BASE, MSR_GS_BASE})
CAP_X86_SMM = int(Cap.X86_SMM)
# __kvm_set_msr(): a non-canonical value is refused for these (is_noncanonical_msr_address();
# 48 bits: the emulated CPU has no LA57) ...
CANONICAL_MSRS = frozenset({MSR_LSTAR, MSR_CSTAR, MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS_BASE})
# ... and made canonical for these (__canonical_address(data, max_host_virt_addr_bits())).
CANONICALIZED_MSRS = frozenset({MSR_SYSENTER_ESP, MSR_SYSENTER_EIP})
APIC_BASE_BSP, APIC_BASE_EXTD, APIC_BASE_EN = 1 << 8, 1 << 10, 1 << 11
INTEL_VENDORS = ((0x756E6547, 0x6C65746E, 0x49656E69),      # GenuineIntel (ebx, ecx, edx)
                 (0x746E6543, 0x736C7561, 0x48727561),      # CentaurHauls
                 (0x68532020, 0x20206961, 0x68676E61))      # "  Shanghai  "


def _canonical(va: int) -> bool:
    top = va >> 47
    return top in (0, (1 << 17) - 1)


def _sign_extend48(v: int) -> int:
    v &= (1 << 48) - 1
    return v | (MASK64 ^ ((1 << 48) - 1)) if v >> 47 else v


MAX_IO_MSRS = 256
RFLAGS_FIXED = 0x2
RFLAGS_RF = 1 << 16

# CR4 bits KVM knows at all (arch/x86/include/asm/kvm_host.h CR4_RESERVED_BITS), and the
# CPUID feature each CPUID-dependent bit needs (__cr4_reserved_bits()): (leaf, reg, bit).
CR4_KNOWN = sum(1 << b for b in (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 16, 17, 18,
                                 20, 21, 22, 23, 24, 28))
CR4_NEEDS = {12: (7, "ecx", 16), 16: (7, "ebx", 0), 17: (1, "ecx", 17), 18: (1, "ecx", 26),
             20: (7, "ebx", 7), 21: (7, "ebx", 20), 22: (7, "ecx", 3)}

def _reset_sregs(vcpu_id: int) -> kvm_sregs:
    """KVM's reset state (kvm_vcpu_reset(), measured with KVM_GET_SREGS on a new vCPU)."""
    s = kvm_sregs()
    s.cs = kvm_segment(base=0xFFFF0000, limit=0xFFFF, selector=0xF000, type=0xB, present=1, s=1)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(s, name, kvm_segment(limit=0xFFFF, type=3, present=1, s=1))
    s.tr = kvm_segment(limit=0xFFFF, type=0xB, present=1)
    s.ldt = kvm_segment(limit=0xFFFF, type=2, present=1)
    s.gdt.limit = 0xFFFF
    s.idt.limit = 0xFFFF
    s.cr0 = 0x60000010
    s.apic_base = 0xFEE00900 if vcpu_id == 0 else 0xFEE00800
    return s


class VcpuCpuState:
    """Registers, segment/control state, CPUID table and MP state of one EmuVcpu."""

    vm: EmuVm
    uc: Any
    regs: E.FastRegs
    phys: PhysMap
    _sregs: kvm_sregs
    _mode_problem: str | None
    _loaded_fs: int
    _loaded_gs: int
    _cpuid: list[kvm_cpuid_entry2]
    _ran: bool
    _mp_state: int
    _pending_event: Any
    _rf_possible: bool
    trace: E.BlockTrace
    _smbase: int
    _smm: Any
    _smm_view: Callable[[], kvm_sregs]      # EmuVcpu's: KVM_GET_SREGS in SMM

    # ================================================================ registers
    def _get_regs(self) -> kvm_regs:
        return kvm_regs(*self.regs.read_gprs())

    def _set_regs(self, r: kvm_regs) -> None:
        # __set_regs(): RFLAGS bit 1 is forced; a pending exception is dropped.
        vals = [getattr(r, n) for n in E.REG_NAMES]
        vals[17] |= RFLAGS_FIXED
        self._rf_possible = bool(vals[17] & RFLAGS_RF)
        if vals[16] != self.regs.read(X.UC_X86_REG_RIP):
            # Userspace redirects the vCPU, perhaps to code it just (re)wrote through its own
            # mapping; unicorn does not see host writes to translated code, so start afresh.
            self.phys.flush_needed = True
            self.trace.forget()
        self.regs.write_gprs(vals)
        self._pending_event = None

    def _get_sregs(self) -> kvm_sregs:
        s = kvm_sregs.from_buffer_copy(self._sregs.to_bytes())
        if self._mode_problem is not None:
            return s
        uc = self.uc
        s.cr0, s.cr2, s.cr3, s.cr4 = uc.reg_read_batch(
            [X.UC_X86_REG_CR0, X.UC_X86_REG_CR2, X.UC_X86_REG_CR3, X.UC_X86_REG_CR4])
        s.efer = E.read_msr(uc, E.MSR_EFER)
        _, s.gdt.base, s.gdt.limit, _ = uc.reg_read(X.UC_X86_REG_GDTR)
        _, s.idt.base, s.idt.limit, _ = uc.reg_read(X.UC_X86_REG_IDTR)
        for name, reg in (("cs", X.UC_X86_REG_CS), ("ds", X.UC_X86_REG_DS),
                          ("es", X.UC_X86_REG_ES), ("ss", X.UC_X86_REG_SS)):
            getattr(s, name).selector = uc.reg_read(reg)
        fs, gs = uc.reg_read(X.UC_X86_REG_FS), uc.reg_read(X.UC_X86_REG_GS)
        if fs != self._loaded_fs:
            s.fs.selector = fs
        if gs != self._loaded_gs:
            s.gs.selector = gs
        s.fs.base = E.read_msr(uc, E.MSR_FS_BASE)
        s.gs.base = E.read_msr(uc, E.MSR_GS_BASE)
        tr = uc.reg_read(X.UC_X86_REG_TR)
        s.tr.selector, s.tr.base, s.tr.limit = tr[0], tr[1], tr[2]
        return s

    # ================================================================ MSRs
    def msr_get(self, idx: int, host: bool) -> int | None:
        """kvm_get_msr_common()/svm_get_msr() for the modelled MSRs; None = unsupported (the
        caller's #GP(0), or the end of a KVM_GET_MSRS batch). ``host``: KVM_GET_MSRS."""
        if idx == MSR_SMBASE:
            # Only userspace reads it, and only with CONFIG_KVM_SMM.
            return self._smbase if host and self._smm_capable() else None
        if self._smm is not None and idx in SMM_SEGMENT_MSRS:
            return self._smm_msr(idx)
        if idx not in (HOST_MSRS if host else MODELLED_MSRS):
            return None
        if idx == MSR_TSC_AUX and not host and not self._has_tsc_aux():
            return None
        if idx == MSR_APIC_BASE:
            return int(self._sregs.apic_base)
        if self._mode_problem is not None:
            # The engine is not loaded: EFER and the FS/GS bases live in the stored sregs.
            if idx == E.MSR_EFER:
                return int(self._sregs.efer)
            if idx in (MSR_FS_BASE, MSR_GS_BASE):
                return int((self._sregs.fs if idx == MSR_FS_BASE else self._sregs.gs).base)
        return E.read_msr(self.uc, idx)

    def msr_set(self, idx: int, v: int, host: bool) -> bool:
        """__kvm_set_msr() -> kvm_set_msr_common()/svm_set_msr() for the modelled MSRs: False
        where KVM returns non-zero (#GP(0) for the guest, the end of a KVM_SET_MSRS batch)."""
        if idx == MSR_SMBASE:
            if not (host and self._smm_capable()):
                return False
            self._smbase = v            # kvm_set_msr_common(): vcpu->arch.smbase = data
            return True
        if self._smm is not None and idx in SMM_SEGMENT_MSRS:
            raise OSError(errno.EINVAL, f"writing MSR {idx:#x} while the vCPU is in SMM is not "
                          "modelled by the emulated KVM")
        if idx not in (HOST_MSRS if host else MODELLED_MSRS):
            return False
        uc = self.uc
        if idx == E.MSR_EFER:
            old = self.msr_get(idx, True) or 0
            # set_efer(): efer_reserved_bits always (SCE, LME, LMA, NX: the emulated host's);
            # for the guest also __kvm_valid_efer() (NX needs CPUID NX) and no LME change while
            # paging. LMA is the vCPU's, whatever was written.
            allowed = EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE
            if not host and not self._cpuid_bit(0x80000001, "edx", 20):
                allowed &= ~EFER_NXE
            if v & ~allowed:
                return False
            if not host and (v ^ old) & EFER_LME and self._cr0() & CR0_PG:
                return False
            v = (v & ~EFER_LMA) | (old & EFER_LMA)
            if self._mode_problem is not None:
                self._sregs.efer = v
            else:
                E.write_msr(uc, idx, v)
                self.phys.flush_needed = True       # NX changes what the TBs may do
            return True
        if idx in CANONICAL_MSRS and not _canonical(v):
            return False
        if idx in CANONICALIZED_MSRS:
            v = _sign_extend48(v)
        if idx == MSR_PAT and any((v >> (8 * i)) & 0xFF not in (0, 1, 4, 5, 6, 7)
                                  for i in range(8)):
            return False                # kvm_pat_valid()
        if idx == MSR_TSC_AUX:
            # Needs RDTSCP/RDPID for the guest; bits 63:32 are reserved for an Intel-compatible
            # guest CPUID, else dropped.
            if not host and not self._has_tsc_aux():
                return False
            if v >> 32 and self._intel_compatible():
                return False
            v &= 0xFFFF_FFFF
        if idx == MSR_APIC_BASE:
            return self._set_apic_base(v, host)
        if self._mode_problem is not None and idx in (MSR_FS_BASE, MSR_GS_BASE):
            (self._sregs.fs if idx == MSR_FS_BASE else self._sregs.gs).base = v
            return True
        E.write_msr(uc, idx, v)
        return True

    def _set_apic_base(self, v: int, host: bool) -> bool:
        """kvm_apic_set_base() (lapic.c): reserved bits (MAXPHYADDR, 0x2ff, EXTD without CPUID
        x2APIC) and the invalid mode EXTD without EN refused; the guest may not go x2APIC ->
        xAPIC or disabled -> x2APIC."""
        rsvd = ((MASK64 << self._maxphyaddr()) & MASK64) | 0x2FF | (
            0 if self._cpuid_bit(1, "ecx", 21) else APIC_BASE_EXTD)
        mode = v & (APIC_BASE_EN | APIC_BASE_EXTD)
        if v & rsvd or mode == APIC_BASE_EXTD:
            return False
        old = self._sregs.apic_base & (APIC_BASE_EN | APIC_BASE_EXTD)
        x2 = APIC_BASE_EN | APIC_BASE_EXTD
        if not host and ((old == x2 and mode == APIC_BASE_EN) or (old == 0 and mode == x2)):
            return False
        self._sregs.apic_base = v
        return True

    def _smm_capable(self) -> bool:
        return bool(self.vm.profile.cap(CAP_X86_SMM, self.vm.type))

    def _smm_msr(self, idx: int) -> int:
        """EFER and the FS/GS bases in SMM: enter_smm() zeroed EFER and the segment bases; the
        handler's segment loads are read back from its engine."""
        if idx == E.MSR_EFER:
            return 0
        view = self._smm_view()
        return int((view.fs if idx == MSR_FS_BASE else view.gs).base)

    def _cr0(self) -> int:
        if self._mode_problem is not None:
            return int(self._sregs.cr0)
        return int(self.uc.reg_read(X.UC_X86_REG_CR0))

    def _has_tsc_aux(self) -> bool:
        return self._cpuid_bit(0x80000001, "edx", 27) or self._cpuid_bit(7, "ecx", 22)

    def _intel_compatible(self) -> bool:
        """guest_cpuid_is_intel_compatible(): the guest CPUID vendor (leaf 0)."""
        e = self._find_cpuid(0, 0)
        return e is not None and (e.ebx, e.ecx, e.edx) in INTEL_VENDORS

    def _msr_io(self, arg: int, write: bool) -> int:
        """KVM_GET_MSRS / KVM_SET_MSRS: msr_io() and __msr_io() (arch/x86/kvm/x86.c): E2BIG for
        nmsrs >= MAX_IO_MSRS, then each entry in turn until the first one that fails; returns
        how many were processed. A failed read zeroes that entry's data
        (kvm_do_msr_access()); KVM_GET_MSRS copies all entries back."""
        nmsrs = struct.unpack("<I", copy_from_user(arg, 4))[0]
        if nmsrs >= MAX_IO_MSRS:
            raise OSError(errno.E2BIG, f"{'KVM_SET_MSRS' if write else 'KVM_GET_MSRS'}: "
                          f"nmsrs {nmsrs} >= {MAX_IO_MSRS}")
        raw = bytearray(copy_from_user(arg + 8, 16 * nmsrs))
        done = 0
        for i in range(nmsrs):
            idx, _, data = struct.unpack_from("<IIQ", raw, 16 * i)
            if write:
                if not self.msr_set(idx, data, True):
                    break
            else:
                v = self.msr_get(idx, True)
                struct.pack_into("<Q", raw, 16 * i + 8, 0 if v is None else v)
                if v is None:
                    break
            done += 1
        if not write:
            copy_to_user(arg + 8, bytes(raw))
        return done

    def _cpuid_bit(self, leaf: int, reg: str, bit: int) -> bool:
        e = self._find_cpuid(leaf, 0)
        return e is not None and bool(getattr(e, reg) >> bit & 1)

    def _maxphyaddr(self) -> int:
        e = self._find_cpuid(0x80000008, 0)
        return (e.eax & 0xFF) if e is not None and e.eax & 0xFF else 36

    def _set_sregs(self, s: kvm_sregs) -> None:
        """__set_sregs(): kvm_is_valid_sregs() and the APIC base checks, then the state."""
        cr0, cr4, efer = s.cr0, s.cr4, s.efer
        if efer & EFER_LME and cr0 & CR0_PG:
            if not cr4 & CR4_PAE or not efer & EFER_LMA:
                raise OSError(errno.EINVAL, "KVM_SET_SREGS: EFER.LME with CR0.PG needs "
                              "CR4.PAE and EFER.LMA")
            if s.cr3 >> self._maxphyaddr():
                raise OSError(errno.EINVAL, f"KVM_SET_SREGS: CR3 {s.cr3:#x} beyond MAXPHYADDR")
        elif efer & EFER_LMA or s.cs.l:
            raise OSError(errno.EINVAL, "KVM_SET_SREGS: EFER.LMA or CS.L without long mode")
        if cr4 & ~CR4_KNOWN:
            raise OSError(errno.EINVAL, f"KVM_SET_SREGS: reserved CR4 bits {cr4 & ~CR4_KNOWN:#x}")
        for bit, (leaf, reg, fbit) in CR4_NEEDS.items():
            if cr4 >> bit & 1 and not self._cpuid_bit(leaf, reg, fbit):
                raise OSError(errno.EINVAL, f"KVM_SET_SREGS: CR4 bit {bit} needs CPUID "
                              f"{leaf:#x}.{reg}[{fbit}]")
        if cr0 >> 32 or (cr0 & CR0_NW and not cr0 & CR0_CD) or (cr0 & CR0_PG and
                                                                not cr0 & CR0_PE):
            raise OSError(errno.EINVAL, f"KVM_SET_SREGS: invalid CR0 {cr0:#x}")
        x2apic = self._cpuid_bit(1, "ecx", 21)
        rsvd = (MASK64 << self._maxphyaddr()) & MASK64 | 0x2FF | (0 if x2apic else 1 << 10)
        if s.apic_base & rsvd or (s.apic_base >> 10 & 3) == 1:
            raise OSError(errno.EINVAL, f"KVM_SET_SREGS: invalid APIC base {s.apic_base:#x}")
        self._sregs = kvm_sregs.from_buffer_copy(s.to_bytes())
        self._mode_problem = self._problem(s)
        if self._mode_problem is None:
            self._load_sregs(s)

    def _unpaged_fetch_gpa(self) -> int | None:
        """The physical address of the next instruction fetch while paging is off (real or
        unpaged protected mode: linear = physical = CS.base + RIP, 32 bits); None with paging."""
        s = self._sregs
        if s.cr0 & CR0_PG:
            return None
        return int(s.cs.base + self._get_regs().rip) & 0xFFFF_FFFF

    @staticmethod
    def _problem(s: kvm_sregs) -> str | None:
        if not (s.cr0 & CR0_PE and s.cr0 & CR0_PG):
            return f"CR0 {s.cr0:#x}: real mode / non-paged protected mode"
        if not s.efer & EFER_LMA:
            return f"EFER {s.efer:#x}: 32-bit protected mode (EFER.LMA clear)"
        if not s.cs.l or s.cs.db:
            return "CS.L=0: compatibility mode"
        if s.cr4 & CR4_LA57:
            return "CR4.LA57: 5-level paging"
        if s.cs.selector & 3 or s.cs.dpl or s.ss.selector & 3:
            return "CPL > 0 (the engine's hidden CPL is fixed at 0)"
        if any(s.interrupt_bitmap):
            return "a pending interrupt in interrupt_bitmap"
        return None

    def _load_sregs(self, s: kvm_sregs) -> None:
        uc = self.uc
        uc.reg_write(X.UC_X86_REG_GDTR, (0, s.gdt.base, s.gdt.limit, 0))
        uc.reg_write(X.UC_X86_REG_IDTR, (0, s.idt.base, s.idt.limit, 0))
        uc.reg_write(X.UC_X86_REG_CR4, s.cr4)
        uc.reg_write(X.UC_X86_REG_CR3, s.cr3)
        E.write_msr(uc, E.MSR_EFER, s.efer)
        uc.reg_write(X.UC_X86_REG_CR0, s.cr0)
        uc.reg_write(X.UC_X86_REG_CR2, s.cr2)
        for reg, seg in ((X.UC_X86_REG_CS, s.cs), (X.UC_X86_REG_SS, s.ss),
                         (X.UC_X86_REG_DS, s.ds), (X.UC_X86_REG_ES, s.es)):
            uc.reg_write(reg, seg.selector)
        # FS/GS selectors are not written: that loads a descriptor through the guest's GDT.
        E.write_msr(uc, E.MSR_FS_BASE, s.fs.base)
        E.write_msr(uc, E.MSR_GS_BASE, s.gs.base)
        self._loaded_fs = uc.reg_read(X.UC_X86_REG_FS)
        self._loaded_gs = uc.reg_read(X.UC_X86_REG_GS)
        uc.reg_write(X.UC_X86_REG_TR, (s.tr.selector, s.tr.base, s.tr.limit, 0))
        self._pending_event = None
        self.phys.flush_needed = True

    # ================================================================ CPUID, MP state
    def _set_cpuid2(self, arg: int) -> None:
        nent = struct.unpack("<I", copy_from_user(arg, 4))[0]
        if nent > KVM_MAX_CPUID_ENTRIES:
            raise OSError(errno.E2BIG, f"KVM_SET_CPUID2: {nent} entries > {KVM_MAX_CPUID_ENTRIES}")
        raw = copy_from_user(arg + HDR, nent * ENT)
        entries = [kvm_cpuid_entry2.from_buffer_copy(raw[i * ENT:(i + 1) * ENT])
                   for i in range(nent)]
        if self._ran:
            # kvm_set_cpuid(): after KVM_RUN only an identical table is accepted.
            key = [e.to_bytes() for e in entries]
            if key != [e.to_bytes() for e in self._cpuid]:
                raise OSError(errno.EINVAL, "KVM_SET_CPUID2 after KVM_RUN with a different table")
        self._cpuid = entries

    def _get_cpuid2(self, arg: int) -> None:
        nent = struct.unpack("<I", copy_from_user(arg, 4))[0]
        copy_to_user(arg, struct.pack("<I", len(self._cpuid)))
        if nent < len(self._cpuid):
            raise OSError(errno.E2BIG, f"KVM_GET_CPUID2: {nent} < {len(self._cpuid)} entries")
        copy_to_user(arg + HDR, b"".join(e.to_bytes() for e in self._cpuid))

    def _find_cpuid(self, fn: int, idx: int) -> kvm_cpuid_entry2 | None:
        for e in self._cpuid:
            if e.function == fn and (not e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX or
                                     e.index == idx):
                return e
        return None

    def cpuid(self, fn: int, idx: int) -> tuple[int, int, int, int]:
        """kvm_cpuid(): the table entry, else (Intel-compatible vendors) the max basic leaf
        for out-of-range leaves (get_out_of_range_cpuid_entry()), else zeros."""
        e = self._find_cpuid(fn, idx)
        if e is None:
            basic = self._find_cpuid(0, 0)
            amd = basic is not None and (basic.ebx, basic.ecx, basic.edx) in (
                (0x68747541, 0x444D4163, 0x69746E65), (0x6F677948, 0x656E6975, 0x6E65476E))
            if basic is not None and not amd:
                if 0x40000000 <= fn <= 0x4FFFFFFF:
                    cls = self._find_cpuid(fn & 0xFFFFFF00, 0)
                elif fn >= 0xC0000000:
                    cls = self._find_cpuid(0xC0000000, 0)
                else:
                    cls = self._find_cpuid(fn & 0x80000000, 0)
                if cls is None or fn > cls.eax:
                    e = self._find_cpuid(basic.eax, idx)
        if e is None:
            return 0, 0, 0, 0
        return e.eax, e.ebx, e.ecx, e.edx

    def _set_mp_state(self, state: int) -> None:
        # kvm_arch_vcpu_ioctl_set_mpstate(): without an in-kernel LAPIC only RUNNABLE.
        irqchip = bool(getattr(self.vm, "irqchip", False))
        if not irqchip and state != MpState.RUNNABLE:
            raise OSError(errno.EINVAL, "KVM_SET_MP_STATE: only RUNNABLE without an "
                          "in-kernel irqchip")
        if state not in (MpState.RUNNABLE, MpState.UNINITIALIZED, MpState.INIT_RECEIVED,
                         MpState.HALTED, MpState.SIPI_RECEIVED):
            raise OSError(errno.EINVAL, f"KVM_SET_MP_STATE: invalid state {state}")
        self._mp_state = state
