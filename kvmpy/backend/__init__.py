"""The backend seam: the only syscalls kvmpy makes against a kernel.

Everything above this package speaks :class:`Backend`; ``host.HostBackend`` issues real syscalls,
``emu`` (the emulated KVM) answers the same requests with the same bytes.
"""

from __future__ import annotations

import abc
import ctypes
import mmap as _mmap
import os
from typing import Any

# What an ioctl argument can be: an integer (passed as unsigned long), a ctypes object passed by
# reference (struct or array), or nothing.
IoctlArg = int | ctypes.Structure | ctypes.Union | ctypes.Array[Any] | None

PROT_NONE = _mmap.PROT_NONE if hasattr(_mmap, "PROT_NONE") else 0
PROT_READ = _mmap.PROT_READ
PROT_WRITE = _mmap.PROT_WRITE
MAP_SHARED = _mmap.MAP_SHARED
MAP_PRIVATE = _mmap.MAP_PRIVATE
MAP_ANONYMOUS = _mmap.MAP_ANONYMOUS
MAP_FIXED = 0x10
MAP_NORESERVE = 0x4000
MAP_FIXED_NOREPLACE = 0x100000


def arg_pointer(arg: IoctlArg) -> int:
    """The unsigned-long value an ioctl receives for ``arg``."""
    if arg is None:
        return 0
    if isinstance(arg, int):
        if not -(1 << 63) <= arg < 1 << 64:
            raise OverflowError(f"ioctl argument {arg:#x} does not fit an unsigned long")
        return arg & 0xFFFF_FFFF_FFFF_FFFF  # a negative long, as C passes it
    return ctypes.addressof(arg)



class Backend(abc.ABC):
    """The narrow syscall interface (see docs/design.md, "The backend seam").

    Every method raises ``OSError`` with the kernel's errno on failure; the object layer turns
    that into :class:`kvmpy.errors.KvmError` naming the call.
    """

    #: "kvm" for the real kernel, "emu" for the emulated KVM.
    name: str

    @abc.abstractmethod
    def open_kvm(self) -> int:
        """Open the KVM system device; raises KvmUnavailable if it cannot."""

    @abc.abstractmethod
    def ioctl(self, fd: int, request: int, arg: IoctlArg = None) -> int:
        """ioctl(2): returns the non-negative result, raises OSError on -1."""

    def ioctl_errno(self, fd: int, request: int, arg: IoctlArg = None) -> tuple[int, int]:
        """ioctl(2) as ``(result, 0)``, or ``(-1, errno)`` on failure: the object layer's call
        (it turns the errno into KvmError or Errno itself, so the backend need not build an
        OSError). This default asks :meth:`ioctl`, so a backend that only overrides ioctl
        (FaultBackend, a test's patched ioctl) is honoured; a backend overriding this must
        answer exactly as its ioctl does. An OSError without an errno was raised by a signal
        handler during the call, not by the kernel, and propagates."""
        try:
            return self.ioctl(fd, request, arg), 0
        except OSError as e:
            if e.errno is None:
                raise
            return -1, int(e.errno)

    @abc.abstractmethod
    def mmap(self, fd: int, length: int, prot: int, flags: int, offset: int = 0,
             addr: int = 0) -> int:
        """mmap(2): returns the mapping's address."""

    @abc.abstractmethod
    def munmap(self, addr: int, length: int) -> None: ...

    @abc.abstractmethod
    def madvise(self, addr: int, length: int, advice: int) -> None: ...

    @abc.abstractmethod
    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None: ...

    @abc.abstractmethod
    def fstat(self, fd: int) -> os.stat_result: ...

    def fstatfs_type(self, fd: int) -> int:
        """fstatfs(2)'s f_type: which filesystem the file lives on."""
        from .libc import libc_fstatfs_type
        return libc_fstatfs_type(fd)

    def mprotect(self, addr: int, length: int, prot: int) -> None:
        """mprotect(2) of a mapping made through :meth:`mmap`."""
        from .libc import libc_mprotect
        libc_mprotect(addr, length, prot)

    def mbind(self, addr: int, length: int, mode: int, nodemask: int, flags: int = 0) -> None:
        """mbind(2) of a mapping made through :meth:`mmap` (``nodemask``: a bit mask)."""
        from .libc import libc_mbind
        libc_mbind(addr, length, mode, nodemask, flags=flags)

    def move_pages(self, addrs: list[int], nodes: list[int] | None = None,
                   flags: int = 0) -> list[int]:
        """move_pages(2) for this process: per page, its node (``nodes`` None) or the result."""
        from .libc import libc_move_pages
        return libc_move_pages(addrs, nodes, flags)

    @abc.abstractmethod
    def read(self, fd: int, count: int) -> bytes: ...

    @abc.abstractmethod
    def write(self, fd: int, data: bytes) -> int: ...

    @abc.abstractmethod
    def pread(self, fd: int, count: int, offset: int) -> bytes: ...

    @abc.abstractmethod
    def pwrite(self, fd: int, data: bytes, offset: int) -> int: ...

    @abc.abstractmethod
    def close(self, fd: int) -> None: ...

    def run_begin(self, vcpu_fd: int, kvm_run: bool = True) -> object:
        """Called by the thread about to issue KVM_RUN (``kvm_run``) or another interruptible
        vCPU ioctl (KVM_PRE_FAULT_MEMORY) on ``vcpu_fd``: make :meth:`kick` able to interrupt
        it. Returns a token for :meth:`run_end`."""
        return None

    def run_end(self, vcpu_fd: int, token: object, kicked: bool) -> None:
        """Called by the same thread after KVM_RUN returned; ``kicked`` says whether
        :meth:`kick` was called for this run (so a pending kick can be consumed)."""
        return None

    @abc.abstractmethod
    def kick(self, vcpu_fd: int, thread_ident: int) -> None:
        """Interrupt a KVM_RUN in progress on ``vcpu_fd`` in thread ``thread_ident`` the way a
        signal does on real KVM: the run returns -1/EINTR with exit_reason KVM_EXIT_INTR.
        Only :class:`kvmpy.vcpu.Vcpu` calls it, between run_begin and run_end of that thread."""

    def modelled_errno(self, behaviour: str) -> int | None:
        """The errno this backend's kernel gives for a version-dependent ``behaviour``
        (kvmpy.testing.errnos.Behaviour), when the backend knows it: the emulated KVM answers
        from its kernel profile, a real kernel has no way to say (None)."""
        return None

    @abc.abstractmethod
    def describe(self) -> str:
        """One line naming the backend and the kernel behind it, for reports."""

    @property
    def is_real(self) -> bool:
        return self.name == "kvm"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


def default_device() -> str:
    """The KVM device path: $KVMPY_DEVICE or /dev/kvm."""
    return os.environ.get("KVMPY_DEVICE", "/dev/kvm")
