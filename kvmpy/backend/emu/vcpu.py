"""The emulated vCPU: KVM's vCPU ioctls over a unicorn x86-64 engine.

What is modelled and how (details and every known gap in docs/emulator.md, "vCPU"):
- state: KVM_GET/SET_REGS, KVM_GET/SET_SREGS (KVM's validity checks; the engine runs only
  64-bit long mode at CPL 0 - any other state is stored and KVM_RUN fails with EINVAL naming
  what is not modelled), KVM_SET/GET_CPUID2 (guest CPUID answers come from it, as on KVM),
  KVM_GET/SET_MP_STATE;
- KVM_RUN exits (api.rst 5. "The kvm_run structure"): IO with KVM's completion rule (an IN
  keeps RIP at the instruction until the next KVM_RUN completes it with the data at
  kvm_run + io.data_offset, even when that run has immediate_exit set), MMIO (reads
  completed by the next KVM_RUN, writes reported with RIP after the instruction), HLT,
  HYPERCALL (KVM_HC_MAP_GPA_RANGE; x86.c kvm_emulate_hypercall()), MEMORY_FAULT (-1/EFAULT),
  SHUTDOWN on a triple fault, INTERNAL_ERROR where KVM's emulator would give one, and EINTR
  for kicks and immediate_exit;
- exit builders, hypercalls, intercepts and exception delivery (through the guest IDT,
  x86/events.py) live in exits.py; this module is the ioctl entry and the KVM_RUN loop;
- guest-physical memory is resolved as KVM's MMU does (x86/physmem.py);
- KVM_GET/SET_MSRS (cpustate.py msr_io()), KVM_SMI and SMM: entry on the next KVM_RUN, the
  handler in a real-mode engine over address space 1, RSM (x86/smm.py).
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import threading
import time
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from unicorn import (
    UC_ERR_INSN_INVALID,
    UC_HOOK_INSN,
    UC_HOOK_INTR,
    UC_HOOK_MEM_UNMAPPED,
    UC_HOOK_MEM_WRITE_PROT,
    UC_MEM_FETCH_UNMAPPED,
    UC_MEM_WRITE_PROT,
    UC_MEM_WRITE_UNMAPPED,
)
from unicorn import x86_const as X
from unicorn.unicorn import UcError

from ...uapi import (
    PAGE_SIZE,
    Cap,
    ExitReason,
    InternalSuberror,
    IoDirection,
    MemFlag,
    MpState,
    kvm_cpuid_entry2,
    kvm_mp_state,
    kvm_regs,
    kvm_run,
    kvm_sregs,
)
from ...uapi.ioctls import Ioctl
from ..libc import MS_ASYNC, copy_from_user, copy_to_user, libc_msync
from .cpustate import (
    RFLAGS_FIXED,
    RFLAGS_RF,
    _reset_sregs,
)
from .dispatch import CopyIn, CopyOut, Entry, Out, Ptr, Table, call, check_table
from .exits import (
    HYPERCALL_OPCODES,
    IN_OPCODES,
    IO_DATA_OFFSET,
    OUT_OPCODES,
    QUIRK_OUT_7E_INC_RIP,
    VcpuExits,
)
from .gmem import poison_epoch, sync_poison
from .sigwatch import SignalWatch
from .x86 import engine as E
from .x86.events import HAS_ERROR_CODE, Event
from .x86.paging import GuestFault, canonical
from .x86.physmem import PhysFault, PhysMap
from .x86.sched import scheduler_for
from .x86.smm import (
    SMBASE_RESET,
    SMRAM_SAVE,
    SMRAM_SIZE,
    SmmEngine,
    load_state,
    save_state,
    smm_sregs,
)

if TYPE_CHECKING:
    from .vm import EmuVm

# Guest code runs in slices of SLICE_INSNS instructions. A count keeps hook stops precise
# (docs/emulator.md, "Unicorn 2.1.4 facts"), and unicorn 2.1.4's emu_stop from *another* thread is not precise: it
# can report RIP at the start of a translation block part of which already ran, so retired
# instructions run twice (measured: lost/duplicated increments). So no other thread ever stops
# the engine: kicks, preemption and invalidations are flags the vCPU checks between slices.
# The slice adapts so that one lasts about 1-4 ms whatever the code costs (fresh code is
# translated first, which can be 100x slower than running it).
SLICE_MIN, SLICE_MAX = 500, 400_000
SLICE_FAST_S, SLICE_SLOW_S = 0.001, 0.004
INVALIDATE_WAIT_S = 2.0
R = SimpleNamespace(**{m.name: int(m) for m in Ioctl})   # plain ints (Enum access is slow)
CAP_X86_SMM = int(Cap.X86_SMM)
READONLY = int(MemFlag.READONLY)


@dataclasses.dataclass
class SmmState:
    """The vCPU is in SMM: the state before the SMI and KVM_GET_SREGS's view of SMM."""

    saved: kvm_sregs
    view: kvm_sregs


