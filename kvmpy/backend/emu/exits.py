"""The emulated vCPU's exits and guest-instruction handling: the kvm_run exit builders (IO,
MEMORY_FAULT, INTERNAL_ERROR, INTR), KVM_HC_* hypercalls (arch/x86/kvm/x86.c
kvm_emulate_hypercall()), the intercepted instructions (MOV CR0/CR4, CLTS, LMSW, RDMSR/WRMSR,
SYSCALL) and exception delivery through the guest IDT. A base of EmuVcpu (vcpu.py), which keeps
the ioctl entry and the KVM_RUN loop; docs/emulator.md, "vCPU"."""

from __future__ import annotations

import errno
import struct
from typing import Any

from unicorn import x86_const as X

from ...uapi import (
    PAGE_SIZE,
    ExitReason,
    Hypercall,
    HypercallExitFlag,
    InternalSuberror,
    KvmHcError,
    kvm_run,
)
from ...uapi.structs import _struct_setattr
from ..libc import libc
from .cpustate import (
    CR0_CD,
    CR0_ET,
    CR0_NW,
    CR0_PE,
    CR0_PG,
    CR0_TS,
    CR4_KNOWN,
    CR4_LA57,
    CR4_NEEDS,
    CR4_PAE,
    CR4_PCIDE,
    EFER_LMA,
    EFER_SCE,
    MASK64,
    MSR_LSTAR,
    MSR_SFMASK,
    MSR_STAR,
    RFLAGS_FIXED,
    RFLAGS_RF,
    VcpuCpuState,
)
from .x86 import engine as E
from .x86.events import CpuState, Event, TripleFault, deliver
from .x86.paging import GuestFault, PagingMode, make_read64, translate
from .x86.physmem import TRAP_HWPOISON, PhysFault

IO_DATA_OFFSET = 4096      # io.data_offset on x86 KVM: the page after kvm_run
# kvm_run.io (at offset 32), packed into the kvm_run struct's own buffer: no foreign call.
_KVM_RUN_IO = struct.Struct("<BBHIQ")
HYPERCALL_OPCODES = (b"\x0f\x01\xc1", b"\x0f\x01\xd9")      # vmcall, vmmcall
QUIRK_FIX_HYPERCALL_INSN = 1 << 5   # KVM_X86_QUIRK_FIX_HYPERCALL_INSN
QUIRK_OUT_7E_INC_RIP = 1 << 3       # KVM_X86_QUIRK_OUT_7E_INC_RIP
EHWPOISON = 133                     # include/uapi/asm-generic/errno.h
# VMX basic exit reasons (arch/x86/include/uapi/asm/vmx.h) and the EPT-violation qualification
# of a not-present instruction fetch: the emulated CPU is Intel, so KVM's exit data are VMX's.
VMX_EXIT_EPT_VIOLATION, VMX_EXIT_EPT_MISCONFIG = 48, 49
EPT_QUAL_FETCH = 0x184
# IDT-vectoring information of a hardware exception with error code (SDM: valid bit 31,
# type 3 in bits 10:8, "deliver error code" bit 11, the vector in bits 7:0).
VECTORING_VALID, VECTORING_HW_EXC, VECTORING_SOFT_INT = 1 << 31, 3 << 8, 4 << 8
VECTORING_ERRCODE = 1 << 11
IN_OPCODES = frozenset({0xE4, 0xE5, 0xEC, 0xED})
OUT_OPCODES = frozenset({0xE6, 0xE7, 0xEE, 0xEF})
PREFIXES = frozenset({0x66, 0x67, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0xF0})


