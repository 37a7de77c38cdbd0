"""libc syscalls through ctypes, shared by the real backend and the emulated KVM.

Each wrapper raises OSError with the errno on failure. ``fcntl.ioctl`` is not used: it passes an
integer argument as a C int and returns a buffer argument instead of the ioctl's result.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

from ..uapi.structs import check_int

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
libc.ioctl.restype = ctypes.c_int
# The kernel's widths: off_t and loff_t are 64-bit signed on x86_64, size_t unsigned. ctypes
# stores an int modulo the C type's width, so every wrapper range-checks first (_fits).
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_int64]
libc.mmap.restype = ctypes.c_void_p
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.munmap.restype = ctypes.c_int
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.madvise.restype = ctypes.c_int
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
libc.fallocate.restype = ctypes.c_int

MAP_FAILED = ctypes.c_void_p(-1).value

_C_INT = (-(1 << 31), (1 << 31) - 1)
_OFF_T = (-(1 << 63), (1 << 63) - 1)
_SIZE_T = (0, (1 << 64) - 1)


def _fits(call: str, **args: tuple[int, tuple[int, int]]) -> None:
    for name, (v, (lo, hi)) in args.items():
        check_int(f"{call}: {name}", v, lo, hi)


def errno_error(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def libc_ioctl(fd: int, request: int, arg: int) -> int:
    _fits("ioctl", fd=(fd, _C_INT), request=(request, (0, (1 << 64) - 1)),
          arg=(arg, (0, (1 << 64) - 1)))
    ret = int(libc.ioctl(fd, request, arg))
    if ret == -1:
        raise errno_error(f"ioctl({request:#x})")
    return ret


def libc_mmap(addr: int, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
    _fits("mmap", addr=(addr, _SIZE_T), length=(length, _SIZE_T), prot=(prot, _C_INT),
          flags=(flags, _C_INT), fd=(fd, _C_INT), offset=(offset, _OFF_T))
    ret = libc.mmap(addr or None, length, prot, flags, fd, offset)
    if ret is None or ret == MAP_FAILED:
        raise errno_error("mmap")
    return int(ret)


def libc_munmap(addr: int, length: int) -> None:
    _fits("munmap", addr=(addr, _SIZE_T), length=(length, _SIZE_T))
    if libc.munmap(addr, length) == -1:
        raise errno_error("munmap")


def libc_madvise(addr: int, length: int, advice: int) -> None:
    _fits("madvise", addr=(addr, _SIZE_T), length=(length, _SIZE_T), advice=(advice, _C_INT))
    if libc.madvise(addr, length, advice) == -1:
        raise errno_error("madvise")


def libc_fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    _fits("fallocate", fd=(fd, _C_INT), mode=(mode, _C_INT), offset=(offset, _OFF_T),
          len=(length, _OFF_T))
    if libc.fallocate(fd, mode, offset, length) == -1:
        raise errno_error("fallocate")


# --- NUMA memory policy (no glibc wrappers: libnuma has them; the raw syscalls suffice) --------
# x86_64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl).
SYS_MBIND, SYS_GET_MEMPOLICY, SYS_MOVE_PAGES = 237, 239, 279
MPOL_DEFAULT, MPOL_PREFERRED, MPOL_BIND, MPOL_INTERLEAVE = 0, 1, 2, 3
MPOL_F_NODE, MPOL_F_ADDR = 1 << 0, 1 << 1
MPOL_MF_STRICT, MPOL_MF_MOVE = 1 << 0, 1 << 1
libc.syscall.restype = ctypes.c_long


def libc_mbind(addr: int, length: int, mode: int, nodemask: int, maxnode: int = 64,
               flags: int = 0) -> None:
    """mbind(2); ``nodemask`` is a bit mask of nodes (0 for none)."""
    _fits("mbind", addr=(addr, _SIZE_T), len=(length, _SIZE_T), mode=(mode, _C_INT),
          nodemask=(nodemask, _SIZE_T), flags=(flags, (0, (1 << 32) - 1)))
    mask = ctypes.c_ulong(nodemask)
    if libc.syscall(SYS_MBIND, ctypes.c_void_p(addr), ctypes.c_ulong(length), mode,
                    ctypes.byref(mask) if nodemask else None,
                    ctypes.c_ulong(maxnode if nodemask else 0), ctypes.c_uint(flags)) < 0:
        raise errno_error("mbind")


def libc_get_mempolicy(addr: int | None = None, flags: int = 0) -> tuple[int, int]:
    """get_mempolicy(2): (mode or node, node mask) of ``addr`` (MPOL_F_ADDR) or the thread."""
    policy, mask = ctypes.c_int(-1), ctypes.c_ulong(0)
    if addr is not None:
        flags |= MPOL_F_ADDR
    if libc.syscall(SYS_GET_MEMPOLICY, ctypes.byref(policy), ctypes.byref(mask),
                    ctypes.c_ulong(64), ctypes.c_void_p(addr or 0), ctypes.c_ulong(flags)) < 0:
        raise errno_error("get_mempolicy")
    return policy.value, mask.value


def libc_move_pages(addrs: list[int], nodes: list[int] | None = None,
                    flags: int = 0) -> list[int]:
    """move_pages(2) for this process: with ``nodes`` None, the node of each page (or -errno);
    else the per-page result of moving each to its node."""
    n = len(addrs)
    pages = (ctypes.c_void_p * n)(*addrs)
    status = (ctypes.c_int * n)()
    want = (ctypes.c_int * n)(*nodes) if nodes is not None else None
    if libc.syscall(SYS_MOVE_PAGES, 0, ctypes.c_ulong(n), pages, want, status,
                    ctypes.c_int(flags)) < 0:
        raise errno_error("move_pages")
    return list(status)


# --- mapping and file syscalls the guest_memfd file cases need (selftests/test_gmem_file.py) ---
SYS_USERFAULTFD = 323
MREMAP_MAYMOVE = 1
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.mprotect.restype = ctypes.c_int
libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int]
libc.mremap.restype = ctypes.c_void_p
libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fstatfs.restype = ctypes.c_int


def libc_mprotect(addr: int, length: int, prot: int) -> None:
    """mprotect(2)."""
    _fits("mprotect", addr=(addr, _SIZE_T), length=(length, _SIZE_T), prot=(prot, _C_INT))
    if libc.mprotect(addr, length, prot) == -1:
        raise errno_error("mprotect")


def libc_mremap(addr: int, old_length: int, new_length: int, flags: int) -> int:
    """mremap(2) without a fixed target; returns the new address."""
    _fits("mremap", addr=(addr, _SIZE_T), old_length=(old_length, _SIZE_T),
          new_length=(new_length, _SIZE_T), flags=(flags, _C_INT))
    ret = libc.mremap(addr, old_length, new_length, flags)
    if ret is None or ret == MAP_FAILED:
        raise errno_error("mremap")
    return int(ret)


def libc_fstatfs_type(fd: int) -> int:
    """fstatfs(2)'s f_type (the first member of x86_64's struct statfs, a long)."""
    _fits("fstatfs", fd=(fd, _C_INT))
    buf = (ctypes.c_long * 16)()  # struct statfs is 120 bytes on x86_64
    if libc.fstatfs(fd, buf) == -1:
        raise errno_error("fstatfs")
    return int(buf[0]) & 0xFFFF_FFFF


def libc_userfaultfd(flags: int) -> int:
    """userfaultfd(2); returns the fd."""
    _fits("userfaultfd", flags=(flags, _C_INT))
    ret = int(libc.syscall(SYS_USERFAULTFD, ctypes.c_int(flags)))
    if ret < 0:
        raise errno_error("userfaultfd")
    return ret


# --- the emulated KVM's user copies and host-mapping probe (kvmpy/backend/emu) -----------------
MS_ASYNC = 1


class _iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.POINTER(_iovec), ctypes.c_ulong,
                                  ctypes.POINTER(_iovec), ctypes.c_ulong, ctypes.c_ulong]
libc.process_vm_readv.restype = ctypes.c_ssize_t
libc.process_vm_writev.argtypes = libc.process_vm_readv.argtypes
libc.process_vm_writev.restype = ctypes.c_ssize_t
libc.msync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.msync.restype = ctypes.c_int


def copy_from_user(addr: int, size: int) -> bytes:
    """Read ``size`` bytes at ``addr`` of this process through process_vm_readv(2); EFAULT if
    they are not readable (instead of crashing the interpreter)."""
    if size == 0:
        return b""
    _fits("copy_from_user", addr=(addr, _SIZE_T), size=(size, _SIZE_T))
    buf = ctypes.create_string_buffer(size)
    local = _iovec(ctypes.addressof(buf), size)
    remote = _iovec(addr, size)
    n = libc.process_vm_readv(os.getpid(), ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if n != size:
        raise OSError(errno.EFAULT, f"copy_from_user({addr:#x}, {size}): bad address")
    return buf.raw


def copy_to_user(addr: int, data: bytes) -> None:
    """Write ``data`` at ``addr`` of this process through process_vm_writev(2); EFAULT if it is
    not writable."""
    if not data:
        return
    _fits("copy_to_user", addr=(addr, _SIZE_T))
    buf = ctypes.create_string_buffer(data, len(data))
    local = _iovec(ctypes.addressof(buf), len(data))
    remote = _iovec(addr, len(data))
    n = libc.process_vm_writev(os.getpid(), ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if n != len(data):
        raise OSError(errno.EFAULT, f"copy_to_user({addr:#x}, {len(data)}): bad address")


def libc_msync(addr: int, length: int, flags: int) -> None:
    """msync(2) (with MS_ASYNC, ENOMEM says part of the range is not mapped)."""
    _fits("msync", addr=(addr, _SIZE_T), length=(length, _SIZE_T), flags=(flags, _C_INT))
    if libc.msync(addr, length, flags) == -1:
        raise errno_error("msync")
