"""The real-host backend: libc syscalls through ctypes.

``fcntl.ioctl`` passes its integer argument as a C int (so large unsigned values overflow) and,
given a bytes buffer, returns the buffer instead of the ioctl's result (KVM_CREATE_GUEST_MEMFD
returns an fd), so ioctl goes straight to libc.
"""

from __future__ import annotations

import ctypes
import os
import platform
import signal
import threading

from ..errors import KvmUnavailable
from ..uapi.ioctls import Ioctl
from ..uapi.structs import kvm_signal_mask_x86
from . import Backend, IoctlArg, arg_pointer, default_device
from .libc import errno_error, libc, libc_fallocate, libc_madvise, libc_mmap, libc_munmap

_libc_ioctl = libc.ioctl
_addressof = ctypes.addressof
_get_errno = ctypes.get_errno


def _check(ret: int, what: str) -> int:
    if ret == -1:
        raise errno_error(what)
    return ret


#: The signal that kicks a vCPU out of KVM_RUN.
KICK_SIGNAL = signal.SIGUSR1


def _sigset_bits(signals: set[signal.Signals] | set[int]) -> int:
    """A kernel sigset_t (signal n is bit n-1) for KVM_SET_SIGNAL_MASK."""
    return sum(1 << (int(s) - 1) for s in signals if 0 < int(s) <= 64)


def _need_kick_handler() -> None:
    handler = signal.getsignal(KICK_SIGNAL)
    if callable(handler):
        return
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(f"cannot make a vCPU ioctl other than KVM_RUN interruptible from "
                           f"this thread: {KICK_SIGNAL.name} is {handler!r} and Python "
                           f"installs handlers only in the main thread; call "
                           f"signal.signal({KICK_SIGNAL.name}, ...) there first")
    signal.signal(KICK_SIGNAL, lambda signum, frame: None)


class HostBackend(Backend):
    """Real syscalls against the running kernel's /dev/kvm."""

    name = "kvm"

    def __init__(self, device: str | None = None) -> None:
        self.device = device or default_device()
        # vCPU fd -> the sigset last given to KVM_SET_SIGNAL_MASK for it.
        self._run_masks: dict[int, int] = {}

    def open_kvm(self) -> int:
        try:
            return os.open(self.device, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError as e:
            raise KvmUnavailable(f"{self.device} does not exist (no KVM on this host, or "
                                 "the kvm module is not loaded)") from e
        except PermissionError as e:
            raise KvmUnavailable(f"no permission to open {self.device} (add the user to "
                                 "the kvm group or run as root)") from e
        except OSError as e:
            raise KvmUnavailable(f"cannot open {self.device}: {e.strerror}") from e

    def ioctl(self, fd: int, request: int, arg: IoctlArg = None) -> int:
        return _check(libc.ioctl(fd, request, arg_pointer(arg)), f"ioctl({request:#x})")

    def ioctl_errno(self, fd: int, request: int, arg: IoctlArg = None) -> tuple[int, int]:
        # ioctl's answer without building and catching an OSError (3 of the ~5 us a refused
        # ioctl cost through ioctl on the host); the pointer as arg_pointer() computes it.
        if arg is None:
            p = 0
        elif isinstance(arg, int):
            p = arg_pointer(arg)
        else:
            p = _addressof(arg)
        ret = _libc_ioctl(fd, request, p)
        if ret == -1:
            return -1, _get_errno()
        return ret, 0

    def mmap(self, fd: int, length: int, prot: int, flags: int, offset: int = 0,
             addr: int = 0) -> int:
        return libc_mmap(addr, length, prot, flags, fd, offset)

    def munmap(self, addr: int, length: int) -> None:
        libc_munmap(addr, length)

    def madvise(self, addr: int, length: int, advice: int) -> None:
        libc_madvise(addr, length, advice)

    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        libc_fallocate(fd, mode, offset, length)

    def fstat(self, fd: int) -> os.stat_result:
        return os.fstat(fd)

    def read(self, fd: int, count: int) -> bytes:
        return os.read(fd, count)

    def write(self, fd: int, data: bytes) -> int:
        return os.write(fd, data)

    def pread(self, fd: int, count: int, offset: int) -> bytes:
        return os.pread(fd, count, offset)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def close(self, fd: int) -> None:
        self._run_masks.pop(fd, None)
        os.close(fd)

    # A kick is KICK_SIGNAL sent to the thread in KVM_RUN, which returns -EINTR with
    # KVM_EXIT_INTR (api.rst 4.10 KVM_RUN). The thread keeps the signal blocked outside the
    # guest and KVM_SET_SIGNAL_MASK unblocks it only while the guest runs (api.rst 4.20).
    # Blocked signals are never ignored (sig_ignored(), kernel/signal.c; KVM saves the thread's
    # mask in real_blocked during the run), so this works whatever the signal's disposition -
    # SIG_DFL, SIG_IGN or a handler - and from whichever thread made the backend. The pending
    # signal is consumed with sigtimedwait before the thread's mask is restored.
    def run_begin(self, vcpu_fd: int, kvm_run: bool = True) -> object:
        if not kvm_run:
            # Other ioctls (KVM_PRE_FAULT_MEMORY) run with the thread's own mask: the signal
            # must be unblocked and caught, by a handler installed without SA_RESTART.
            _need_kick_handler()
            return None
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {KICK_SIGNAL})
        run_mask = _sigset_bits(set(old) - {KICK_SIGNAL})
        if self._run_masks.get(vcpu_fd) != run_mask:
            arg = kvm_signal_mask_x86(len=8, sigset=run_mask)
            try:
                self.ioctl(vcpu_fd, Ioctl.KVM_SET_SIGNAL_MASK, arg)
            except OSError:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
                raise
            self._run_masks[vcpu_fd] = run_mask
        return old

    def run_end(self, vcpu_fd: int, token: object, kicked: bool) -> None:
        if kicked:
            signal.sigtimedwait({KICK_SIGNAL}, 0)
        if token is None:
            return
        assert isinstance(token, set)
        if KICK_SIGNAL not in token:
            signal.pthread_sigmask(signal.SIG_SETMASK, token)

    def kick(self, vcpu_fd: int, thread_ident: int) -> None:
        signal.pthread_kill(thread_ident, KICK_SIGNAL)

    def describe(self) -> str:
        return f"real KVM ({kvm_module()}) on Linux {platform.release()}"


def kvm_module() -> str:
    """Which KVM vendor module is loaded (kvm_intel, kvm_amd, kvm_pvm, ...), from /sys/module."""
    found = [m for m in ("kvm_intel", "kvm_amd", "kvm_pvm")
             if os.path.isdir(f"/sys/module/{m}")]
    if found:
        return ",".join(found)
    return "kvm" if os.path.isdir("/sys/module/kvm") else "no kvm module"


def kvm_module_params() -> dict[str, str]:
    """Parameters of the kvm module and the vendor module that matter for reports."""
    out: dict[str, str] = {}
    for mod in ("kvm", "kvm_intel", "kvm_amd", "kvm_pvm"):
        pdir = f"/sys/module/{mod}/parameters"
        for p in ("tdp_mmu", "ept", "npt", "nested", "enable_vmware_backdoor"):
            try:
                with open(os.path.join(pdir, p)) as f:
                    out[f"{mod}.{p}"] = f.read().strip()
            except OSError:
                continue
    return out


__all__ = ["HostBackend", "arg_pointer", "kvm_module", "kvm_module_params"]
