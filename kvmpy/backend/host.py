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
from . import Backend, IoctlArg, default_device
from .libc import errno_error, libc, libc_fallocate, libc_madvise, libc_mmap, libc_munmap


def _check(ret: int, what: str) -> int:
    if ret == -1:
        raise errno_error(what)
    return ret


def arg_pointer(arg: IoctlArg) -> int:
    """The unsigned-long value an ioctl receives for ``arg``."""
    if arg is None:
        return 0
    if isinstance(arg, int):
        return arg & 0xFFFF_FFFF_FFFF_FFFF
    return ctypes.addressof(arg)


KICK_SIGNAL = signal.SIGUSR1


def _install_kick_handler() -> None:
    """A no-op Python handler for KICK_SIGNAL: CPython installs it without SA_RESTART, so a
    KVM_RUN in the signalled thread returns EINTR instead of the process dying. Handlers can
    only be installed from the main thread; HostBackend() does it there."""
    if threading.current_thread() is not threading.main_thread():
        if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
            raise RuntimeError("create a HostBackend in the main thread before kicking vCPUs")
        return
    if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)


class HostBackend(Backend):
    """Real syscalls against the running kernel's /dev/kvm."""

    name = "kvm"

    def __init__(self, device: str | None = None) -> None:
        self.device = device or default_device()
        if threading.current_thread() is threading.main_thread():
            _install_kick_handler()

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
        os.close(fd)

    def kick(self, vcpu_fd: int, thread_ident: int) -> None:
        # A signal makes KVM_RUN return -EINTR (api.rst 4.10 KVM_RUN, "KVM_EXIT_INTR").
        _install_kick_handler()
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
