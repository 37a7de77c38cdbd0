"""Host mappings (mmap'd guest_memfd, shared backings, kvm_run) owned by Python objects."""

from __future__ import annotations

import ctypes
import os
from typing import Any

from .backend import MAP_ANONYMOUS, MAP_NORESERVE, MAP_SHARED, PROT_READ, PROT_WRITE, Backend
from .errors import KvmError


class Mapping:
    """An mmap'd range: ``addr``/``length``, a memoryview, and munmap on close."""

    def __init__(self, backend: Backend, addr: int, length: int, what: str = "mapping") -> None:
        self.backend = backend
        self.addr = addr
        self.length = length
        self.what = what
        self._closed = False

    def view(self) -> memoryview:
        """A writable view of the whole mapping (invalid after close)."""
        self._check_open()
        return memoryview((ctypes.c_char * self.length).from_address(self.addr)).cast("B")

    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        return ctypes.string_at(self.addr + offset, length)

    def write(self, offset: int, data: bytes) -> None:
        self._check_range(offset, len(data))
        ctypes.memmove(self.addr + offset, data, len(data))

    def fill(self, offset: int, length: int, byte: int) -> None:
        self._check_range(offset, length)
        ctypes.memset(self.addr + offset, byte, length)

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self.what} at {self.addr:#x} is unmapped")

    def _check_range(self, offset: int, length: int) -> None:
        self._check_open()
        if offset < 0 or length < 0 or offset + length > self.length:
            raise ValueError(f"range [{offset:#x}, +{length:#x}) outside {self.what} of "
                             f"{self.length:#x} bytes")

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.backend.munmap(self.addr, self.length)

    def __enter__(self) -> Mapping:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Mapping {self.what} {self.addr:#x}+{self.length:#x}>"


class SharedMemory:
    """Host memory for a memslot's shared backing: a memfd mapped MAP_SHARED.

    File-backed (not anonymous) on purpose: the emulated KVM aliases the same pages into the
    guest by mapping the fd, so host writes are seen by the guest without copies.
    """

    def __init__(self, backend: Backend, size: int, name: str = "kvmpy-shared",
                 hugetlb: bool = False) -> None:
        flags = os.MFD_CLOEXEC | (os.MFD_HUGETLB if hugetlb else 0)
        self.fd = os.memfd_create(name, flags)
        try:
            os.ftruncate(self.fd, size)
            addr = backend.mmap(self.fd, size, PROT_READ | PROT_WRITE,
                                MAP_SHARED | MAP_NORESERVE, 0)
        except OSError as e:
            os.close(self.fd)
            raise KvmError(e.errno or 0, "mmap", f"shared memfd of {size:#x} bytes") from None
        self.mapping = Mapping(backend, addr, size, name)

    @property
    def addr(self) -> int:
        return self.mapping.addr

    @property
    def size(self) -> int:
        return self.mapping.length

    def close(self) -> None:
        self.mapping.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> SharedMemory:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def anonymous(backend: Backend, size: int, what: str = "anonymous") -> Mapping:
    """A private anonymous mapping (MAP_NORESERVE), e.g. for many large memslots."""
    from .backend import MAP_PRIVATE

    addr = backend.mmap(-1, size, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, 0)
    return Mapping(backend, addr, size, what)
