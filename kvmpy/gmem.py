"""guest_memfd: the file returned by KVM_CREATE_GUEST_MEMFD.

File semantics follow Documentation/virt/kvm/api.rst (4.141 KVM_CREATE_GUEST_MEMFD) and
virt/kvm/guest_memfd.c: fallocate needs FALLOC_FL_KEEP_SIZE, only PUNCH_HOLE may be added,
offsets and lengths are page aligned; read/write are refused; mmap needs GUEST_MEMFD_FLAG_MMAP.
"""

from __future__ import annotations

import os
from typing import Any

from .backend import MAP_SHARED, PROT_READ, PROT_WRITE, Backend
from .errors import KvmError
from .memory import Mapping
from .uapi import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, GuestMemfdFlag


class GuestMemfd:
    """An open guest_memfd. Owns its fd and the mappings made through :meth:`mmap`."""

    def __init__(self, backend: Backend, fd: int, size: int, flags: int) -> None:
        self.backend = backend
        self.fd = fd
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

    def try_fallocate(self, offset: int, length: int, mode: int = FALLOC_FL_KEEP_SIZE) -> int:
        try:
            self.backend.fallocate(self.fd, mode, offset, length)
            return 0
        except OSError as e:
            return e.errno or 0

    def punch_hole(self, offset: int, length: int) -> None:
        """fallocate(KEEP_SIZE|PUNCH_HOLE): frees the range; it reads back as zeroes."""
        self.fallocate(offset, length, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE)

    def try_punch_hole(self, offset: int, length: int) -> int:
        return self.try_fallocate(offset, length, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE)

    # --- file operations ----------------------------------------------------------------
    def fstat(self) -> os.stat_result:
        return self.backend.fstat(self.fd)

    def try_read(self, count: int = 8) -> int:
        return _errno_of(lambda: self.backend.read(self.fd, count))

    def try_write(self, data: bytes = b"\0" * 8) -> int:
        return _errno_of(lambda: self.backend.write(self.fd, data))

    def try_pread(self, count: int = 8, offset: int = 0) -> int:
        return _errno_of(lambda: self.backend.pread(self.fd, count, offset))

    def try_pwrite(self, data: bytes = b"\0" * 8, offset: int = 0) -> int:
        return _errno_of(lambda: self.backend.pwrite(self.fd, data, offset))

    # --- mmap -----------------------------------------------------------------------------
    def mmap(self, length: int | None = None, offset: int = 0,
             prot: int = PROT_READ | PROT_WRITE, flags: int = MAP_SHARED) -> Mapping:
        """mmap the guest_memfd (needs GUEST_MEMFD_FLAG_MMAP; only MAP_SHARED)."""
        length = self.size if length is None else length
        try:
            addr = self.backend.mmap(self.fd, length, prot, flags, offset)
        except OSError as e:
            raise KvmError(e.errno or 0, "mmap",
                           f"guest_memfd fd {self.fd}, len {length:#x}, flags {flags:#x}") from None
        m = Mapping(self.backend, addr, length, f"guest_memfd {self.fd} mapping")
        self._maps.append(m)
        return m

    def try_mmap(self, length: int | None = None, offset: int = 0,
                 prot: int = PROT_READ | PROT_WRITE, flags: int = MAP_SHARED) -> int:
        """mmap returning the errno (0 on success; the mapping is removed at once)."""
        length = self.size if length is None else length
        try:
            addr = self.backend.mmap(self.fd, length, prot, flags, offset)
        except OSError as e:
            return e.errno or 0
        self.backend.munmap(addr, length)
        return 0

    # --- lifetime -------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self.fd < 0

    def close(self) -> None:
        for m in self._maps:
            m.close()
        self._maps.clear()
        if self.fd >= 0:
            self.backend.close(self.fd)
            self.fd = -1

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


def _errno_of(fn: Any) -> int:
    try:
        fn()
        return 0
    except OSError as e:
        return e.errno or 0
