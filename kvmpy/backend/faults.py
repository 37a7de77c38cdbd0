"""Fault injection at the backend seam: a Backend wrapper that plants ONE named kernel bug.

Used by the regression-power self-check (``python -m kvmpy.app.faultcheck``): the selftests run
against a backend with a fault injected and must fail. A fault that no test notices is a hole
in the suite. Selection: :func:`kvmpy.backend.select.make_backend` wraps its backend in
:class:`FaultBackend` when ``KVMPY_INJECT_FAULT`` names a fault of :data:`FAULTS`.

Each fault imitates a plausible regression of the behaviour it names (api.rst section in the
description). Faults marked ``emu_only`` reach into the emulated KVM (the invalidation hook
``EmuVm.invalidate`` and the guest_memfd's backing memfd, docs/emulator.md); on a real kernel
they are refused with a clear error instead of silently injecting nothing.

``FaultBackend.hits`` counts how often the fault actually changed a result, so the self-check
can tell "not caught" from "never triggered".

Not in the set, on purpose: skipping the invalidation of a punched guest_memfd range in the
emulator. The emulated vCPU maps the guest_memfd's memfd itself, so a punch-hole empties the
page under every mapping at once and the skipped zap has no observable effect (an equivalent
mutant at this seam); the kernel bug it would stand for (a stale SPTE to a freed page) needs
a real MMU to show.
"""

from __future__ import annotations

import atexit
import ctypes
import dataclasses
import errno
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from ..uapi import (
    FALLOC_FL_PUNCH_HOLE,
    PAGE_SIZE,
    ExitReason,
    GuestMemfdFlag,
    Ioctl,
    MemoryExitFlag,
    kvm_create_guest_memfd,
    kvm_memory_attributes,
    kvm_run,
    kvm_userspace_memory_region2,
)
from . import Backend, IoctlArg


@dataclasses.dataclass(frozen=True)
class FaultSpec:
    """One injectable regression."""

    name: str
    description: str
    emu_only: bool = False


FAULTS: dict[str, FaultSpec] = {f.name: f for f in (
    FaultSpec("memslot-overlap-errno",
              "KVM_SET_USER_MEMORY_REGION2: an overlapping GPA range fails with EINVAL instead "
              "of EEXIST (api.rst 4.35: overlapping slots are EEXIST) - a flipped errno"),
    FaultSpec("slot-delete-ignored",
              "KVM_SET_USER_MEMORY_REGION2 with memory_size 0 returns success without deleting "
              "the slot (api.rst 4.35: size 0 deletes)"),
    FaultSpec("gmem-invalid-flag-accepted",
              "KVM_CREATE_GUEST_MEMFD accepts flag bits outside KVM_CAP_GUEST_MEMFD_FLAGS "
              "(api.rst 4.141: unknown flags are EINVAL) - an invalid flag accepted"),
    FaultSpec("gmem-size-errno",
              "KVM_CREATE_GUEST_MEMFD with a bad size fails with ENOMEM instead of EINVAL"),
    FaultSpec("punch-hole-dropped",
              "fallocate(PUNCH_HOLE) on a guest_memfd returns 0 but frees nothing: the range "
              "keeps its old contents instead of reading back zeroed (api.rst 4.141)"),
    FaultSpec("gmem-not-zeroed",
              "a new guest_memfd is not zero-filled: fresh pages hold stale bytes (the kernel "
              "clears folios before use: kvm_gmem_get_folio/folio_zero) - zero-fill skipped",
              emu_only=True),
    FaultSpec("attributes-partial",
              "KVM_SET_MEMORY_ATTRIBUTES changes only the first page of the range but reports "
              "success (api.rst 4.141: the whole range, or an error)"),
    FaultSpec("attributes-einval-ignored",
              "KVM_SET_MEMORY_ATTRIBUTES returns 0 for requests it rejects with EINVAL "
              "(unsupported attribute bits, bad alignment, flags) - invalid input accepted"),
    FaultSpec("memory-fault-gpa",
              "KVM_EXIT_MEMORY_FAULT reports the gpa of the next page (api.rst 5. "
              "KVM_EXIT_MEMORY_FAULT: gpa/size describe the faulting range) - misreported gpa"),
    FaultSpec("memory-fault-flags",
              "KVM_EXIT_MEMORY_FAULT drops KVM_MEMORY_EXIT_FLAG_PRIVATE from flags"),
    FaultSpec("mmio-gpa",
              "KVM_EXIT_MMIO reports phys_addr 8 bytes off (api.rst 5. KVM_EXIT_MMIO)"),
    FaultSpec("skip-invalidation-attributes",
              "the emulated MMU is not invalidated when KVM_SET_MEMORY_ATTRIBUTES converts a "
              "range (KVM must zap SPTEs: kvm_vm_set_mem_attributes -> kvm_unmap_gfn_range); "
              "vCPUs keep the stale shared/private mapping", emu_only=True),
)}

