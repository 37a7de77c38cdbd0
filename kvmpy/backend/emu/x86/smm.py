"""System management mode for the emulated vCPU: the SMRAM state-save area and the engine the
SMI handler runs in (arch/x86/kvm/smm.c enter_smm() / emulator_leave_smm(), smm.h
struct kvm_smram_state_64).

KVM enters SMM in "big real mode": CS base = SMBASE, RIP 0x8000, CR0 without PE/EM/TS/PG, CR4
and EFER 0, the other segments base 0, every limit 4 GiB, IDT limit 0; guest memory is then
the memslots of address space 1 (kvm_arch_vcpu_memslots_id()). The vCPU's own engine runs
64-bit code over address space 0, so the handler runs in a second unicorn engine: a
UC_MODE_64 engine (so that all 64-bit registers stay accessible: R8-R15 and the upper halves
survive SMM) switched to real mode by clearing PE/PG in CR0 and writing QEMU's segment caches
and hflags in the saved context (CPUX86State offsets of unicorn 2.1.4, verified against a
selector write at creation).
"""

from __future__ import annotations

import ctypes
import errno
import struct
from dataclasses import dataclass
from typing import Any

from unicorn import x86_const as X

from ....uapi import kvm_segment, kvm_sregs
from . import engine as E

SMRAM_SAVE = 0xFE00            # the state-save area: SMBASE + 0xFE00, 512 bytes
SMRAM_SIZE = 512
SMM_REVISION = 0x00020064      # smram->smm_revison for the 64-bit layout
SMBASE_RESET = 0x30000         # kvm_vcpu_reset(): vcpu->arch.smbase
MSR_SMBASE = 0x9E
DR6_RESET, DR7_RESET = 0xFFFF0FF0, 0x400      # DR6_ACTIVE_LOW, DR7_FIXED_1: not modelled
# struct kvm_smram_state_64 offsets (check_smram_offsets() in smm.c), relative to SMBASE+0xFE00.
SEG_OFF = {"es": 0x00, "cs": 0x10, "ss": 0x20, "ds": 0x30, "fs": 0x40, "gs": 0x50,
           "gdt": 0x60, "ldt": 0x70, "idt": 0x80, "tr": 0x90}
OFF_INT_SHADOW, OFF_EFER, OFF_REVISION, OFF_SMBASE = 0xCB, 0xD0, 0xFC, 0x100
OFF_CR4, OFF_CR3, OFF_CR0, OFF_DR7, OFF_DR6 = 0x148, 0x150, 0x158, 0x160, 0x168
OFF_RFLAGS, OFF_RIP, OFF_GPRS = 0x170, 0x178, 0x180
# KVM's register numbers (VCPU_REGS_RAX..R15) as indexes into engine.GPRS / kvm_regs order
# (rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8..r15).
KVM_REG_ORDER = (0, 2, 3, 1, 6, 7, 4, 5, 8, 9, 10, 11, 12, 13, 14, 15)

# CPUX86State in unicorn 2.1.4's context blob: hflags (engine.CTX_HFLAGS) and segs[6]
# (struct SegmentCache {u32 selector; u64 base; u32 limit; u32 flags;}: 24 bytes, ES first).
CTX_SEGS = 224
SEG_ORDER = ("es", "cs", "ss", "ds", "fs", "gs")
HF_CS32, HF_SS32, HF_ADDSEG, HF_PE, HF_LMA, HF_CS64 = (1 << 4, 1 << 5, 1 << 6, 1 << 7, 1 << 14,
                                                         1 << 15)
CR0_PE, CR0_EM, CR0_TS, CR0_PG = 1, 1 << 2, 1 << 3, 1 << 31


def seg_attributes(s: kvm_segment) -> int:
    """enter_smm_get_segment_flags(seg) >> 8: the 16-bit attribute word of the save area."""
    return int(s.type | s.s << 4 | s.dpl << 5 | s.present << 7 | s.avl << 12 | s.l << 13
            | s.db << 14 | s.g << 15)


def set_attributes(s: kvm_segment, attr: int) -> None:
    """rsm_set_desc_flags(desc, attr << 8)."""
    s.type, s.s, s.dpl, s.present = attr & 15, attr >> 4 & 1, attr >> 5 & 3, attr >> 7 & 1
    s.avl, s.l, s.db, s.g = attr >> 12 & 1, attr >> 13 & 1, attr >> 14 & 1, attr >> 15 & 1
    s.unusable = 0 if s.present else 1


