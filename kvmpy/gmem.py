"""guest_memfd: the file returned by KVM_CREATE_GUEST_MEMFD.

File semantics follow Documentation/virt/kvm/api.rst (4.141 KVM_CREATE_GUEST_MEMFD) and
virt/kvm/guest_memfd.c: fallocate needs FALLOC_FL_KEEP_SIZE, only PUNCH_HOLE may be added,
offsets and lengths are page aligned; read/write are refused; mmap needs GUEST_MEMFD_FLAG_MMAP.
"""

from __future__ import annotations

import os
from typing import Any

from ._call import int_arg
from ._object import FdObject
from .backend import MAP_SHARED, PROT_READ, PROT_WRITE, Backend
from .errors import Errno, KvmError
from .memory import Mapping
from .uapi import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, GuestMemfdFlag

_S64 = (-(1 << 63), (1 << 63) - 1)


class GuestMemfd(FdObject):
    """An open guest_memfd. Owns its fd and the mappings made through :meth:`mmap`."""

    def __init__(self, backend: Backend, fd: int, size: int, flags: int) -> None:
        self.backend = backend
        self._init_fd(fd)
        self.size = size
        self.flags = flags
        self._maps: list[Mapping] = []

    def __repr__(self) -> str:
        return f"<GuestMemfd fd {self.fd} size {self.size:#x} flags {_gmem_flags_name(self.flags)}>"

    # --- fallocate ----------------------------------------------------------------------
    def fallocate(self, offset: int, length: int, mode: int = FALLOC_FL_KEEP_SIZE) -> None:
        """fallocate(mode, offset, length); allocates private memory by default."""
        err = self.try_fallocate(offset, length, mode)
        if err:
            raise KvmError(err, "fallocate",
                           f"guest_memfd fd {self.fd}, mode {mode:#x}, offset {offset:#x}, "
                           f"len {length:#x}")

    def try_fallocate(self, offset: int, length: int, mode: int = FALLOC_FL_KEEP_SIZE) -> Errno:
        # fallocate(2) takes loff_t offset and len (fs/open.c ksys_fallocate).
        int_arg("fallocate", "offset", offset, *_S64)
        int_arg("fallocate", "len", length, *_S64)
        int_arg("fallocate", "mode", mode, -(1 << 31), (1 << 31) - 1)
        with self._use("fallocate") as fd:
            return _errno_of(lambda: self.backend.fallocate(fd, mode, offset, length),
                             "fallocate", f"guest_memfd fd {fd}, mode={mode:#x}, "
                             f"offset={offset:#x}, len={length:#x}")

    def punch_hole(self, offset: int, length: int) -> None:
        """fallocate(KEEP_SIZE|PUNCH_HOLE): frees the range; it reads back as zeroes."""
        self.fallocate(offset, length, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE)

    def try_punch_hole(self, offset: int, length: int) -> Errno:
        return self.try_fallocate(offset, length, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE)

    # --- file operations ----------------------------------------------------------------
    def fstat(self) -> os.stat_result:
        with self._use("fstat") as fd:
            return self.backend.fstat(fd)

    def fstatfs_type(self) -> int:
        """fstatfs(2)'s f_type: the guest_memfd mount's magic (7.3: GUEST_MEMFD_MAGIC)."""
        with self._use("fstatfs") as fd:
            return self.backend.fstatfs_type(fd)

    def try_read(self, count: int = 8) -> Errno:
        with self._use("read") as fd:
            return _errno_of(lambda: self.backend.read(fd, count), "read", f"fd {fd}, {count}")

    def try_write(self, data: bytes = b"\0" * 8) -> Errno:
        with self._use("write") as fd:
            return _errno_of(lambda: self.backend.write(fd, data), "write",
                             f"fd {fd}, {len(data)} bytes")

    def try_pread(self, count: int = 8, offset: int = 0) -> Errno:
        with self._use("pread") as fd:
            return _errno_of(lambda: self.backend.pread(fd, count, offset), "pread",
                             f"fd {fd}, {count}, offset={offset:#x}")

    def try_pwrite(self, data: bytes = b"\0" * 8, offset: int = 0) -> Errno:
        with self._use("pwrite") as fd:
            return _errno_of(lambda: self.backend.pwrite(fd, data, offset), "pwrite",
                             f"fd {fd}, {len(data)} bytes, offset={offset:#x}")

    # --- mmap -----------------------------------------------------------------------------
    def mmap(self, length: int | None = None, offset: int = 0,
             prot: int = PROT_READ | PROT_WRITE, flags: int = MAP_SHARED) -> Mapping:
        """mmap the guest_memfd (needs GUEST_MEMFD_FLAG_MMAP; only MAP_SHARED)."""
        length = self.size if length is None else length
        try:
            with self._use("mmap") as fd:
                addr = self.backend.mmap(fd, length, prot, flags, offset)
        except OSError as e:
            if e.errno is None:
                raise
            raise KvmError(e.errno, "mmap",
                           f"guest_memfd fd {self.fd}, len {length:#x}, flags {flags:#x}") from None
        m = Mapping(self.backend, addr, length, f"guest_memfd {self.fd} mapping")
        self._maps.append(m)
        return m

    def try_mmap(self, length: int | None = None, offset: int = 0,
                 prot: int = PROT_READ | PROT_WRITE, flags: int = MAP_SHARED) -> Errno:
        """mmap returning the errno (0 on success; the mapping is removed at once)."""
        length = self.size if length is None else length
        with self._use("mmap") as fd:
            what = f"guest_memfd fd {fd}, len={length:#x}, prot={prot:#x}, flags={flags:#x}, " \
                   f"offset={offset:#x}"
            try:
                addr = self.backend.mmap(fd, length, prot, flags, offset)
            except OSError as e:
                if e.errno is None:
                    raise
                return Errno(e.errno, "mmap", what)
        self.backend.munmap(addr, length)
        return Errno(0, "mmap", what)

    # --- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """Unmap the mappings made here (their views are released first: Mapping.close),
        then close the fd."""
        if self._begin_close():
            for m in self._maps:
                m.close()
            self._maps.clear()
            self.backend.close(self.fd)
            self._end_close()

    def __enter__(self) -> GuestMemfd:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _gmem_flags_name(flags: int) -> str:
    if flags == 0:
        return "0"
    if flags < 4:
        return str(GuestMemfdFlag(flags).name)
    return hex(flags)


def _errno_of(fn: Any, call: str, detail: str) -> Errno:
    try:
        fn()
        return Errno(0, call, detail)
    except OSError as e:
        if e.errno is None:  # raised by a signal handler, not the kernel
            raise
        return Errno(e.errno, call, detail)