_S = TypeVar("_S", bound=ctypes.Structure)


def _struct(arg: IoctlArg, cls: type[_S]) -> _S | None:
    """The struct an ioctl argument points at (an instance or an address), or None."""
    if isinstance(arg, cls):
        return arg
    if isinstance(arg, int) and arg:
        return cls.from_address(arg)
    return None


class FaultBackend(Backend):
    """Wraps ``inner`` and injects the fault named ``fault`` (a key of :data:`FAULTS`)."""

    def __init__(self, inner: Backend, fault: str) -> None:
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; known: {', '.join(sorted(FAULTS))}")
        spec = FAULTS[fault]
        if spec.emu_only and inner.name != "emu":
            raise NotImplementedError(f"fault {fault!r} reaches into the emulated KVM and "
                                      f"cannot be injected into {inner.describe()}")
        self.inner = inner
        self.fault = spec
        self.name = inner.name
        self.hits = 0
        self._lock = threading.Lock()
        self._inv_lock = threading.RLock()
        self._gmem_fds: set[int] = set()
        self._vcpu_fds: set[int] = set()
        self._vm_fds: set[int] = set()
        self._runs: dict[int, int] = {}         # vCPU fd -> its kvm_run mapping
        hits_file = os.environ.get("KVMPY_FAULT_HITS_FILE")
        if hits_file:
            atexit.register(self._report_hits, hits_file)

    def _report_hits(self, path: str) -> None:
        """At exit, append the hit count for the self-check (several backends may append)."""
        with open(path, "a") as f:
            f.write(f"{self.hits}\n")

    def __getattr__(self, attr: str) -> Any:
        # Backend-specific extras (the emulator's profile, object_of, ...) pass through.
        if attr == "inner":       # not set yet (during __init__ or unpickling)
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    def _hit(self) -> None:
        with self._lock:
            self.hits += 1

    # --- ioctl ------------------------------------------------------------------------------
    def ioctl(self, fd: int, request: int, arg: IoctlArg = None) -> int:
        req = request & 0xFFFF_FFFF
        f = self.fault.name
        if req == Ioctl.KVM_CREATE_VM:
            r = self.inner.ioctl(fd, request, arg)
            self._vm_fds.add(r)
            return r
        if req == Ioctl.KVM_CREATE_VCPU:
            r = self.inner.ioctl(fd, request, arg)
            self._vcpu_fds.add(r)
            return r
        if req == Ioctl.KVM_CREATE_GUEST_MEMFD:
            return self._create_gmem(fd, request, arg)
        if req == Ioctl.KVM_SET_USER_MEMORY_REGION2:
            return self._set_region(fd, request, arg)
        if req == Ioctl.KVM_SET_MEMORY_ATTRIBUTES:
            return self._set_attributes(fd, request, arg)
        if req == Ioctl.KVM_RUN and f in ("memory-fault-gpa", "memory-fault-flags", "mmio-gpa"):
            return self._run(fd, request, arg)
        return self.inner.ioctl(fd, request, arg)

    def _create_gmem(self, fd: int, request: int, arg: IoctlArg) -> int:
        f = self.fault.name
        try:
            r = self.inner.ioctl(fd, request, arg)
        except OSError as e:
            c = _struct(arg, kvm_create_guest_memfd)
            if f == "gmem-size-errno" and e.errno == errno.EINVAL and c is not None \
                    and (c.size == 0 or c.size % PAGE_SIZE):
                self._hit()
                raise OSError(errno.ENOMEM, "injected: gmem-size-errno") from None
            if f == "gmem-invalid-flag-accepted" and e.errno == errno.EINVAL and c is not None:
                known = int(GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED)
                if c.flags & ~known and c.size and not c.size % PAGE_SIZE:
                    valid = self._valid_gmem_flags(fd)
                    fixed = kvm_create_guest_memfd(size=c.size, flags=c.flags & valid)
                    r = self.inner.ioctl(fd, request, fixed)
                    self._hit()
                    self._gmem_fds.add(r)
                    return r
            raise
        self._gmem_fds.add(r)
        if f == "gmem-not-zeroed":
            c = _struct(arg, kvm_create_guest_memfd)
            if c is not None and c.size:
                # The emulated guest_memfd's contents are a memfd behind the caller's handle,
                # which refuses pwrite like guest_memfd (docs/emulator.md, guest_memfd files).
                g = getattr(self.inner, "object_of", lambda fd: None)(r)
                os.pwrite(getattr(g, "mem_fd", r), b"\xa5" * min(int(c.size), 1 << 22), 0)
                self._hit()
        return r

    def _valid_gmem_flags(self, vm_fd: int) -> int:
        from ..uapi import Cap

        try:
            return self.inner.ioctl(vm_fd, Ioctl.KVM_CHECK_EXTENSION, int(Cap.GUEST_MEMFD_FLAGS))
        except OSError:
            return 0

    def _set_region(self, fd: int, request: int, arg: IoctlArg) -> int:
        f = self.fault.name
        r2 = _struct(arg, kvm_userspace_memory_region2)
        if f == "slot-delete-ignored" and r2 is not None and r2.memory_size == 0:
            self._hit()
            return 0
        try:
            return self.inner.ioctl(fd, request, arg)
        except OSError as e:
            if f == "memslot-overlap-errno" and e.errno == errno.EEXIST:
                self._hit()
                raise OSError(errno.EINVAL, "injected: memslot-overlap-errno") from None
            raise

    def _set_attributes(self, fd: int, request: int, arg: IoctlArg) -> int:
        f = self.fault.name
        a = _struct(arg, kvm_memory_attributes)
        if f == "attributes-partial" and a is not None and a.size > PAGE_SIZE:
            part = kvm_memory_attributes(a.address, PAGE_SIZE, a.attributes, a.flags)
            r = self.inner.ioctl(fd, request, part)
            self._hit()
            return r
        if f == "skip-invalidation-attributes":
            with self._no_invalidation(fd):
                return self.inner.ioctl(fd, request, arg)
        try:
            return self.inner.ioctl(fd, request, arg)
        except OSError as e:
            if f == "attributes-einval-ignored" and e.errno == errno.EINVAL:
                self._hit()
                return 0
            raise

    def _run(self, fd: int, request: int, arg: IoctlArg) -> int:
        f = self.fault.name
        addr = self._runs.get(fd)
        try:
            r = self.inner.ioctl(fd, request, arg)
        except OSError as e:
            if addr and e.errno == errno.EFAULT:
                run = kvm_run.from_address(addr)
                if run.exit_reason == ExitReason.MEMORY_FAULT:
                    mf = run.exit.memory_fault
                    if f == "memory-fault-gpa":
                        mf.gpa += PAGE_SIZE
                        self._hit()
                    elif f == "memory-fault-flags" and mf.flags & MemoryExitFlag.PRIVATE:
                        mf.flags &= ~int(MemoryExitFlag.PRIVATE)
                        self._hit()
            raise
        if addr and f == "mmio-gpa":
            run = kvm_run.from_address(addr)
            if run.exit_reason == ExitReason.MMIO:
                run.exit.mmio.phys_addr += 8
                self._hit()
        return r

    @contextmanager
    def _no_invalidation(self, vm_fd: int) -> Iterator[None]:
        """Suppress EmuVm.invalidate for the VM of ``vm_fd`` during one call (this thread's
        call; another thread's invalidation in the same window is lost too, as a real
        missing zap would lose it)."""
        vm = self.inner.object_of(vm_fd)  # type: ignore[attr-defined]
        if vm is None or not hasattr(vm, "invalidate"):
            yield
            return
        skipped: list[tuple[int, int]] = []

        def no_zap(lo: int, hi: int) -> None:
            skipped.append((lo, hi))

        with self._inv_lock:        # one suppression at a time: restoring is then exact
            vm.invalidate = no_zap
            try:
                yield
            finally:
                del vm.invalidate     # back to the class method
                if skipped:
                    self._hit()

    # --- files ------------------------------------------------------------------------------
    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        f = self.fault.name
        if fd in self._gmem_fds and mode & FALLOC_FL_PUNCH_HOLE:
            if f == "punch-hole-dropped":
                # Validate like the kernel would (so bad arguments still fail), then drop it.
                if offset < 0 or length <= 0 or offset % PAGE_SIZE or length % PAGE_SIZE:
                    self.inner.fallocate(fd, mode, offset, length)
                self._hit()
                return
        self.inner.fallocate(fd, mode, offset, length)

    def mmap(self, fd: int, length: int, prot: int, flags: int, offset: int = 0,
             addr: int = 0) -> int:
        a = self.inner.mmap(fd, length, prot, flags, offset, addr)
        if fd in self._vcpu_fds and offset == 0:
            self._runs[fd] = a
        return a

    def close(self, fd: int) -> None:
        self._gmem_fds.discard(fd)
        self._vcpu_fds.discard(fd)
        self._vm_fds.discard(fd)
        self._runs.pop(fd, None)
        self.inner.close(fd)

    # --- plain delegation -------------------------------------------------------------------
    def open_kvm(self) -> int:
        return self.inner.open_kvm()

    def munmap(self, addr: int, length: int) -> None:
        self.inner.munmap(addr, length)

    def madvise(self, addr: int, length: int, advice: int) -> None:
        self.inner.madvise(addr, length, advice)

    def fstat(self, fd: int) -> os.stat_result:
        return self.inner.fstat(fd)

    def fstatfs_type(self, fd: int) -> int:
        return self.inner.fstatfs_type(fd)

    def mprotect(self, addr: int, length: int, prot: int) -> None:
        self.inner.mprotect(addr, length, prot)

    def mbind(self, addr: int, length: int, mode: int, nodemask: int, flags: int = 0) -> None:
        self.inner.mbind(addr, length, mode, nodemask, flags)

    def move_pages(self, addrs: list[int], nodes: list[int] | None = None,
                   flags: int = 0) -> list[int]:
        return self.inner.move_pages(addrs, nodes, flags)

    def read(self, fd: int, count: int) -> bytes:
        return self.inner.read(fd, count)

    def write(self, fd: int, data: bytes) -> int:
        return self.inner.write(fd, data)

    def pread(self, fd: int, count: int, offset: int) -> bytes:
        return self.inner.pread(fd, count, offset)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        return self.inner.pwrite(fd, data, offset)

    def run_begin(self, vcpu_fd: int, kvm_run: bool = True) -> object:
        return self.inner.run_begin(vcpu_fd, kvm_run)

    def run_end(self, vcpu_fd: int, token: object, kicked: bool) -> None:
        self.inner.run_end(vcpu_fd, token, kicked)

    def kick(self, vcpu_fd: int, thread_ident: int) -> None:
        self.inner.kick(vcpu_fd, thread_ident)

    def modelled_errno(self, behaviour: str) -> int | None:
        return self.inner.modelled_errno(behaviour)

    def describe(self) -> str:
        return f"{self.inner.describe()} [injected fault: {self.fault.name}]"


def from_env(inner: Backend) -> Backend:
    """``inner`` wrapped with the fault named by $KVMPY_INJECT_FAULT (``inner`` if unset)."""
    name = os.environ.get("KVMPY_INJECT_FAULT", "")
    return FaultBackend(inner, name) if name else inner


__all__ = ["FAULTS", "FaultBackend", "FaultSpec", "from_env"]
