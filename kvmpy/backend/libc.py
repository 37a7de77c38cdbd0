"""libc syscalls through ctypes, shared by the real backend and the emulated KVM.

Each wrapper raises OSError with the errno on failure. ``fcntl.ioctl`` is not used: it passes an
integer argument as a C int and returns a buffer argument instead of the ioctl's result.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
libc.ioctl.restype = ctypes.c_int
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.mmap.restype = ctypes.c_void_p
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.munmap.restype = ctypes.c_int
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.madvise.restype = ctypes.c_int
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
libc.fallocate.restype = ctypes.c_int

MAP_FAILED = ctypes.c_void_p(-1).value


def errno_error(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def libc_ioctl(fd: int, request: int, arg: int) -> int:
    ret = int(libc.ioctl(fd, request, arg))
    if ret == -1:
        raise errno_error(f"ioctl({request:#x})")
    return ret


def libc_mmap(addr: int, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
    ret = libc.mmap(addr or None, length, prot, flags, fd, offset)
    if ret is None or ret == MAP_FAILED:
        raise errno_error("mmap")
    return int(ret)


def libc_munmap(addr: int, length: int) -> None:
    if libc.munmap(addr, length) == -1:
        raise errno_error("munmap")


def libc_madvise(addr: int, length: int, advice: int) -> None:
    if libc.madvise(addr, length, advice) == -1:
        raise errno_error("madvise")


def libc_fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if libc.fallocate(fd, mode, offset, length) == -1:
        raise errno_error("fallocate")