def save_state(s: kvm_sregs, gprs: list[int], smbase: int) -> bytes:
    """enter_smm_save_state_64(): the 512-byte area for sregs ``s`` and the 18 registers
    ``gprs`` (kvm_regs order)."""
    b = bytearray(SMRAM_SIZE)
    for name in ("es", "cs", "ss", "ds", "fs", "gs", "tr", "ldt"):
        seg = getattr(s, name)
        struct.pack_into("<HHIQ", b, SEG_OFF[name], seg.selector, seg_attributes(seg),
                         seg.limit, seg.base)
    for name in ("gdt", "idt"):
        dt = getattr(s, name)
        struct.pack_into("<HHIQ", b, SEG_OFF[name], 0, 0, dt.limit, dt.base)
    struct.pack_into("<Q", b, OFF_EFER, s.efer)
    struct.pack_into("<II", b, OFF_REVISION, SMM_REVISION, smbase & 0xFFFF_FFFF)
    struct.pack_into("<QQQQQQQ", b, OFF_CR4, s.cr4, s.cr3, s.cr0, DR7_RESET, DR6_RESET,
                     gprs[17], gprs[16])
    for i, k in enumerate(KVM_REG_ORDER):
        struct.pack_into("<Q", b, OFF_GPRS + 8 * (15 - i), gprs[k])
    return bytes(b)


@dataclass
class Restored:
    sregs: kvm_sregs
    gprs: list[int]
    smbase: int


def load_state(raw: bytes, base: kvm_sregs) -> Restored:
    """rsm_load_state_64(): the state RSM restores, over ``base`` (what the save area does not
    hold: CR2, CR8, APIC base). EFER.LMA follows from LME and CR0.PG as
    rsm_enter_protected_mode() -> kvm_set_cr0() sets it."""
    s = kvm_sregs.from_buffer_copy(base.to_bytes())
    for name in ("es", "cs", "ss", "ds", "fs", "gs", "tr", "ldt"):
        sel, attr, limit, b = struct.unpack_from("<HHIQ", raw, SEG_OFF[name])
        seg = getattr(s, name)
        seg.selector, seg.limit, seg.base = sel, limit, b
        set_attributes(seg, attr)
    for name in ("gdt", "idt"):
        _, _, limit, b = struct.unpack_from("<HHIQ", raw, SEG_OFF[name])
        dt = getattr(s, name)
        dt.limit, dt.base = limit & 0xFFFF, b
    efer, = struct.unpack_from("<Q", raw, OFF_EFER)
    cr4, cr3, cr0, _dr7, _dr6, rflags, rip = struct.unpack_from("<QQQQQQQ", raw, OFF_CR4)
    s.cr0, s.cr3, s.cr4 = cr0, cr3, cr4
    efer &= ~(1 << 10)
    if efer & (1 << 8) and cr0 & CR0_PG:
        efer |= 1 << 10
    s.efer = efer
    gprs = [0] * 18
    for i, k in enumerate(KVM_REG_ORDER):
        gprs[k], = struct.unpack_from("<Q", raw, OFF_GPRS + 8 * (15 - i))
    gprs[16], gprs[17] = rip, rflags | 2
    smbase, = struct.unpack_from("<I", raw, OFF_SMBASE)
    return Restored(s, gprs, smbase)


def smm_sregs(saved: kvm_sregs, smbase: int) -> kvm_sregs:
    """What KVM_GET_SREGS shows right after enter_smm()."""
    s = kvm_sregs.from_buffer_copy(saved.to_bytes())
    for name in SEG_ORDER:
        seg = getattr(s, name)
        cs = name == "cs"
        seg.selector = (smbase >> 4) & 0xFFFF if cs else 0
        seg.base = smbase if cs else 0
        seg.limit, seg.type, seg.s, seg.present, seg.g = 0xFFFF_FFFF, 3, 1, 1, 1
        seg.dpl = seg.db = seg.l = seg.avl = seg.unusable = 0
    s.idt.base, s.idt.limit = 0, 0
    s.cr0 = saved.cr0 & ~(CR0_PE | CR0_EM | CR0_TS | CR0_PG)
    s.cr4 = 0
    s.efer = 0
    return s


