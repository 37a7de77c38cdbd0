"""The few libc calls the emulated KVM makes for real (mmap of its memfds, fallocate, and
copy_from_user/copy_to_user through process_vm_readv/writev, which fail with EFAULT on a bad
user pointer instead of crashing the interpreter)."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munmap.restype = ctypes.c_int
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.fallocate.restype = ctypes.c_int
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


class _iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.POINTER(_iovec), ctypes.c_ulong,
                                   ctypes.POINTER(_iovec), ctypes.c_ulong, ctypes.c_ulong]
_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.process_vm_writev.argtypes = _libc.process_vm_readv.argtypes
_libc.process_vm_writev.restype = ctypes.c_ssize_t

MAP_FAILED = ctypes.c_void_p(-1).value


def _fail(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def libc_mmap(addr: int, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
    ret = _libc.mmap(addr or None, length, prot, flags, fd, offset)
    if ret is None or ret == MAP_FAILED:
        raise _fail("mmap")
    return int(ret)


def libc_munmap(addr: int, length: int) -> None:
    if _libc.munmap(addr, length) == -1:
        raise _fail("munmap")


def libc_madvise(addr: int, length: int, advice: int) -> None:
    if _libc.madvise(addr, length, advice) == -1:
        raise _fail("madvise")


def libc_fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) == -1:
        raise _fail("fallocate")


def libc_ioctl(fd: int, request: int, arg: int) -> int:
    ret = int(_libc.ioctl(fd, request, arg))
    if ret == -1:
        raise _fail(f"ioctl({request:#x})")
    return ret


def copy_from_user(addr: int, size: int) -> bytes:
    """Read ``size`` bytes at ``addr`` of this process; EFAULT if they are not readable."""
    if size == 0:
        return b""
    buf = ctypes.create_string_buffer(size)
    local = _iovec(ctypes.addressof(buf), size)
    remote = _iovec(addr, size)
    n = _libc.process_vm_readv(os.getpid(), ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
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
    n = _libc.process_vm_writev(os.getpid(), ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if n != len(data):
        raise OSError(errno.EFAULT, f"copy_to_user({addr:#x}, {len(data)}): bad address")