class VcpuExits(VcpuCpuState):
    """Exit builders, hypercalls, intercepts and exception delivery of EmuVcpu (vcpu.py)."""

    run: kvm_run
    run_addr: int
    last_internal_reason: str
    _kicked: bool
    _pending: tuple[Any, ...] | None
    _io_opcode: dict[int, int]
    _pf_retry: tuple[int, int] | None
    _fix_exception: bool
    trace: E.BlockTrace

    # ---------------------------------------------------------------- exits
    def _exit(self, reason: int) -> int:
        # ctypes' own setter: the reasons are the emulator's KVM_EXIT_* constants, which fit
        # the __u32 (KvmStruct's check costs more than the rest of a PIO exit's bookkeeping).
        _struct_setattr(self.run, "exit_reason", reason)
        return 0

    def _intr(self, why: str = "kick") -> int:
        self._kicked = False
        self.run.exit_reason = ExitReason.INTR
        raise OSError(errno.EINTR, f"KVM_RUN interrupted ({why})")

    def _io_exit(self, direction: int, port: int, size: int) -> None:
        # kvm_run.io at offset 32: direction u8, size u8, port u16, count u32, data_offset u64.
        _KVM_RUN_IO.pack_into(self.run, 32, direction, size, port, 1, IO_DATA_OFFSET)

    def _memory_fault(self, gpa: int, flags: int) -> int:
        """kvm_mmu_prepare_memory_fault_exit() and KVM_RUN -1/EFAULT (api.rst,
        KVM_EXIT_MEMORY_FAULT)."""
        run = self.run
        # A hwpoisoned guest_memfd page: kvm_mmu_faultin_pfn_gmem() fills the exit, then
        # KVM_RUN fails with __kvm_gmem_get_pfn()'s -EHWPOISON.
        err = EHWPOISON if flags & TRAP_HWPOISON else errno.EFAULT
        flags &= ~TRAP_HWPOISON
        run.exit_reason = ExitReason.MEMORY_FAULT
        run.exit.memory_fault.flags = flags
        run.exit.memory_fault.gpa = gpa & ~(PAGE_SIZE - 1)
        run.exit.memory_fault.size = PAGE_SIZE
        raise OSError(err, f"KVM_RUN: memory fault at gpa {gpa:#x} flags {flags:#x}")

    @staticmethod
    def _host_cpu() -> int:
        """vcpu->arch.last_vmentry_cpu: the host CPU this vCPU last ran on."""
        cpu = int(libc.sched_getcpu())
        return max(cpu, 0)

    def _emulation_failure(self, why: str, gpa: int) -> int:
        """KVM's instruction emulator could not fetch the instruction at ``gpa`` (no memslot):
        x86.c handle_emulation_failure() -> prepare_emulation_failure_exit() with no
        instruction bytes: data[0] the flags (0), then get_exit_info()'s five words. The
        emulated CPU is Intel, so they are vmx_get_exit_info()'s for an EPT violation on an
        instruction fetch: exit reason 48, qualification 0x184 (SDM "Exit Qualification for
        EPT Violations": fetch, linear address valid, final translation), no IDT vectoring."""
        del gpa  # KVM reports no GPA for this exit (the EPT violation's GPA is not in data)
        return self._internal(InternalSuberror.EMULATION, why,
                              [0, VMX_EXIT_EPT_VIOLATION, EPT_QUAL_FETCH, 0, 0, 0])

    def _internal(self, sub: int, why: str, data: list[int]) -> int:
        i = self.run.exit.internal
        i.suberror = sub
        i.ndata = min(len(data), 16)
        for k, v in enumerate(data[:16]):
            i.data[k] = v & MASK64
        self.last_internal_reason = why
        return self._exit(ExitReason.INTERNAL_ERROR)

    # ---------------------------------------------------------------- instructions
    def _paging(self) -> PagingMode:
        cr0, cr3, cr4 = self.uc.reg_read_batch([X.UC_X86_REG_CR0, X.UC_X86_REG_CR3,
                                                X.UC_X86_REG_CR4])
        return PagingMode(cr0, cr3, cr4, E.read_msr(self.uc, E.MSR_EFER))

    def _read_virt(self, va: int, n: int) -> bytes:
        smm = getattr(self, "_smm_engine", None)
        if getattr(self, "_smm", None) is not None and smm is not None:
            # In SMM: real-mode code, CS base + offset, in address space 1 (x86/smm.py).
            got = smm.read(smm.cs_base() + va, n)
            if got is None:
                raise GuestFault(13, 0)
            return bytes(got)
        mode = self._paging()
        read64 = make_read64(self.phys.read)
        out = b""
        while n:
            chunk = min(n, PAGE_SIZE - (va & 0xFFF))
            out += self.phys.read(translate(read64, mode, va, fetch=True), chunk)
            va, n = va + chunk, n - chunk
        return out

    def _is_plain_io(self, rip: int, opcodes: frozenset[int]) -> bool:
        """The IN/OUT at ``rip`` is a plain one (opcode in ``opcodes``), not INS/OUTS: KVM
        handles the two differently (svm.c io_interception(), vmx.c handle_io(): string IO
        goes through the instruction emulator, plain IO through kvm_fast_pio())."""
        op = self._io_opcode.get(rip)
        if op is None:
            op = self._io_opcode[rip] = self._decode_io_opcode(rip)
        return op < 0 or op in opcodes

    def _decode_io_opcode(self, rip: int) -> int:
        """The opcode byte after the prefixes, -1 if the bytes cannot be read (then taken as
        plain IO)."""
        try:
            b = self._read_virt(rip, 15)
        except (GuestFault, PhysFault):
            return -1
        i = 0
        while i < 14 and (b[i] in PREFIXES or 0x40 <= b[i] <= 0x4F):
            i += 1
        return b[i]

    def _invalid_insn(self) -> int | None:
        rip = self.uc.reg_read(X.UC_X86_REG_RIP)
        try:
            insn = self._read_virt(rip, 3)
        except (GuestFault, PhysFault):
            insn = b""
        if insn in HYPERCALL_OPCODES:
            # The emulated CPU is Intel (system.py): vmcall is native. The other vendor's
            # vmmcall with KVM_X86_QUIRK_FIX_HYPERCALL_INSN disabled is #UD (x86.c
            # emulator_fix_hypercall()); with the quirk on it runs unpatched (docs "Known gaps").
            if insn == HYPERCALL_OPCODES[1] and \
                    getattr(self.vm, "disabled_quirks", 0) & QUIRK_FIX_HYPERCALL_INSN:
                return self._deliver(Event(6, None, False, rip, rip))
            return self._hypercall(rip)
        # Anything else unicorn cannot decode is #UD for the guest (a gap where the real CPU
        # implements an instruction unicorn lacks; docs "vCPU").
        return self._deliver(Event(6, None, False, rip, rip))

    def _hypercall(self, rip: int) -> int | None:
        """kvm_emulate_hypercall() (arch/x86/kvm/x86.c) for a 64-bit caller."""
        uc = self.uc
        nr, a0, a1, a2, cs = uc.reg_read_batch([X.UC_X86_REG_RAX, X.UC_X86_REG_RBX,
                                               X.UC_X86_REG_RCX, X.UC_X86_REG_RDX,
                                               X.UC_X86_REG_CS])
        if cs & 3:
            ret = -KvmHcError.EPERM
        elif nr == Hypercall.MAP_GPA_RANGE:
            gfn = a0 >> 12
            if not self.vm.exit_hypercall_mask & (1 << Hypercall.MAP_GPA_RANGE):
                ret = -KvmHcError.ENOSYS
            elif a0 & 0xFFF or a1 == 0 or gfn + a1 > MASK64:
                ret = -KvmHcError.EINVAL
            else:
                h = self.run.exit.hypercall
                h.nr = nr
                h.args[0], h.args[1], h.args[2] = a0, a1, a2
                h.flags = HypercallExitFlag.LONG_MODE
                self._pending = ("hypercall",)
                return self._exit(ExitReason.HYPERCALL)
        elif nr in (Hypercall.VAPIC_POLL_IRQ, Hypercall.KICK_CPU, Hypercall.SCHED_YIELD):
            ret = 0     # no in-kernel LAPIC: nothing to poll or kick; yield is a no-op
        elif nr == Hypercall.SEND_IPI and not getattr(self.vm, "irqchip", False):
            ret = -KvmHcError.EOPNOTSUPP    # kvm_pv_send_ipi() without an APIC map
        elif nr in (Hypercall.SEND_IPI, Hypercall.CLOCK_PAIRING):
            raise OSError(errno.ENOSYS, f"emulated KVM: hypercall {nr} is not modelled")
        else:
            ret = -KvmHcError.ENOSYS
        uc.reg_write_batch([(X.UC_X86_REG_RAX, ret & MASK64), (X.UC_X86_REG_RIP, rip + 3)])
        return None

    # ---------------------------------------------------------------- intercepts
    def _gp(self, rip: int) -> int | None:
        """kvm_inject_gp(vcpu, 0) for the instruction at ``rip`` (a fault: RIP stays)."""
        self.regs.write(X.UC_X86_REG_RIP, rip)
        return self._deliver(Event(13, 0, False, rip, rip))

    def _syscall(self, rip: int) -> int | None:
        """SYSCALL (SDM Vol. 2B; KVM's em_syscall()): #UD unless EFER.SCE (and long mode),
        else RCX = next RIP, R11 = RFLAGS, RFLAGS &= ~SFMASK, CS/SS from STAR[47:32], RIP =
        LSTAR."""
        uc = self.uc
        efer = E.read_msr(uc, E.MSR_EFER)
        if not efer & EFER_SCE or not efer & EFER_LMA:
            self.regs.write(X.UC_X86_REG_RIP, rip)
            return self._deliver(Event(6, None, False, rip, rip))
        star, lstar, fmask = (E.read_msr(uc, m) for m in (MSR_STAR, MSR_LSTAR, MSR_SFMASK))
        fl = self.regs.read(X.UC_X86_REG_RFLAGS)
        sel = (star >> 32) & 0xFFFC
        uc.reg_write_batch([(X.UC_X86_REG_RCX, rip + 2), (X.UC_X86_REG_R11, fl & ~RFLAGS_RF),
                            (X.UC_X86_REG_RFLAGS, (fl & ~fmask & ~RFLAGS_RF) | RFLAGS_FIXED),
                            (X.UC_X86_REG_RIP, lstar)])
        uc.reg_write(X.UC_X86_REG_CS, sel)
        uc.reg_write(X.UC_X86_REG_SS, sel + 8)
        return None

    def _intercepted(self, exit_code: int, write: int, rip: int) -> int | None:
        """A MOV to CR0/CR4 or an RDMSR/WRMSR the engine stopped at (engine.enable_intercepts)."""
        if exit_code == E.SVM_EXIT_MSR:
            return self._msr(rip, bool(write))
        try:
            insn = self._read_virt(rip, 15)
        except (GuestFault, PhysFault):
            return self._internal(InternalSuberror.EMULATION,
                                  "control-register write not readable", [rip])
        i, rex = 0, 0
        while i < 14 and insn[i] in PREFIXES:
            i += 1
        if 0x40 <= insn[i] <= 0x4F:
            rex, i = insn[i], i + 1
        op = insn[i:i + 3]
        gprs = E.read_gprs(uc := self.uc)
        cr0 = uc.reg_read(X.UC_X86_REG_CR0)
        if op[:2] == b"\x0f\x22" and (op[2] >> 6) == 3:       # MOV CRn, r64
            cr = ((rex >> 2) & 1) << 3 | (op[2] >> 3) & 7
            value = gprs[((rex & 1) << 3) | (op[2] & 7)]
            length = i + 3
        elif op[:2] == b"\x0f\x06":                         # CLTS
            cr, value, length = 0, cr0 & ~CR0_TS, i + 2
        elif op[:2] == b"\x0f\x01" and (op[2] >> 3) & 7 == 6 and (op[2] >> 6) == 3:   # LMSW r
            src = gprs[((rex & 1) << 3) | (op[2] & 7)]
            # LMSW loads CR0[3:0] and cannot clear PE.
            cr, value, length = 0, (cr0 & ~0xE) | (src & 0xF), i + 3
        elif insn[:3] in HYPERCALL_OPCODES:
            # After memory-map changes unicorn was seen to stop at a vmcall with the vector of
            # an earlier intercept (the quiet-stop case of _quiet_stop()): it is the vmcall.
            return self._invalid_insn()
        else:
            return self._internal(InternalSuberror.EMULATION,
                                  f"control-register write {insn[:i + 3].hex()} not modelled",
                                  [rip])
        efer = E.read_msr(uc, E.MSR_EFER)
        if cr == 0:
            # kvm_set_cr0(): kvm_is_valid_cr0() (bits 63:32, NW without CD, PG without PE),
            # then clearing PG in 64-bit mode (or with CR4.PCIDE) is #GP.
            cr4 = uc.reg_read(X.UC_X86_REG_CR4)
            if (value >> 32 or (value & CR0_NW and not value & CR0_CD)
                    or (value & CR0_PG and not value & CR0_PE)
                    or (not value & CR0_PG and (efer & EFER_LMA or cr4 & CR4_PCIDE))):
                return self._gp(rip)
            uc.reg_write(X.UC_X86_REG_CR0, value | CR0_ET)
        else:
            # kvm_set_cr4(): kvm_is_valid_cr4() (CR4_RESERVED_BITS, CPUID-dependent bits);
            # in long mode PAE must stay set and LA57 cannot change; PCIDE needs CR3[11:0] 0.
            old = uc.reg_read(X.UC_X86_REG_CR4)
            if value & ~CR4_KNOWN or any(value >> b & 1 and not self._cpuid_bit(*need)
                                         for b, need in CR4_NEEDS.items()):
                return self._gp(rip)
            if efer & EFER_LMA and (not value & CR4_PAE or (value ^ old) & CR4_LA57):
                return self._gp(rip)
            if value & CR4_PCIDE and not old & CR4_PCIDE and (
                    uc.reg_read(X.UC_X86_REG_CR3) & 0xFFF or not efer & EFER_LMA):
                return self._gp(rip)
            uc.reg_write(X.UC_X86_REG_CR4, value)
        self.regs.write(X.UC_X86_REG_RIP, rip + length)
        self.phys.flush_needed = True
        return None

    def _msr(self, rip: int, write: bool) -> int | None:
        """RDMSR/WRMSR: the MSRs in MODELLED_MSRS with kvm_set_msr_common()'s checks
        (VcpuCpuState.msr_get/msr_set), #GP(0) for every other index
        (kvm_get_msr_common()/kvm_set_msr_common() default path, without ignore_msrs)."""
        uc = self.uc
        idx, eax, edx = (uc.reg_read(r) & 0xFFFF_FFFF for r in
                         (X.UC_X86_REG_RCX, X.UC_X86_REG_RAX, X.UC_X86_REG_RDX))
        if not write:
            v = self.msr_get(idx, False)
            if v is None:
                return self._gp(rip)
            uc.reg_write_batch([(X.UC_X86_REG_RAX, v & 0xFFFF_FFFF),
                                (X.UC_X86_REG_RDX, v >> 32), (X.UC_X86_REG_RIP, rip + 2)])
            return None
        if not self.msr_set(idx, edx << 32 | eax, False):
            return self._gp(rip)
        self.regs.write(X.UC_X86_REG_RIP, rip + 2)
        return None

    # ---------------------------------------------------------------- exceptions
    def _noncanonical_branch(self, target: int) -> Event | None:
        """#GP(0) on the branch that jumped to non-canonical ``target`` (SDM Vol. 1 3.3.7.1: a
        near JMP/Jcc/CALL/RET/LOOP whose target is not canonical faults, not retired; KVM runs
        the guest on the CPU or in em_jmp_abs()/em_call_near_abs()/em_ret() ->
        assign_eip() -> emulate_gp(ctxt, 0)). Unicorn retired the branch and faulted on the
        fetch, so the branch is found in the last translation block run (engine.BlockTrace)
        and its effect undone: RSP for CALL/RET, RCX for LOOP. None if that block does not
        end in such a branch (the fault is then reported at the target, as unicorn has it)."""
        last = self.trace.last()
        if last is None:
            return None
        start, size = last
        try:
            code = self._read_virt(start, size)
        except (GuestFault, PhysFault):
            return None
        starts = E.insn_starts(code)
        if not starts:
            return None
        off = starts[-1]
        insn = code[off:]
        i = 0
        while i < len(insn) - 1 and insn[i] in PREFIXES:
            if insn[i] in (0x66, 0x67):
                return None         # 16-bit operand / 32-bit address forms: not modelled
            i += 1
        if 0x40 <= insn[i] <= 0x4F:
            i += 1
        op = insn[i:i + 3]
        rsp_undo, rcx_undo = 0, 0
        if op[:1] == b"\xc3":                                          # RET
            rsp_undo = -8
        elif op[:1] == b"\xc2" and len(op) == 3:                       # RET imm16
            rsp_undo = -8 - int.from_bytes(op[1:3], "little")
        elif op[:1] == b"\xe8" or (op[:1] == b"\xff" and len(op) > 1
                                   and (op[1] >> 3) & 7 == 2):          # CALL rel32 / r/m64
            rsp_undo = 8
        elif op[:1] in (b"\xe0", b"\xe1", b"\xe2"):                     # LOOPcc, LOOP
            rcx_undo = 1
        elif not (op[:1] in (b"\xe9", b"\xeb", b"\xe3") or 0x70 <= op[0] <= 0x7F
                  or (op[:1] == b"\x0f" and len(op) > 1 and 0x80 <= op[1] <= 0x8F)
                  or (op[:1] == b"\xff" and len(op) > 1 and (op[1] >> 3) & 7 == 4)):
            return None                         # not a near branch (IRETQ, far, ...)
        rip = start + off
        regs = self.regs
        regs.write(X.UC_X86_REG_RIP, rip)
        if rsp_undo:
            regs.write(X.UC_X86_REG_RSP, regs.read(X.UC_X86_REG_RSP) + rsp_undo)
        if rcx_undo:
            regs.write(X.UC_X86_REG_RCX, regs.read(X.UC_X86_REG_RCX) + rcx_undo)
        return Event(13, 0, False, rip, rip)

    def _spurious_pf(self, rip: int, cr2: int, code: int) -> bool:
        """Unicorn walks page tables in physical memory without hooks, so a page-table page in
        a memslot not mapped into the engine yet looks not-present to it. Walk again through
        the emulator's memory (which maps slots on demand): if the translation succeeds the
        #PF was ours, and the access is retried once instead of delivered to the guest."""
        key = (rip, cr2)
        if self._pf_retry == key:
            return False
        try:
            translate(make_read64(self.phys.read), self._paging(), cr2,
                      write=bool(code & 2), user=bool(code & 4), fetch=bool(code & 16))
        except (GuestFault, PhysFault):
            return False
        self._pf_retry = key
        return True

    def _deliver(self, ev: Event) -> int | None:
        uc = self.uc
        (rip, rsp, rflags, cs, ss, cr2) = uc.reg_read_batch(
            [X.UC_X86_REG_RIP, X.UC_X86_REG_RSP, X.UC_X86_REG_RFLAGS, X.UC_X86_REG_CS,
             X.UC_X86_REG_SS, X.UC_X86_REG_CR2])
        _, gbase, glimit, _ = uc.reg_read(X.UC_X86_REG_GDTR)
        _, ibase, ilimit, _ = uc.reg_read(X.UC_X86_REG_IDTR)
        tr = uc.reg_read(X.UC_X86_REG_TR)
        st = CpuState(rip, rsp, rflags, cs, ss, gbase, glimit, ibase, ilimit, tr[1],
                      self._paging(), cr2)
        self._fix_exception = True
        self._rf_possible = True
        self.trace.forget()
        try:
            deliver(st, ev, self.phys.read, self.phys.write)
        except TripleFault:
            return self._exit(ExitReason.SHUTDOWN)
        except PhysFault as f:
            if f.kind == "fault":
                self._pending_event = ev       # re-delivered once userspace fixed memory
                return self._memory_fault(f.gpa, f.flags)
            # The IDT/GDT/stack read hit MMIO while vectoring. Same five words on 6.12 and 7.3
            # for a VMX CPU: 6.12 vmx.c __vmx_handle_exit() (EPT misconfig while vectoring:
            # vectoring info, exit reason, qualification, GPA, last_vmentry_cpu); 6.14+ x86.c
            # kvm_prepare_event_vectoring_exit() (vmx_get_exit_info()'s info2 = IDT vectoring
            # info, reason, info1 = qualification, then the GPA and last_vmentry_cpu).
            info = VECTORING_VALID | (VECTORING_SOFT_INT if ev.soft else VECTORING_HW_EXC) | \
                ev.vector
            if ev.error_code is not None:
                info |= VECTORING_ERRCODE
            return self._internal(InternalSuberror.DELIVERY_EV,
                                  f"event delivery touched MMIO at {f.gpa:#x}",
                                  [info, VMX_EXIT_EPT_MISCONFIG, 0, f.gpa, self._host_cpu()])
        uc.reg_write_batch([(X.UC_X86_REG_RSP, st.rsp), (X.UC_X86_REG_RFLAGS, st.rflags),
                            (X.UC_X86_REG_CR2, st.cr2), (X.UC_X86_REG_RIP, st.rip)])
        if st.cs != cs:
            uc.reg_write(X.UC_X86_REG_CS, st.cs)
        if st.ss != ss:
            uc.reg_write(X.UC_X86_REG_SS, st.ss)
        return None


__all__ = ["VcpuExits"]