class SmmEngine:
    """The engine an SMI handler runs in, over the address-space-1 memslots."""

    def __init__(self) -> None:
        self.uc: Any = E.new_engine()
        self.regs = E.FastRegs(self.uc)
        self.counter = E.counter(self.uc)
        self._mapped: list[tuple[int, int]] = []
        self._check_layout()

    def _check_layout(self) -> None:
        uc = self.uc
        uc.reg_write(X.UC_X86_REG_DS, 0x1230)
        ctx = uc.context_save()
        sel, = struct.unpack("<I", ctypes.string_at(ctx.context.value + CTX_SEGS + 24 * 3, 4))
        uc.reg_write(X.UC_X86_REG_DS, 0)
        if sel != 0x1230:
            raise E.LayoutError(errno.ENOSYS, "unicorn context layout differs at segs[]: SMM "
                                "needs unicorn 2.1.4")

    def enter(self, s: kvm_sregs, gprs: list[int]) -> None:
        """Load the SMM entry state (``s`` from smm_sregs()) and the registers."""
        uc = self.uc
        uc.reg_write(X.UC_X86_REG_CR0, s.cr0 | 0x10)   # PG/PE clear: leaves long mode
        E.write_msr(uc, E.MSR_EFER, 0)
        uc.reg_write(X.UC_X86_REG_CR4, 0)
        uc.reg_write(X.UC_X86_REG_IDTR, (0, 0, 0, 0))
        uc.reg_write(X.UC_X86_REG_GDTR, (0, s.gdt.base, s.gdt.limit, 0))
        ctx = uc.context_save()
        a = ctx.context.value
        hflags, = struct.unpack("<I", ctypes.string_at(a + E.CTX_HFLAGS, 4))
        hflags = (hflags & ~(HF_CS32 | HF_SS32 | HF_PE | HF_LMA | HF_CS64 | 3)) | HF_ADDSEG
        ctypes.memmove(a + E.CTX_HFLAGS, struct.pack("<I", hflags), 4)
        for i, name in enumerate(SEG_ORDER):
            seg = getattr(s, name)
            flags = (seg_attributes(seg) << 8) & 0x00F0FF00
            ctypes.memmove(a + CTX_SEGS + 24 * i, struct.pack(
                "<IIQII", seg.selector, 0, seg.base, seg.limit, flags), 24)
        uc.context_restore(ctx)
        self.regs.write_gprs([*gprs[:16], 0x8000, 2])
        E.reset_old_exception(uc)       # an earlier handler's exception (engine.py)
        uc.ctl_flush_tb()

    def segments(self) -> dict[str, tuple[int, int]]:
        """(selector, base) of each data/code segment as the handler left them."""
        ctx = self.uc.context_save()
        raw = ctypes.string_at(ctx.context.value + CTX_SEGS, 24 * 6)
        return {name: struct.unpack_from("<I4xQ", raw, 24 * i)
                for i, name in enumerate(SEG_ORDER)}

    def cs_base(self) -> int:
        return self.segments()["cs"][1]

    def remap(self, slots: list[tuple[int, int, int, bool]]) -> None:
        """Map the address-space-1 memslots (gpa, size, hva, readonly) straight onto their
        host memory (the caller holds the VM lock while the engine uses them)."""
        uc = self.uc
        for gpa, size in self._mapped:
            uc.mem_unmap(gpa, size)
        self._mapped = []
        for gpa, size, hva, ro in slots:
            uc.mem_map_ptr(gpa, size, 5 if ro else 7, hva)
            self._mapped.append((gpa, size))

    def read(self, gpa: int, n: int) -> bytes | None:
        try:
            return bytes(self.uc.mem_read(gpa, n))
        except Exception:       # UcError: not in an address-space-1 memslot
            return None

    def write(self, gpa: int, data: bytes) -> bool:
        try:
            self.uc.mem_write(gpa, data)
            return True
        except Exception:
            return False


__all__ = ["MSR_SMBASE", "SMBASE_RESET", "SMRAM_SAVE", "SMRAM_SIZE", "Restored", "SmmEngine",
           "load_state", "save_state", "smm_sregs"]
