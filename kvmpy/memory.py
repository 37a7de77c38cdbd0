"""Host mappings (mmap'd guest_memfd, shared backings, kvm_run) owned by Python objects."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import weakref
from typing import Any

from .backend import (
    MAP_ANONYMOUS,
    MAP_FIXED_NOREPLACE,
    MAP_NORESERVE,
    MAP_PRIVATE,
    MAP_SHARED,
    PROT_READ,
    PROT_WRITE,
    Backend,
)
from .backend.libc import libc_mmap, libc_munmap
from .errors import ClosedError, Errno, KvmError


class Mapping:
    """An mmap'd range: ``addr``/``length``, memoryviews, and munmap on close.

    Views never outlive the memory under them (a stale view of an unmapped page would crash
    the process): close() releases every view :meth:`view` handed out (using one afterwards
    raises ValueError), and if something derived from a view is still alive (a slice, a ctypes
    struct made with from_buffer), the range is replaced by anonymous zero pages, unmapped when
    the last such reference goes away. Python-level objects only: a raw address kept by the
    caller is not covered.
    """

    def __init__(self, backend: Backend, addr: int, length: int, what: str = "mapping") -> None:
        self.backend = backend
        self.addr = addr
        self.length = length
        self.what = what
        self._closed = False
        # Every view is exported from this one object, so its reference count says whether a
        # view (or anything derived from one) is still alive.
        self._buf: ctypes.Array[ctypes.c_char] | None = (
            (ctypes.c_char * length).from_address(addr) if length > 0 else None)
        self._views: list[memoryview] = []

    def view(self) -> memoryview:
        """A writable view of the whole mapping (released by close)."""
        self._check_open()
        assert self._buf is not None
        if len(self._views) >= 32:  # forget views nobody holds any more
            self._views = [v for v in self._views if sys.getrefcount(v) > 3]
        v = memoryview(self._buf).cast("B")
        self._views.append(v)
        return v

    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        return ctypes.string_at(self.addr + offset, length)

    def write(self, offset: int, data: bytes) -> None:
        self._check_range(offset, len(data))
        ctypes.memmove(self.addr + offset, data, len(data))

    def fill(self, offset: int, length: int, byte: int) -> None:
        self._check_range(offset, length)
        ctypes.memset(self.addr + offset, byte, length)

    def mprotect(self, prot: int) -> None:
        """mprotect(2) of the whole mapping."""
        err = self.try_mprotect(prot)
        if err:
            raise KvmError(err, "mprotect", err.detail)

    def try_mbind(self, offset: int, length: int, mode: int, nodemask: int,
                  flags: int = 0) -> Errno:
        """mbind(2) of [offset, offset+length) of the mapping (``nodemask``: a bit mask)."""
        self._check_range(offset, length)
        detail = (f"{self.what} {self.addr + offset:#x}, len {length:#x}, mode {mode}, "
                  f"nodemask {nodemask:#b}, flags {flags:#x}")
        try:
            self.backend.mbind(self.addr + offset, length, mode, nodemask, flags)
        except OSError as e:
            if e.errno is None:
                raise
            return Errno(e.errno, "mbind", detail)
        return Errno(0, "mbind", detail)

    def move_pages(self, offsets: list[int], nodes: list[int] | None = None) -> list[int]:
        """move_pages(2) of the pages at ``offsets``: their nodes (``nodes`` None, negative
        errno for a page not present) or, moving each to its node, the per-page status."""
        for off in offsets:
            self._check_range(off, 1)
        return self.backend.move_pages([self.addr + off for off in offsets], nodes)

    def try_mprotect(self, prot: int) -> Errno:
        self._check_open()
        detail = f"{self.what} {self.addr:#x}, len {self.length:#x}, prot {prot:#x}"
        try:
            self.backend.mprotect(self.addr, self.length, prot)
        except OSError as e:
            if e.errno is None:  # raised by a signal handler, not the kernel
                raise
            return Errno(e.errno, "mprotect", detail)
        return Errno(0, "mprotect", detail)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"{self.what} at {self.addr:#x}", "mapping access")

    def _check_range(self, offset: int, length: int) -> None:
        self._check_open()
        if offset < 0 or length < 0 or offset + length > self.length:
            raise ValueError(f"range [{offset:#x}, +{length:#x}) outside {self.what} of "
                             f"{self.length:#x} bytes")

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for v in self._views:
            with contextlib.suppress(BufferError):  # something holds an export of it
                v.release()
        self._views.clear()
        buf, self._buf = self._buf, None
        self.backend.munmap(self.addr, self.length)
        # getrefcount: our local and its own argument. More means a live derived view.
        if buf is not None and sys.getrefcount(buf) > 2:
            _tombstone(self.addr, self.length, buf)

    def __enter__(self) -> Mapping:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Mapping {self.what} {self.addr:#x}+{self.length:#x}>"


def _tombstone(addr: int, length: int, owner: object) -> None:
    """Back [addr, addr+length) with anonymous zero pages until ``owner`` is freed."""
    try:
        libc_mmap(addr, length, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE, -1, 0)
    except OSError:
        return  # the range was taken meanwhile: nothing better can be done
    weakref.finalize(owner, libc_munmap, addr, length)


class MappedMemory:
    """Host memory reached through ``self.mapping``: ``addr`` and ``size`` are the mapping's."""

    mapping: Mapping

    @property
    def addr(self) -> int:
        return self.mapping.addr

    @property
    def size(self) -> int:
        return self.mapping.length


class SharedMemory(MappedMemory):
    """Host memory for a memslot's shared backing: a memfd mapped MAP_SHARED.

    File-backed (not anonymous) on purpose: the emulated KVM aliases the same pages into the
    guest by mapping the fd, so host writes are seen by the guest without copies.
    """

    def __init__(self, backend: Backend, size: int, name: str = "kvmpy-shared",
                 hugetlb: bool = False, huge_2m: bool = False) -> None:
        """``hugetlb``: MFD_HUGETLB (the default huge page size); ``huge_2m`` also asks for
        2 MiB pages explicitly (MFD_HUGE_2MB)."""
        flags = os.MFD_CLOEXEC | (os.MFD_HUGETLB if hugetlb or huge_2m else 0) | \
            (os.MFD_HUGE_2MB if huge_2m else 0)
        self.fd = os.memfd_create(name, flags)
        try:
            os.ftruncate(self.fd, size)
            addr = backend.mmap(self.fd, size, PROT_READ | PROT_WRITE,
                                MAP_SHARED | MAP_NORESERVE, 0)
        except OSError as e:
            os.close(self.fd)
            raise KvmError(e.errno or 0, "mmap", f"shared memfd of {size:#x} bytes") from None
        self.mapping = Mapping(backend, addr, size, name)

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
    addr = backend.mmap(-1, size, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, 0)
    return Mapping(backend, addr, size, what)
