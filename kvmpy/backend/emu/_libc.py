"""The few libc calls the emulated KVM makes for real (mmap of its memfds, fallocate, and
copy_from_user/copy_to_user through process_vm_readv/writev, which fail with EFAULT on a bad
user pointer instead of crashing the interpreter)."""

from __future__ import annotations

import ctypes
import errno
import os

from ..libc import (
    libc,
    libc_fallocate,
    libc_ioctl,
    libc_madvise,
    libc_mmap,
    libc_munmap,
)


class _iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.POINTER(_iovec), ctypes.c_ulong,
                                  ctypes.POINTER(_iovec), ctypes.c_ulong, ctypes.c_ulong]
libc.process_vm_readv.restype = ctypes.c_ssize_t
libc.process_vm_writev.argtypes = libc.process_vm_readv.argtypes
libc.process_vm_writev.restype = ctypes.c_ssize_t

__all__ = ["copy_from_user", "copy_to_user", "libc", "libc_fallocate", "libc_ioctl", "libc_madvise",
           "libc_mmap", "libc_munmap"]


def copy_from_user(addr: int, size: int) -> bytes:
    """Read ``size`` bytes at ``addr`` of this process; EFAULT if they are not readable."""
    if size == 0:
        return b""
    buf = ctypes.create_string_buffer(size)
    local = _iovec(ctypes.addressof(buf), size)
    remote = _iovec(addr, size)
    n = libc.process_vm_readv(os.getpid(), ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if n != size:
        raise OSError(errno.EFAULT, f"copy_from_user({addr:#x}, {size}): bad address")
    return buf.raw


def copy_to_user(addr: int, data: bytes) -> None:
    """Write ``data`` at ``addr`` of this process; EFAULT if it is not writable."""
    if not data:
        return
    buf = ctypes.create_string_buffer(data, len(data))
    local = _iovec(ctypes.addressof(buf), len(data))
    remote = _iovec(addr, len(data))
    n = libc.process_vm_writev(os.getpid(), ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if n != len(data):
        raise OSError(errno.EFAULT, f"copy_to_user({addr:#x}, {len(data)}): bad address")
