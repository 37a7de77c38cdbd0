"""The vCPU object: a KVM_CREATE_VCPU fd, its mmap'd kvm_run, and decoded exits."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import struct
import threading
from collections import abc as _abc
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._call import _describe, checked_ioctl, errno_ioctl, pack
from ._object import FdObject
from .backend import MAP_SHARED, PROT_READ, PROT_WRITE, Backend, IoctlArg
from .errors import ClosedError, Errno, KvmError
from .memory import Mapping
from .uapi import (
    ExitReason,
    Ioctl,
    IoDirection,
    MpState,
    kvm_cpuid_entry2,
    kvm_mp_state,
    kvm_pre_fault_memory,
    kvm_regs,
    kvm_run,
    kvm_run_io,
    kvm_sregs,
    make_cpuid2,
    make_msrs,
)
from .uapi.structs import _struct_setattr

if TYPE_CHECKING:
    from .vm import Vm


@dataclasses.dataclass(frozen=True)
class IoExit:
    direction: IoDirection
    size: int
    port: int
    count: int
    data_offset: int
    #: For OUT: the bytes the guest wrote (size * count).
    data: bytes


@dataclasses.dataclass(frozen=True)
class MmioExit:
    phys_addr: int
    data: bytes
    len: int
    is_write: bool


@dataclasses.dataclass(frozen=True)
class HypercallExit:
    nr: int
    args: tuple[int, ...]
    flags: int


@dataclasses.dataclass(frozen=True)
class MemoryFaultExit:
    flags: int
    gpa: int
    size: int


@dataclasses.dataclass(frozen=True)
class InternalExit:
    suberror: int
    data: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Exit:
    """One KVM_RUN outcome, decoded from kvm_run.

    ``errno`` is 0 for a normal return, EFAULT for KVM_EXIT_MEMORY_FAULT (KVM_RUN returns
    -1/EFAULT with the exit filled in: api.rst 5. "KVM_EXIT_MEMORY_FAULT") and EINTR for a run
    interrupted by a signal or immediate_exit (exit_reason KVM_EXIT_INTR).
    """

    reason: ExitReason | int
    errno: int = 0
    io: IoExit | None = None
    mmio: MmioExit | None = None
    hypercall: HypercallExit | None = None
    memory_fault: MemoryFaultExit | None = None
    internal: InternalExit | None = None
    exception: tuple[int, int] | None = None

    def __str__(self) -> str:
        name = ExitReason.name_of(int(self.reason))
        detail = ""
        if self.io:
            detail = (f" {self.io.direction.name} port {self.io.port:#x} size {self.io.size}"
                      f" count {self.io.count}")
        elif self.mmio:
            detail = (f" {'write' if self.mmio.is_write else 'read'} {self.mmio.phys_addr:#x} "
                      f"len {self.mmio.len}")
        elif self.hypercall:
            detail = f" nr {self.hypercall.nr} args {[hex(a) for a in self.hypercall.args]}"
        elif self.memory_fault:
            mf = self.memory_fault
            detail = f" flags {mf.flags:#x} gpa {mf.gpa:#x} size {mf.size:#x}"
        elif self.internal:
            detail = f" suberror {self.internal.suberror}"
        return f"KVM_EXIT_{name}{detail}"


_REASONS: dict[int, ExitReason] = {int(m): m for m in ExitReason}
_DIRECTIONS = (IoDirection.IN, IoDirection.OUT)
#: kvm_run.exit.io (kvm_run_io): direction, size, port, count, data_offset.
_IO = struct.Struct("<BBHIQ")
_IO_OFFSET = kvm_run.exit.offset
assert _IO.size == ctypes.sizeof(kvm_run_io)
_new = object.__new__


def _exit(reason: ExitReason | int, err: int, io: IoExit | None = None) -> Exit:
    """``Exit(reason, err, io=io)``, the same object, without the frozen dataclass's
    __init__ (one object.__setattr__ per field: 2 of the ~4 us an IO exit took to decode)."""
    ex = _new(Exit)
    ex.__dict__.update(reason=reason, errno=err, io=io, mmio=None, hypercall=None,
                       memory_fault=None, internal=None, exception=None)
    return ex


class Vcpu(FdObject):
    """A vCPU fd and its kvm_run mapping.

    Another thread may :meth:`kick` a KVM_RUN in progress or :meth:`close` the vCPU under it:
    close kicks the run, waits for it to return (bounded), then unmaps kvm_run; the running
    thread gets a ClosedError instead of its exit.
    """

    def __init__(self, vm: Vm, fd: int, vcpu_id: int) -> None:
        self.vm = vm
        self.backend = vm.backend
        self._init_fd(fd)
        self.id = vcpu_id
        size = vm.kvm.get_vcpu_mmap_size()
        try:
            addr = self.backend.mmap(fd, size, PROT_READ | PROT_WRITE, MAP_SHARED, 0)
        except OSError as e:
            self.backend.close(fd)
            self.fd = -1
            raise KvmError(e.errno or 0, "mmap", f"kvm_run of vCPU {vcpu_id}") from None
        self._map = Mapping(self.backend, addr, size, f"kvm_run of vCPU {vcpu_id}")
        self._view = self._map.view()
        # from_buffer, not from_address: the struct holds an export of the mapping, so one kept
        # past close() is seen by Mapping.close and never reads an unmapped page.
        self._run: kvm_run = kvm_run.from_buffer(self._view)
        self.last_exit: Exit | None = None
        #: The thread inside KVM_RUN (ident), if any; guarded by _lock.
        self._runner: int | None = None
        self._kicked = False
        # Whether the backend has run_begin/run_end to call around a run (the host's signal
        # mask; the emulator has none, and KVM_RUN is the hot call of the emulated guest).
        cls = type(self.backend)
        self._run_hooks = (cls.run_begin is not Backend.run_begin
                           or cls.run_end is not Backend.run_end)

    def __repr__(self) -> str:
        return f"<Vcpu {self.id} fd {self.fd} of {self.vm!r}>"

    @property
    def run_struct(self) -> kvm_run:
        """The mmap'd kvm_run (valid while the vCPU is open)."""
        self._check_open("kvm_run")
        return self._run

    # --- running ------------------------------------------------------------------------
    def run(self) -> Exit:
        """KVM_RUN once and decode the exit.

        KVM_EXIT_MEMORY_FAULT (-1/EFAULT) and KVM_EXIT_INTR (-1/EINTR) come back as exits;
        any other failure raises KvmError, and a vCPU closed during the run ClosedError. An
        exception raised by a signal handler during the run propagates.
        """
        fd = self._enter("KVM_RUN")
        try:
            err = self._run_errno(fd)
            reason = self._run.exit_reason
            if err and not (err == errno.EFAULT and reason == ExitReason.MEMORY_FAULT) \
                    and err != errno.EINTR:
                raise KvmError(err, "KVM_RUN", f"vCPU {self.id}, exit_reason "
                               f"{ExitReason.name_of(reason)}")
            if err == errno.EINTR:
                reason = ExitReason.INTR
            # Decoded before _leave: close() cannot unmap kvm_run under it.
            ex = self._decode(reason, err)
        finally:
            self._leave()
        if self._closing:
            raise ClosedError(self._what(), "KVM_RUN", "closed by another thread during the run")
        self.last_exit = ex
        return ex

    def try_run(self) -> Errno:
        """KVM_RUN returning the errno (0 on success)."""
        fd = self._enter("KVM_RUN")
        try:
            return Errno(self._run_errno(fd), "KVM_RUN")
        finally:
            self._leave()

    def _run_errno(self, fd: int, request: Ioctl = Ioctl.KVM_RUN,
                   arg: IoctlArg = None) -> int:
        """One KVM_RUN (or KVM_PRE_FAULT_MEMORY), kickable by another thread while it is in
        progress (see kick); returns its errno (0 on success)."""
        hooks = self._run_hooks
        token = self.backend.run_begin(fd, request == Ioctl.KVM_RUN) if hooks else None
        with self._lock:
            self._runner = threading.get_ident()
            self._kicked = False
        try:
            return self.backend.ioctl_errno(fd, request, arg)[1]
        finally:
            with self._lock:
                self._runner = None
                kicked = self._kicked
            if hooks:
                self.backend.run_end(fd, token, kicked)

    def kick(self) -> bool:
        """Make a KVM_RUN (or KVM_PRE_FAULT_MEMORY) in progress in another thread return
        (KVM_EXIT_INTR / EINTR). Returns False
        when no run is in progress; a kick that lands just before the run starts still ends it
        (the backend keeps it pending), one sent after it returned is never delivered."""
        with self._lock:
            return self._kick_locked()

    def _kick_locked(self) -> bool:
        if self._runner is None or self.fd < 0:
            return False
        self.backend.kick(self.fd, self._runner)
        self._kicked = True
        return True

    def _evict(self) -> None:
        self._kick_locked()

    def _decode(self, reason: int, err: int) -> Exit:
        r: ExitReason | int = _REASONS.get(reason, reason)
        if r == ExitReason.IO:
            # One unpack of kvm_run.io instead of a ctypes object per field read: this is the
            # ucall exit, decoded on every round trip of a guest (issue 15).
            d, size, port, count, off = _IO.unpack_from(self._view, _IO_OFFSET)
            data = b""
            if d == IoDirection.OUT:
                n = size * count
                data = self._map.read(off, n) if off + n <= self._map.length else b""
            io = _new(IoExit)
            io.__dict__.update(direction=_DIRECTIONS[d] if d < 2 else IoDirection(d), size=size,
                               port=port, count=count, data_offset=off, data=data)
            return _exit(r, err, io)
        u = self._run.exit
        if r == ExitReason.MMIO:
            m = u.mmio
            return Exit(r, err, mmio=MmioExit(m.phys_addr, bytes(m.data), m.len, bool(m.is_write)))
        if r == ExitReason.HYPERCALL:
            h = u.hypercall
            return Exit(r, err, hypercall=HypercallExit(h.nr, tuple(h.args), h.flags))
        if r == ExitReason.MEMORY_FAULT:
            f = u.memory_fault
            return Exit(r, err, memory_fault=MemoryFaultExit(f.flags, f.gpa, f.size))
        if r == ExitReason.INTERNAL_ERROR:
            i = u.internal
            n = min(i.ndata, 16)
            return Exit(r, err, internal=InternalExit(i.suberror, tuple(i.data[:n])))
        if r == ExitReason.EXCEPTION:
            return Exit(r, err, exception=(u.ex.exception, u.ex.error_code))
        return _exit(r, err)

    @property
    def immediate_exit(self) -> bool:
        return bool(self.run_struct.immediate_exit)

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        # ctypes' own setter: 0 and 1 fit the __u8 (KvmStruct's check is for callers' values).
        _struct_setattr(self.run_struct, "immediate_exit", 1 if value else 0)

    def complete_io(self) -> None:
        """Complete a pending PIO/MMIO exit without running the guest further: KVM_RUN with
        immediate_exit set, which returns -EINTR (as the selftests' vcpu_run_complete_io)."""
        _struct_setattr(self.run_struct, "immediate_exit", 1)
        try:
            fd = self._enter("KVM_RUN")
            try:
                err = self._run_errno(fd)
            finally:
                self._leave()
        finally:
            if not self.closed:
                _struct_setattr(self._run, "immediate_exit", 0)
        if err != errno.EINTR:
            raise KvmError(err or errno.EINVAL, "KVM_RUN",
                           "immediate_exit to complete IO did not return EINTR")

    def io_data(self) -> memoryview:
        """The PIO data area (kvm_run + io.data_offset) for the current IO exit."""
        io = self.run_struct.exit.io
        n = io.size * io.count
        if io.data_offset + n > self._map.length:
            raise ValueError(f"vCPU {self.id}: io.data_offset {io.data_offset:#x} + {n} is "
                             f"outside the {self._map.length:#x}-byte kvm_run mapping")
        return self._view[io.data_offset: io.data_offset + n]

    # _enter/_leave rather than ``with self._use()``: these carry every vCPU ioctl but KVM_RUN.
    def _ioctl(self, request: Ioctl, arg: IoctlArg = None, detail: str = "") -> int:
        fd = self._enter(request._name_)
        try:
            return checked_ioctl(self.backend, fd, request, arg, detail)
        finally:
            self._leave()

    def _try_ioctl(self, request: Ioctl, arg: IoctlArg = None) -> Errno:
        fd = self._enter(request._name_)
        try:
            return errno_ioctl(self.backend, fd, request, arg)[0]
        finally:
            self._leave()

    # --- registers ----------------------------------------------------------------------
    def get_regs(self) -> kvm_regs:
        r = kvm_regs()
        self._ioctl(Ioctl.KVM_GET_REGS, r)
        return r

    def set_regs(self, regs: kvm_regs) -> None:
        self._ioctl(Ioctl.KVM_SET_REGS, regs)

    def get_sregs(self) -> kvm_sregs:
        s = kvm_sregs()
        self._ioctl(Ioctl.KVM_GET_SREGS, s)
        return s

    def set_sregs(self, sregs: kvm_sregs) -> None:
        self._ioctl(Ioctl.KVM_SET_SREGS, sregs)

    def set_cpuid2(self, entries: list[kvm_cpuid_entry2]) -> None:
        buf = make_cpuid2(len(entries))
        for i, e in enumerate(entries):
            buf.entries[i] = e
        self._ioctl(Ioctl.KVM_SET_CPUID2, buf, f"{len(entries)} entries")

    def get_mp_state(self) -> MpState | int:
        s = kvm_mp_state()
        self._ioctl(Ioctl.KVM_GET_MP_STATE, s)
        try:
            return MpState(s.mp_state)
        except ValueError:
            return int(s.mp_state)

    def set_mp_state(self, state: int) -> None:
        self._ioctl(Ioctl.KVM_SET_MP_STATE,
                    pack(Ioctl.KVM_SET_MP_STATE, kvm_mp_state, mp_state=int(state)))

    # --- MSRs (api.rst 4.18 KVM_GET_MSRS / KVM_SET_MSRS) --------------------------------------
    def get_msrs(self, indices: Sequence[int]) -> list[int]:
        """KVM_GET_MSRS for ``indices``; their values in order. The kernel processes entries
        until the first one it does not support and returns that count (x86.c msr_io()):
        fewer than all raises KvmError(EINVAL) naming the first unprocessed index."""
        buf = _msr_buf(indices)
        err, n = self.try_get_msrs(buf)
        _msr_check("KVM_GET_MSRS", err, n, buf, None)
        return [int(buf.entries[i].data) for i in range(len(indices))]

    def set_msrs(self, values: _abc.Mapping[int, int] | Sequence[tuple[int, int]]) -> None:
        """KVM_SET_MSRS of (index, value) pairs, in order; all must be accepted (see
        get_msrs), else KvmError(EINVAL) naming the first refused index."""
        pairs = list(values.items()) if isinstance(values, _abc.Mapping) else list(values)
        buf = _msr_buf([i for i, _ in pairs], [v for _, v in pairs])
        err, n = self.try_set_msrs(buf)
        _msr_check("KVM_SET_MSRS", err, n, buf, pairs)

    def try_get_msrs(self, buf: Any) -> tuple[Errno, int]:
        """One KVM_GET_MSRS on a :func:`kvmpy.uapi.make_msrs` buffer (data filled in place):
        (errno, number of entries processed)."""
        with self._use("KVM_GET_MSRS") as fd:
            err, n = errno_ioctl(self.backend, fd, Ioctl.KVM_GET_MSRS, buf)
        return err, max(n, 0)

    def try_set_msrs(self, buf: Any) -> tuple[Errno, int]:
        """One KVM_SET_MSRS of a :func:`kvmpy.uapi.make_msrs` buffer: (errno, number of
        entries processed)."""
        with self._use("KVM_SET_MSRS") as fd:
            err, n = errno_ioctl(self.backend, fd, Ioctl.KVM_SET_MSRS, buf)
        return err, max(n, 0)

    # --- SMM ----------------------------------------------------------------------------------
    def smi(self) -> None:
        """KVM_SMI (api.rst 4.96): queue an SMI; the vCPU enters SMM on its next KVM_RUN."""
        self._ioctl(Ioctl.KVM_SMI)

    def try_smi(self) -> Errno:
        """KVM_SMI returning the errno (ENOTTY on a kernel without SMM)."""
        return self._try_ioctl(Ioctl.KVM_SMI)

    # --- pre-fault ------------------------------------------------------------------------
    def pre_fault_memory(self, gpa: int, size: int, flags: int = 0) -> kvm_pre_fault_memory:
        """KVM_PRE_FAULT_MEMORY until the range is done, retrying EINTR/EAGAIN (api.rst 4.143).

        Returns the final range (size 0 on success); raises KvmError with what is left on error.
        """
        r = pack(Ioctl.KVM_PRE_FAULT_MEMORY, kvm_pre_fault_memory, gpa=gpa, size=size,
                 flags=flags)
        while True:
            err = self.try_pre_fault_memory(r)
            if err in (errno.EINTR, errno.EAGAIN):
                continue
            if err:
                raise KvmError(err, "KVM_PRE_FAULT_MEMORY",
                               f"gpa {gpa:#x} size {size:#x} flags {flags:#x}; left gpa "
                               f"{r.gpa:#x} size {r.size:#x}")
            if r.size == 0:
                return r

    def try_pre_fault_memory(self, r: kvm_pre_fault_memory) -> Errno:
        """One KVM_PRE_FAULT_MEMORY call on ``r`` (updated in place); returns the errno."""
        with self._use("KVM_PRE_FAULT_MEMORY") as fd:
            err = self._run_errno(fd, Ioctl.KVM_PRE_FAULT_MEMORY, r)
        return Errno(err, "KVM_PRE_FAULT_MEMORY", lambda: _describe(r))

    # --- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """Kick a run in progress, wait for it (bounded: KvmError EBUSY, nothing unmapped),
        then unmap kvm_run and close the fd."""
        if self._begin_close():
            del self._run
            with contextlib.suppress(BufferError):  # a kept run_struct: Mapping.close copes
                self._view.release()
            self._map.close()
            self.backend.close(self.fd)
            self._end_close()
        if self in self.vm.vcpus:
            self.vm.vcpus.remove(self)

    def __enter__(self) -> Vcpu:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _msr_buf(indices: Sequence[int], values: Sequence[int] | None = None) -> Any:
    buf = make_msrs(len(indices))
    for i, idx in enumerate(indices):
        buf.entries[i].index = idx
        if values is not None:
            buf.entries[i].data = values[i]
    return buf


def _msr_check(call: str, err: int, n: int, buf: Any, pairs: list[tuple[int, int]] | None
               ) -> None:
    if err:
        raise KvmError(err, call, f"{buf.nmsrs} MSRs")
    if n < buf.nmsrs:
        idx = int(buf.entries[n].index)
        what = f"={pairs[n][1]:#x}" if pairs is not None else ""
        raise KvmError(errno.EINVAL, call, f"processed {n} of {buf.nmsrs}: MSR {idx:#x}{what} "
                       "not supported")


def rip_of(vcpu: Vcpu) -> int:
    """The vCPU's RIP (for reports)."""
    return int(vcpu.get_regs().rip)


__all__ = [
    "Exit",
    "HypercallExit",
    "InternalExit",
    "IoExit",
    "MemoryFaultExit",
    "MmioExit",
    "Vcpu",
    "rip_of",
]