class EmuVcpu(VcpuExits):
    """One emulated vCPU (see the module docstring and docs/emulator.md, "vCPU")."""

    def __init__(self, vm: EmuVm, vcpu_id: int, run_addr: int, mmap_size: int) -> None:
        if mmap_size < IO_DATA_OFFSET + PAGE_SIZE:
            raise OSError(errno.EINVAL, f"kvm_run mapping of {mmap_size} bytes has no PIO page")
        self.vm = vm
        self.id = vcpu_id
        self.run_addr = run_addr
        self.run = kvm_run.from_address(run_addr)
        # The PIO data page as bytes: its slices are plain copies, where ctypes.memmove and
        # string_at are foreign calls (~0.6 us each, one per PIO exit).
        self._io_page = memoryview(
            (ctypes.c_char * PAGE_SIZE).from_address(run_addr + IO_DATA_OFFSET)).cast("B")
        self.uc = E.new_engine()
        self.regs = E.FastRegs(self.uc)
        self._counter = E.counter(self.uc)
        self.trace = E.BlockTrace(self.uc)
        self.phys = PhysMap(self.uc, vm)
        self.sched = scheduler_for(vm)
        self._ioctl_lock = threading.RLock()
        self._sregs = _reset_sregs(vcpu_id)
        self._mode_problem: str | None = "the vCPU is in real mode (its reset state)"
        self._poison_epoch = poison_epoch()
        self._loaded_fs = self._loaded_gs = 0
        self._cpuid: list[kvm_cpuid_entry2] = []
        self._ran = False
        irqchip = bool(getattr(vm, "irqchip", False))
        self._mp_state = int(MpState.UNINITIALIZED if irqchip and vcpu_id != 0
                             else MpState.RUNNABLE)
        self._pending: tuple[Any, ...] | None = None     # userspace completion owed
        self._pending_event: Event | None = None         # exception to (re)deliver
        self._ev: tuple[Any, ...] | None = None
        self._kicked = False
        self._preempt = False
        self._slice = 50_000
        self._ensured_cr3 = -1
        self._quiet_stops = 0
        self._sig: SignalWatch | None = None
        # An engine stop not handled yet because a signal handler raised first.
        self._deferred: tuple[Any, ...] | None = None
        self._pf_retry: tuple[int, int] | None = None
        # RF can only be set by a delivered fault's frame (via IRETQ) or by KVM_SET_REGS.
        self._rf_possible = False
        self._in_guest = False          # between the pending-invalidation check and the stop
        self._run_thread = 0
        self._inv_cond = threading.Condition()
        self._ensured_gen = -1
        self._io_opcode: dict[int, int] = {}     # IN/OUT instruction RIP -> its opcode
        self._fix_exception = False
        self._closed = False
        self._scratch = ctypes.create_string_buffer(PAGE_SIZE)
        regs = [0] * 18
        regs[3], regs[16], regs[17] = 0x600, 0xFFF0, RFLAGS_FIXED
        self.regs.write_gprs(regs)
        uc = self.uc
        uc.hook_add(UC_HOOK_INSN, self._on_in, None, 1, 0, X.UC_X86_INS_IN)
        uc.hook_add(UC_HOOK_INSN, self._on_out, None, 1, 0, X.UC_X86_INS_OUT)
        uc.hook_add(UC_HOOK_INSN, self._on_cpuid, None, 1, 0, X.UC_X86_INS_CPUID)
        uc.hook_add(UC_HOOK_INTR, self._on_intr)
        uc.hook_add(UC_HOOK_MEM_UNMAPPED, self._on_unmapped)
        uc.hook_add(UC_HOOK_MEM_WRITE_PROT, self._on_unmapped)
        uc.hook_add(UC_HOOK_INSN, self._on_syscall, None, 1, 0, X.UC_X86_INS_SYSCALL)
        E.enable_intercepts(uc)
        self._regs64 = self.regs
        self._smbase = SMBASE_RESET
        self._smi_pending = False
        self._smm: SmmState | None = None
        self._smm_engine: SmmEngine | None = None

    def __repr__(self) -> str:
        return f"<EmuVcpu {self.id}>"

    # ================================================================ ioctl dispatch
    def ioctl(self, request: int, arg: int, cin: CopyIn = copy_from_user,
              cout: CopyOut = copy_to_user) -> int:
        if self._closed:
            raise OSError(errno.EBADF, "vCPU is closed")
        e = VCPU_IOCTLS.get(request)
        if e is not None:
            with self._ioctl_lock:
                return call(e, request, arg, cin, cout, self)
        from .backend import is_kvm_ioctl

        if is_kvm_ioctl(request):
            # A real vCPU ioctl the emulator lacks (KVM_GET_STATS_FD, ...): ENOTTY, as a kernel
            # without it built in would answer; the selftests skip on that.
            raise OSError(errno.ENOTTY, f"{Ioctl.name_of(request)} on a vCPU fd is not "
                          "modelled by the emulated KVM")
        # kvm_arch_vcpu_ioctl() (arch/x86/kvm/x86.c): "default: r = -EINVAL".
        raise OSError(errno.EINVAL, f"emulated vCPU: unknown ioctl {request:#x}")

    def _ioctl_run(self, _: int) -> int:
        self._run_thread = threading.get_ident()
        try:
            return self._kvm_run()
        finally:
            self._run_thread = 0
            if self.phys.has_pending:
                self.phys.apply_pending()     # releases invalidate_hva() waiters
            if self._closed:
                self._teardown()

    def _ioctl_get_regs(self) -> bytes:
        return self.regs.gprs_bytes()

    def _ioctl_get_sregs(self, out: kvm_sregs) -> None:
        s = self._smm_view() if self._smm is not None else self._get_sregs()
        ctypes.memmove(ctypes.addressof(out), s.to_bytes(), ctypes.sizeof(out))

    def _ioctl_get_mp_state(self, out: kvm_mp_state) -> None:
        out.mp_state = self._mp_state

    def _ioctl_set_sregs(self, s: kvm_sregs) -> None:
        if self._smm is not None:
            raise OSError(errno.EINVAL, "KVM_SET_SREGS while the vCPU is in SMM is not modelled "
                          "by the emulated KVM")
        self._set_sregs(s)

    def _ioctl_smi(self, _: int) -> None:
        # KVM_SMI (api.rst 4.96): kvm_inject_smi() makes KVM_REQ_SMI, taken on the next
        # KVM_RUN; -ENOTTY without CONFIG_KVM_SMM (smm.h).
        if not self.vm.profile.cap(CAP_X86_SMM, self.vm.type):
            raise OSError(errno.ENOTTY, "KVM_SMI: no SMM in this kernel (KVM_CAP_X86_SMM 0)")
        self._smi_pending = True

    def _ioctl_enable_cap(self, _: int) -> None:
        # kvm_vcpu_ioctl_enable_cap(): no vCPU capability is modelled (refused before the
        # argument is read, as the emulator always has).
        raise OSError(errno.EINVAL, "KVM_ENABLE_CAP on a vCPU: no vCPU cap is modelled")

    # ================================================================ hooks (engine thread)
    def _on_in(self, uc: Any, port: int, size: int, ud: Any) -> int:
        rip, rax = self.regs.rip_rax.read()
        # RAX is restored after the stop: KVM writes it only when userspace completes the IN
        # (a 4-byte IN would otherwise zero-extend into RAX now).
        self._ev = ("in", port, size, rip, rax)
        uc.emu_stop()
        return int(rax) & ((1 << (8 * size)) - 1)

    def _on_out(self, uc: Any, port: int, size: int, value: int, ud: Any) -> None:
        self._ev = ("out", port, size, value, self.regs.read(X.UC_X86_REG_RIP))
        uc.emu_stop()

    def _on_cpuid(self, uc: Any, ud: Any) -> int:
        fn, idx = uc.reg_read_batch([X.UC_X86_REG_EAX, X.UC_X86_REG_ECX])
        a, b, c, d = self.cpuid(fn & 0xFFFF_FFFF, idx & 0xFFFF_FFFF)
        uc.reg_write_batch([(X.UC_X86_REG_RAX, a), (X.UC_X86_REG_RBX, b),
                            (X.UC_X86_REG_RCX, c), (X.UC_X86_REG_RDX, d)])
        return 1

    def _on_syscall(self, uc: Any, ud: Any) -> None:
        # With a hook, unicorn's helper_syscall only calls it and skips the instruction: the
        # emulator performs SYSCALL itself (_syscall()).
        if self._ev is None:
            self._ev = ("syscall", self.regs.read(X.UC_X86_REG_RIP))
        uc.emu_stop()

    def _on_intr(self, uc: Any, intno: int, ud: Any) -> None:
        code, is_int, next_eip = E.exception_info(uc)
        rip, cr2 = uc.reg_read_batch([X.UC_X86_REG_RIP, X.UC_X86_REG_CR2])
        if self._ev is None:
            self._ev = ("exc", intno, code, is_int, rip, next_eip, cr2)
        self._fix_exception = True
        uc.emu_stop()

    def _on_unmapped(self, uc: Any, access: int, addr: int, size: int, value: int,
                     ud: Any) -> bool:
        if access == UC_MEM_WRITE_PROT:
            # A write to a KVM_MEM_READONLY slot exits as an MMIO write (api.rst 4.35).
            self._ev = ("mmio", addr, size, True, value)
            return False
        f = self.phys.classify(addr)
        if f is None and size > 1:
            f = self.phys.classify(addr + size - 1)
        if f is None:
            return True          # the memslot was just mapped: retry the access
        if f.kind == "mmio":
            if access == UC_MEM_FETCH_UNMAPPED:
                self._ev = ("fetch_mmio", addr)
            else:
                self._ev = ("mmio", addr, size, access == UC_MEM_WRITE_UNMAPPED, value)
        else:
            self._ev = ("fault", f.gpa, f.flags)
        return False

    # ================================================================ other threads
    def preempt(self) -> None:
        """The scheduler wants the engine for another vCPU: yield at the end of the slice."""
        self._preempt = True

    def kick(self) -> None:
        """Interrupt a KVM_RUN in progress (as a signal does on real KVM: EINTR, exit INTR),
        at the end of the current slice. A kick while no KVM_RUN runs is lost
        (kvmpy.backend.Backend.kick)."""
        self._kicked = True

    def invalidate(self, gpa_lo: int, gpa_hi: int) -> None:
        """Drop mappings of [gpa_lo, gpa_hi) (kvm_mmu_zap of the range). Applied before the
        engine next runs guest code; if guest code is running in another thread this waits
        until the vCPU applied it at the end of its slice (a few ms), as KVM's zap and remote
        TLB flush complete before the ioctl returns."""
        seq = self.phys.invalidate(gpa_lo, gpa_hi)
        if not self._in_guest or threading.get_ident() == self._run_thread:
            return
        deadline = time.monotonic() + INVALIDATE_WAIT_S
        with self._inv_cond:
            self.phys.sync_waiters += 1
            try:
                while (self._in_guest and self.phys.applied_seq < seq
                       and time.monotonic() < deadline):
                    self._inv_cond.wait(0.002)
            finally:
                self.phys.sync_waiters -= 1

    def invalidate_hva(self, lo: int, hi: int, wait: bool = True) -> None:
        """Drop the slot maps over host range [lo, hi) before it is unmapped (EmuVm.
        host_unmapping()). Unlike invalidate(), this waits for a KVM_RUN in another thread
        until it applied the drop even while the engine is stopped: the exit handling in
        between reads guest memory through the same raw pointers."""
        seq = self.phys.invalidate_hva(lo, hi)
        run_thread = self._run_thread
        if not wait or not run_thread or threading.get_ident() == run_thread:
            return
        deadline = time.monotonic() + INVALIDATE_WAIT_S
        with self._inv_cond:
            self.phys.sync_waiters += 1
            try:
                while (self._run_thread and self.phys.applied_seq < seq
                       and time.monotonic() < deadline):
                    self._inv_cond.wait(0.002)
            finally:
                self.phys.sync_waiters -= 1

    def close(self) -> None:
        """Release the engine's mappings. A KVM_RUN still running in another thread (the
        kernel keeps the file alive for it) is kicked; the last one out tears down."""
        if self._closed:
            return
        self._closed = True
        self._kicked = True
        if self._ioctl_lock.acquire(timeout=1.0):
            try:
                self._teardown()
            finally:
                self._ioctl_lock.release()

    def _teardown(self) -> None:
        with self.vm.lock:
            self.phys.close()

    # ================================================================ KVM_RUN
    def _kvm_run(self) -> int:
        run = self.run
        self._kicked = False
        self._complete_userspace()
        if run.immediate_exit:
            # kvm_arch_vcpu_ioctl_run(): -EINTR once pending IO is completed; exit_reason is
            # left alone (measured on 6.18), unlike a signal, which sets KVM_EXIT_INTR.
            raise OSError(errno.EINTR, "KVM_RUN: immediate_exit")
        if self._smi_pending and self._smm is None:
            # vcpu_enter_guest() -> inject_pending_event(): a pending SMI outside SMM is taken
            # (svm_smi_allowed(): GIF is always set here), ++smi_count, enter_smm().
            self._smi_pending = False
            self._enter_smm()
        if self._smm is None and self._mode_problem is not None:
            gpa = self._unpaged_fetch_gpa()
            if gpa is not None and self.vm.find_memslot(gpa) is None:
                self._ran = True
                # Nothing to fetch from in any mode (e.g. a VM without memslots at the reset
                # vector): KVM emulates the fetch from MMIO and fails (handle_emulation_failure()).
                return self._emulation_failure(f"instruction fetch from gpa {gpa:#x} outside "
                                               "every memslot", gpa)
            raise OSError(errno.EINVAL, "emulated KVM cannot run this vCPU state: "
                          f"{self._mode_problem}; only 64-bit long mode at CPL 0 is modelled")
        self._ran = True
        if poison_epoch() != self._poison_epoch:
            # Memory failure recorded by another process (a forked injector): KVM's zap of the
            # poisoned pages (kvm_gmem_error_folio()) reaches this vCPU now.
            self._poison_epoch = poison_epoch()
            sync_poison()
            self.invalidate(0, 1 << 64)
        with SignalWatch() as self._sig:
            try:
                if self._mp_state != MpState.RUNNABLE:
                    return self._block()
                self.sched.acquire(self)
                try:
                    if self._smm is not None:
                        r = self._smm_loop()
                        if r is not None:
                            return r
                        if self._mode_problem is not None:
                            raise OSError(errno.EINVAL, "emulated KVM cannot run the state RSM "
                                          f"restored: {self._mode_problem}")
                    return self._loop()
                finally:
                    self.sched.release()
            finally:
                self._sig = None

    def _interrupted(self) -> bool:
        """A kick, or a signal delivered since KVM_RUN began (kvm_handle_signal_exit())."""
        sig = self._sig
        return self._kicked or (sig is not None and sig.fired())

    def _block(self) -> int:
        """A halted vCPU with an in-kernel irqchip waits for an event; no interrupt source is
        modelled, so only a kick or a signal ends the wait (-EINTR)."""
        while not self._interrupted():
            if self.phys.has_pending:
                self.phys.apply_pending()     # the engine is stopped: nothing to wait for
            time.sleep(0.001)
        return self._intr("kick" if self._kicked else "signal")

    def _loop(self) -> int:
        try:
            return self._loop_inner()
        finally:
            self._leave_guest()

    def _leave_guest(self) -> None:
        if self._in_guest:
            if self.phys.has_pending:
                self.phys.apply_pending()
            self._in_guest = False
            if self.phys.sync_waiters:
                with self._inv_cond:
                    self._inv_cond.notify_all()

    def _loop_inner(self) -> int:
        uc = self.uc
        self.phys.check_direct()
        while True:
            # From here until the engine stops, an invalidation queued by another thread waits
            # for this vCPU to apply it (see invalidate()).
            self._in_guest = True
            if self.phys.has_pending:
                self.phys.apply_pending()
            if self.phys.flush_needed:
                self.phys.flush_needed = False
                uc.ctl_flush_tb()
                self._io_opcode.clear()
            if self._interrupted():
                return self._intr("kick" if self._kicked else "signal")
            if self._deferred is not None:
                stop, self._deferred = self._deferred, None
                r = self._handle(stop, 0)
                if r is not None:
                    return r
                continue
            if self._preempt:
                self._preempt = False
                if self.sched.contended:
                    self._leave_guest()
                    self.sched.release()
                    self.sched.acquire(self)
                    continue
            if self._pending_event is not None:
                ev, self._pending_event = self._pending_event, None
                r = self._deliver(ev)
                if r is not None:
                    return r
                continue
            if self._fix_exception:
                self._fix_exception = False
                E.reset_old_exception(uc)
            regs = self.regs
            cr3, rip = regs.cr3_rip.read()      # ensure() below moves neither
            cr3 &= 0x000F_FFFF_FFFF_F000
            if cr3 != self._ensured_cr3 or self.phys.generation != self._ensured_gen:
                # Page tables are walked by unicorn without hooks: map their slot first.
                self.phys.ensure(cr3)
                self._ensured_cr3, self._ensured_gen = cr3, self.phys.generation
            self._ev = None
            err = 0
            t0 = time.perf_counter()
            try:
                uc.emu_start(rip, 0, 0, self._slice)
            except UcError as e:
                err = e.errno
                hook_exc = uc._hook_exception
                if hook_exc is not None:
                    # A hook raised (a Python signal handler that ran inside it): unicorn's
                    # binding reports the stop's UcError and drops the exception. It is the
                    # caller's, unchanged; the instruction at RIP is simply re-run next time.
                    uc._hook_exception = None
                    self._defer_stop()
                    raise hook_exc from None
            except BaseException:
                # A signal handler raised as the engine stopped: propagate it, keep the stop.
                self._defer_stop()
                raise
            self._leave_guest()
            n = self._counter.value
            if self._rf_possible and (n >= 2 or (n == 1 and not err and (
                    self._ev is None or self._ev[0] in ("in", "out")))):
                # The CPU clears RFLAGS.RF once an instruction completes; unicorn never does
                # (it is set in the frame of a fault and comes back with IRETQ).
                fl = regs.read(X.UC_X86_REG_RFLAGS)
                if fl & RFLAGS_RF:
                    regs.write(X.UC_X86_REG_RFLAGS, fl & ~RFLAGS_RF)
                self._rf_possible = False
            if self._ev is None and not err and n > self._slice:
                # End of a slice: adapt its length, then the loop checks kicks/preemption.
                dt = time.perf_counter() - t0
                if dt > SLICE_SLOW_S:
                    self._slice = max(SLICE_MIN, self._slice // 4)
                elif dt < SLICE_FAST_S:
                    self._slice = min(SLICE_MAX, self._slice * 2)
                continue
            r = self._handle(self._ev, err)
            if r is not None:
                return r

    def _defer_stop(self) -> None:
        """Keep an event a hook recorded for the next KVM_RUN (an OUT already retired must
        still exit); with no event the engine state is complete and RIP is simply re-run."""
        self._leave_guest()
        if self._ev is not None:
            self._deferred = self._ev
            self._ev = None

    def _handle(self, ev: tuple[Any, ...] | None, err: int) -> int | None:
        """Turn one engine stop into an exit (returned), or None to keep running."""
        run = self.run
        if ev is None:
            if err == UC_ERR_INSN_INVALID:
                return self._invalid_insn()
            if err:
                return self._internal(InternalSuberror.EMULATION,
                                      f"unicorn stopped with error {err}", [err])
            return self._quiet_stop()
        kind = ev[0]
        if kind == "out":
            _, port, size, value, insn_rip = ev
            next_rip = self.regs.read(X.UC_X86_REG_RIP)
            self._pending = ("out",)
            if next_rip == insn_rip:
                # A REP OUTS with elements left restarts: KVM's emulator sets RF then.
                self.regs.write(X.UC_X86_REG_RFLAGS,
                                self.regs.read(X.UC_X86_REG_RFLAGS) | RFLAGS_RF)
                self._rf_possible = True
            elif self._out_rip_at_insn(port) and self._is_plain_io(insn_rip, OUT_OPCODES):
                # x86.c kvm_fast_pio_out(): a plain OUT exits with RIP still at it;
                # complete_fast_pio_out() skips it on the next KVM_RUN. String OUTS is
                # retired by the instruction emulator before the exit (RIP after it).
                self.regs.write(X.UC_X86_REG_RIP, insn_rip)
                self._pending = ("pio_out", insn_rip, next_rip)
            self._io_exit(IoDirection.OUT, port, size)
            self._io_page[:size] = value.to_bytes(size, "little")
            return self._exit(ExitReason.IO)
        if kind == "in":
            _, port, size, in_rip, rax = ev
            next_rip = self.regs.read(X.UC_X86_REG_RIP)
            if not self._is_plain_io(in_rip, IN_OPCODES):
                return self._internal(InternalSuberror.EMULATION,
                                      "string IN (ins) is not modelled", [in_rip])
            self.regs.write(X.UC_X86_REG_RIP, in_rip)
            if size == 4:
                # _on_in() gave the engine RAX's own low bytes, so only a 4-byte IN (which
                # zero-extends into RAX) changed the register.
                self.regs.write(X.UC_X86_REG_RAX, rax)
            self._io_exit(IoDirection.IN, port, size)
            self._pending = ("in", in_rip, next_rip, size)
            return self._exit(ExitReason.IO)
        if kind == "syscall":
            return self._syscall(ev[1])
        if kind == "exc":
            _, vec, code, is_int, rip, next_eip, cr2 = ev
            if vec >= E.EXCP_VMEXIT:
                return self._intercepted(vec - E.EXCP_VMEXIT, code, rip)
            if vec == 14 and not is_int and self._spurious_pf(rip, cr2, code):
                return None
            if vec == 13 and not is_int and not canonical(rip):
                branch = self._noncanonical_branch(rip)
                if branch is not None:
                    return self._deliver(branch)
            return self._deliver(Event(vec, code if vec in HAS_ERROR_CODE and not is_int
                                       else None, is_int, rip, next_eip if is_int else rip,
                                       cr2 if vec == 14 else None))
        if kind == "mmio":
            _, gpa, size, is_write, value = ev
            m = run.exit.mmio
            m.phys_addr = gpa
            m.len = size
            m.is_write = 1 if is_write else 0
            if is_write:
                data = (value & ((1 << (8 * min(size, 8))) - 1)).to_bytes(min(size, 8), "little")
                ctypes.memmove(ctypes.addressof(m.data), data.ljust(8, b"\0"), 8)
                # KVM reports an MMIO write with the instruction retired.
                r = self._step_with_page(gpa, None)
                if r is not None:
                    return r
                m.phys_addr, m.len, m.is_write = gpa, size, 1
                ctypes.memmove(ctypes.addressof(m.data), data.ljust(8, b"\0"), 8)
                self._pending = ("out",)
            else:
                self._pending = ("mmio_read", gpa, size)
            return self._exit(ExitReason.MMIO)
        if kind == "fault":
            _, gpa, flags = ev
            return self._memory_fault(gpa, flags)
        if kind == "fetch_mmio":
            return self._emulation_failure(f"instruction fetch from gpa {ev[1]:#x} outside "
                                           "every memslot", ev[1])
        return self._internal(InternalSuberror.UNEXPECTED_EXIT_REASON, f"event {ev!r}", [])

    def _out_rip_at_insn(self, port: int) -> bool:
        """A plain OUT to ``port`` exits with RIP at it (the profile's out_exit_rip_at_insn),
        except port 0x7e while KVM_X86_QUIRK_OUT_7E_INC_RIP is enabled (the default):
        kvm_fast_pio_out() then skips the OUT before the exit. A stand-in VM without a
        profile (x86/fakevm.py) is mainline KVM."""
        profile = getattr(self.vm, "profile", None)
        if not getattr(profile, "out_exit_rip_at_insn", True):
            return False
        return port != 0x7E or bool(getattr(self.vm, "disabled_quirks", 0)
                                    & QUIRK_OUT_7E_INC_RIP)

    def _quiet_stop(self) -> int | None:
        """emu_start ended before its count with nothing reported: HLT (unicorn has no HLT
        hook; RIP is then just past an 0xF4). Unicorn 2.1.4 was also seen to end this way AT a
        vmcall after memory-map changes, instead of reporting UC_ERR_INSN_INVALID; anything
        else is re-run, and a stop that repeats without progress is an internal error."""
        rip = self.regs.read(X.UC_X86_REG_RIP)
        try:
            before = self._read_virt(rip - 1, 1)
        except (GuestFault, PhysFault):
            before = b""
        if before == b"\xf4":
            self._quiet_stops = 0
            return self._hlt()
        try:
            here = self._read_virt(rip, 3)
        except (GuestFault, PhysFault):
            here = b""
        if here in HYPERCALL_OPCODES:
            return self._invalid_insn()
        self._quiet_stops += 1
        if self._quiet_stops > 3:
            self._quiet_stops = 0
            return self._internal(InternalSuberror.EMULATION,
                                  f"the engine stops at RIP {rip:#x} without progress", [rip])
        return None

    def _hlt(self) -> int:
        # __kvm_emulate_halt(): KVM_EXIT_HLT without an in-kernel LAPIC; with one the vCPU
        # blocks as HALTED until an event (only a kick here).
        if getattr(self.vm, "irqchip", False):
            self._mp_state = int(MpState.HALTED)
            self.sched.release()
            try:
                return self._block()
            finally:
                self.sched.acquire(self)
        return self._exit(ExitReason.HLT)

    # ---------------------------------------------------------------- SMM (x86/smm.py)
    def _as1_slots(self) -> list[tuple[int, int, int, bool]]:
        """The address-space-1 memslots whose host memory is there (no guest_memfd slots:
        their private pages are not modelled in SMM)."""
        out = []
        for sl in self.vm.memslots.values():
            if sl.as_id != 1 or sl.gmem is not None or not sl.userspace_addr:
                continue
            if any(lo < sl.userspace_addr + sl.size and sl.userspace_addr < hi
                   for lo, hi in self.vm.hva_unmapping):
                continue
            try:
                libc_msync(sl.userspace_addr, sl.size, MS_ASYNC)
            except OSError:
                continue            # host memory gone: an access is refused below
            out.append((sl.gpa, sl.size, sl.userspace_addr, bool(sl.flags & READONLY)))
        return out

    def _enter_smm(self) -> None:
        """enter_smm() (arch/x86/kvm/smm.c): save the state at SMBASE + 0xFE00 in the 64-bit
        layout, then the SMM entry state; the handler runs in a second engine over address
        space 1 (x86/smm.py)."""
        if not self._cpuid_bit(0x80000001, "edx", 29):
            raise OSError(errno.EINVAL, "SMM entry for a guest CPUID without long mode (the "
                          "32-bit SMRAM layout) is not modelled by the emulated KVM")
        if self._smm_engine is None:
            eng = SmmEngine()
            uc = eng.uc
            uc.hook_add(UC_HOOK_INSN, self._on_in, None, 1, 0, X.UC_X86_INS_IN)
            uc.hook_add(UC_HOOK_INSN, self._on_out, None, 1, 0, X.UC_X86_INS_OUT)
            uc.hook_add(UC_HOOK_INTR, self._on_intr)
            uc.hook_add(UC_HOOK_MEM_UNMAPPED, self._on_smm_unmapped)
            uc.hook_add(UC_HOOK_MEM_WRITE_PROT, self._on_smm_unmapped)
            E.enable_intercepts(uc)
            self._smm_engine = eng
        eng = self._smm_engine
        saved = self._get_sregs()
        gprs = self._regs64.read_gprs()
        area = save_state(saved, gprs, self._smbase)
        with self.vm.lock:
            eng.remap(self._as1_slots())
            if not eng.write(self._smbase + SMRAM_SAVE, area):
                # kvm_vcpu_write_guest() failed: kvm_vm_dead().
                raise OSError(errno.EIO, f"SMM entry: the state-save area at "
                              f"{self._smbase + SMRAM_SAVE:#x} is not in an address-space-1 "
                              "memslot (KVM kills the VM)")
        view = smm_sregs(saved, self._smbase)
        eng.enter(view, gprs)
        self._smm = SmmState(saved, view)
        self.regs = eng.regs
        self._pending = None
        self._io_opcode.clear()
        self.trace.forget()

    def _smm_view(self) -> kvm_sregs:
        """KVM_GET_SREGS in SMM: the entry state with the segments the handler loaded."""
        assert self._smm is not None and self._smm_engine is not None
        s = kvm_sregs.from_buffer_copy(self._smm.view.to_bytes())
        for name, (sel, base) in self._smm_engine.segments().items():
            seg = getattr(s, name)
            seg.selector, seg.base = sel, base
        return s

    def _on_smm_unmapped(self, uc: Any, access: int, addr: int, size: int, value: int,
                         ud: Any) -> bool:
        self._ev = ("smm_mem", addr, access)
        return False

    def _smm_loop(self) -> int | None:
        """Run the SMI handler until an exit (returned) or RSM (None: the caller goes on
        in the restored state)."""
        eng = self._smm_engine
        assert eng is not None
        uc = eng.uc
        while self._smm is not None:
            if self.phys.has_pending:
                self.phys.apply_pending()     # release invalidate_hva() waiters
            if self._interrupted():
                return self._intr("kick" if self._kicked else "signal")
            self._ev = None
            err = 0
            with self.vm.lock:
                eng.remap(self._as1_slots())
                try:
                    uc.emu_start(eng.regs.read(X.UC_X86_REG_RIP), 0, 0, self._slice)
                except UcError as e:
                    err = e.errno
                    hook_exc = uc._hook_exception
                    if hook_exc is not None:
                        uc._hook_exception = None
                        raise hook_exc from None
                ev = self._ev
                if ev is None and not err and eng.counter.value > self._slice:
                    continue
                r = self._smm_stop(ev, err)
            if r is not None:
                return r
        return None

    def _smm_stop(self, ev: tuple[Any, ...] | None, err: int) -> int | None:
        eng = self._smm_engine
        assert eng is not None
        if ev is None and err == UC_ERR_INSN_INVALID:
            ip = eng.regs.read(X.UC_X86_REG_RIP)
            if (eng.read(eng.cs_base() + ip, 2) or b"") == b"\x0f\xaa":
                return self._rsm()
            return self._smm_exception(6)
        if ev is None:
            if err:
                return self._internal(InternalSuberror.EMULATION,
                                      f"unicorn stopped with error {err} in SMM", [err])
            return self._quiet_stop()
        kind = ev[0]
        if kind in ("in", "out"):
            return self._handle(ev, err)
        if kind == "exc":
            if ev[1] >= E.EXCP_VMEXIT:
                raise OSError(errno.EINVAL, "MOV to CR0/CR4 or RDMSR/WRMSR in SMM is not "
                              "modelled by the emulated KVM")
            return self._smm_exception(ev[1])
        if kind == "smm_mem":
            raise OSError(errno.EINVAL, f"SMM access to gpa {ev[1]:#x} outside the "
                          "address-space-1 memslots (MMIO in SMM) is not modelled")
        return self._internal(InternalSuberror.UNEXPECTED_EXIT_REASON, f"SMM event {ev!r}", [])

    def _smm_exception(self, vec: int) -> int:
        """An exception in the handler: with the IDT limit enter_smm() leaves (0) the real-mode
        vector does not fit, #GP and #DF neither: a triple fault (KVM_EXIT_SHUTDOWN)."""
        eng = self._smm_engine
        assert eng is not None
        _, _, limit, _ = eng.uc.reg_read(X.UC_X86_REG_IDTR)
        if limit:
            raise OSError(errno.EINVAL, f"exception {vec} in SMM with an IDT: real-mode "
                          "delivery is not modelled by the emulated KVM")
        return self._exit(ExitReason.SHUTDOWN)

    def _rsm(self) -> int | None:
        """RSM: em_rsm() -> emulator_leave_smm() -> rsm_load_state_64() from the save area
        (which the handler may have changed); a state that cannot be loaded is a triple
        fault."""
        eng, smm = self._smm_engine, self._smm
        assert eng is not None and smm is not None
        raw = eng.read(self._smbase + SMRAM_SAVE, SMRAM_SIZE)
        self.regs = self._regs64
        self._smm = None
        self._io_opcode.clear()
        self.trace.forget()
        if raw is None:
            return self._exit(ExitReason.SHUTDOWN)
        st = load_state(raw, smm.saved)
        self._smbase = st.smbase
        try:
            self._set_sregs(st.sregs)
        except OSError:
            return self._exit(ExitReason.SHUTDOWN)
        self.regs.write_gprs(st.gprs)
        self.phys.flush_needed = True
        return None

    # ---------------------------------------------------------------- userspace completion
    def _complete_userspace(self) -> None:
        """complete_userspace_io: finish the exit userspace just handled."""
        p, self._pending = self._pending, None
        if p is None or p[0] == "out":
            return
        uc = self.uc
        if p[0] == "pio_out":
            # complete_fast_pio_out(): skip the OUT unless userspace moved RIP off it
            # (kvm_is_linear_rip(); CS base is 0 in 64-bit mode, and KVM_SET_SREGS is
            # refused in SMM, so comparing RIP is enough).
            _, out_rip, next_rip = p
            if self.regs.read(X.UC_X86_REG_RIP) == out_rip:
                self.regs.write(X.UC_X86_REG_RIP, next_rip)
            return
        if p[0] == "in":
            _, in_rip, next_rip, size = p
            # complete_fast_pio_in(): dropped if userspace moved RIP; sizes below 4 merge
            # into RAX, 4 zero-extends.
            rip, rax = self.regs.rip_rax.read()
            if rip != in_rip:
                return
            data = int.from_bytes(self._io_page[:size], "little")
            if size >= 4:
                rax = 0
            mask = (1 << (8 * size)) - 1
            self.regs.rax_rip.write((rax & ~mask) | data, next_rip)
        elif p[0] == "hypercall":
            # complete_hypercall_exit(): hypercall.ret to RAX, skip the instruction.
            uc.reg_write_batch([(X.UC_X86_REG_RAX, self.run.exit.hypercall.ret),
                                (X.UC_X86_REG_RIP, uc.reg_read(X.UC_X86_REG_RIP) + 3)])
        elif p[0] == "mmio_read":
            _, gpa, size = p
            answer = bytes(self.run.exit.mmio.data)[:size]
            if self.phys.has_pending:
                self.phys.apply_pending()     # an unmap since the exit: no stale pointers
            self.sched.acquire(self)
            try:
                self._step_with_page(gpa, answer)
            finally:
                self.sched.release()

    def _step_with_page(self, gpa: int, data: bytes | None) -> int | None:
        """Retire the one instruction at RIP with a scratch page at ``gpa``'s page holding
        ``data`` (an MMIO read's answer) or absorbing a write."""
        uc = self.uc
        page = gpa & ~(PAGE_SIZE - 1)
        ctypes.memset(self._scratch, 0, PAGE_SIZE)
        if data:
            off = gpa - page
            ctypes.memmove(ctypes.addressof(self._scratch) + off, data[:PAGE_SIZE - off],
                           min(len(data), PAGE_SIZE - off))
        self._ev = None
        err = 0
        with self.phys.hole(page):
            uc.mem_map_ptr(page, PAGE_SIZE, 7, ctypes.addressof(self._scratch))
            try:
                uc.emu_start(uc.reg_read(X.UC_X86_REG_RIP), 0, 0, 1)
            except UcError as e:
                err = e.errno
            finally:
                uc.mem_unmap(page, PAGE_SIZE)
        if err or self._ev is not None:
            if self._ev is not None and self._ev[0] == "exc":
                return self._handle(self._ev, 0)
            return self._internal(InternalSuberror.EMULATION,
                                  "an MMIO instruction touched a second MMIO or faulting page",
                                  [gpa])
        return None


# --- which vCPU ioctls the emulated KVM models (dispatch.py decodes the arguments); each runs
# under the vCPU's ioctl lock (KVM: vcpu->mutex). KVM_PRE_FAULT_MEMORY: backend.py.
V = EmuVcpu
VCPU_IOCTLS: Table = check_table({
    R.KVM_RUN:          Entry(int, V._ioctl_run),
    R.KVM_GET_REGS:     Entry(Out, V._ioctl_get_regs),
    R.KVM_SET_REGS:     Entry(kvm_regs, V._set_regs),
    R.KVM_GET_SREGS:    Entry(kvm_sregs, V._ioctl_get_sregs),
    R.KVM_SET_SREGS:    Entry(kvm_sregs, V._ioctl_set_sregs),
    R.KVM_SET_CPUID2:   Entry(Ptr, V._set_cpuid2),
    R.KVM_GET_CPUID2:   Entry(Ptr, V._get_cpuid2),
    R.KVM_GET_MP_STATE: Entry(kvm_mp_state, V._ioctl_get_mp_state),
    R.KVM_SET_MP_STATE: Entry(kvm_mp_state, lambda v, m: v._set_mp_state(m.mp_state)),
    R.KVM_ENABLE_CAP:   Entry(int, V._ioctl_enable_cap),
    R.KVM_GET_MSRS:     Entry(Ptr, lambda v, a: v._msr_io(a, False)),
    R.KVM_SET_MSRS:     Entry(Ptr, lambda v, a: v._msr_io(a, True)),
    R.KVM_SMI:          Entry(int, V._ioctl_smi),
})
del V

__all__ = ["EmuVcpu"]
