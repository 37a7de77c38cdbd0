"""guest_memfd files of the emulated KVM (api.rst 4.141 KVM_CREATE_GUEST_MEMFD).

Two files per guest_memfd, one fd. The contents live in a memfd only the emulator holds: its
bytes at offset o ARE the guest_memfd's contents at o, so the vCPU maps it and punch-holes
zero it for real; it is sealed against resizing, so nothing can make the emulator's mappings
of it SIGBUS. The emulator holds it as a *mapping*, not an fd (the caller must see one fd per
guest_memfd, as with real KVM): each operation that needs an fd (mmap, fallocate, fstat)
reopens it through /proc/self/map_files for the duration of the call (~3 us).
The caller gets ``fd``, a *handle*: a file the kernel itself refuses raw
ftruncate/read/write/pread/pwrite on, since such calls never reach the backend. Preferably a
memfd_secret(2) file: like guest_memfd an S_IFREG pseudo-file with no read/write/setattr-size
(mm/secretmem.c), so the kernel answers exactly what virt/kvm/guest_memfd.c does - ftruncate
EINVAL (secretmem_setattr once i_size is set; kvm_gmem_setattr always), read/write EINVAL and
pread/pwrite ESPIPE (a pseudo file is not FMODE_CAN_READ/PREAD), open(/proc/self/fd/N) ENXIO.
Without memfd_secret, a sealed memfd opened write-only (refused, other errnos; docs/emulator.md).
The backend knows the handle by its inode, so dup()s and SCM_RIGHTS copies are the same file.

File semantics follow virt/kvm/guest_memfd.c: fallocate needs FALLOC_FL_KEEP_SIZE and allows
only PUNCH_HOLE besides, page-aligned ranges, allocation inside i_size; no read/write; mmap only
with GUEST_MEMFD_FLAG_MMAP and MAP_SHARED; host faults SIGBUS unless the memory is shared.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

from ...uapi import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    PAGE_SIZE,
    GuestMemfdFlag,
)
from ..libc import libc, libc_fallocate, libc_mmap, libc_munmap

if TYPE_CHECKING:
    from .profiles import Profile

# include/uapi/linux/falloc.h: modes vfs_fallocate knows (KEEP_SIZE, PUNCH_HOLE,
# COLLAPSE_RANGE, ZERO_RANGE, INSERT_RANGE, UNSHARE_RANGE, WRITE_ZEROES).
FALLOC_FL_SUPPORTED_MASK = 0x01 | 0x02 | 0x08 | 0x10 | 0x20 | 0x40 | 0x80
LLONG_MAX = (1 << 63) - 1
MAP_TYPE = 0x0F
MAP_SHARED = 0x01
MAP_SHARED_VALIDATE = 0x03
PROT_NONE = 0x0
PROT_EXEC = 0x4
SYS_memfd_secret = 447          # x86-64 (arch/x86/entry/syscalls/syscall_64.tbl)
# Seals that keep a memfd's size fixed for good (include/uapi/linux/fcntl.h).
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE = 0x1, 0x2, 0x4, 0x8
# Which kind of handle new guest_memfds get: "secret" (memfd_secret, when the kernel offers
# it) or "sealed" (the fallback); tests force the fallback through this.
handle_kind = "secret"


def _memfd_secret() -> int:
    """A memfd_secret(2) fd, or -1 where the kernel lacks it (ENOSYS, or secretmem disabled)."""
    fd = int(libc.syscall(SYS_memfd_secret, os.O_CLOEXEC))
    return fd if fd >= 0 else -1


def make_handle(size: int) -> tuple[int, str]:
    """The fd the caller holds for a guest_memfd of ``size`` bytes, and its kind. Its fstat
    shows size, a regular file, mode 0600 and PAGE_SIZE blocks, as kvm_gmem_create()'s
    inode does (alloc_anon_inode() mode S_IRUSR|S_IWUSR, then S_IFREG)."""
    if handle_kind == "secret":
        fd = _memfd_secret()
        if fd >= 0:
            try:
                # The first size change is the only one secretmem allows.
                os.ftruncate(fd, size)
                os.fchmod(fd, 0o600)
                return fd, "secret"
            except OSError:
                os.close(fd)
    mfd = os.memfd_create("kvm-gmem", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(mfd, size)
        os.fchmod(mfd, 0o600)
        fcntl.fcntl(mfd, fcntl.F_ADD_SEALS,
                    F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL)
        # Write-only: read is EBADF; writes, resizes and writable mmaps are refused by the
        # seals (EPERM) or the open mode (EACCES).
        fd = os.open(f"/proc/self/fd/{mfd}", os.O_WRONLY | os.O_CLOEXEC)
    finally:
        os.close(mfd)
    return fd, "sealed"


def _contents_file(size: int) -> int:
    """The memfd holding the contents, sealed at ``size``: even an fd reopened through
    /proc/self/map_files cannot shrink it under the emulator's mappings (SIGBUS)."""
    fd = os.memfd_create("kvm-gmem-contents", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _vma_of(addr: int) -> str:
    """The /proc/self/map_files name of the VMA holding ``addr`` (when it was merged or
    split since it was made, its name is no longer the range it was made with)."""
    with open("/proc/self/maps") as f:
        for line in f:
            rng = line.split(" ", 1)[0]
            lo, hi = (int(x, 16) for x in rng.split("-"))
            if lo <= addr < hi:
                return rng
    raise OSError(errno.EBADF, f"guest_memfd file mapping at {addr:#x} is gone")


class HeldFile:
    """A file the emulator keeps without an fd: one PROT_NONE page of MAP_SHARED mapping
    holds it (the VMA's vm_file reference), and ``open()`` reopens the whole file through
    /proc/self/map_files for the duration of one operation (~3 us). The fd passed in is
    closed. A page past the file's end may be mapped (mmap does not check i_size)."""

    def __init__(self, fd: int) -> None:
        try:
            self.base = libc_mmap(0, PAGE_SIZE, PROT_NONE, MAP_SHARED, fd, 0)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def open(self) -> Iterator[int]:
        """An O_RDWR fd of the file, closed when the block ends."""
        if self.base == 0:
            raise OSError(errno.EBADF, "guest_memfd file released")
        try:
            fd = os.open(f"/proc/self/map_files/{self.base:x}-{self.base + PAGE_SIZE:x}",
                         os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = os.open(f"/proc/self/map_files/{_vma_of(self.base)}", os.O_RDWR | os.O_CLOEXEC)
        try:
            yield fd
        finally:
            os.close(fd)

    def release(self) -> None:
        if self.base:
            libc_munmap(self.base, PAGE_SIZE)
            self.base = 0


class GmemBinding(Protocol):
    """A memslot bound to a guest_memfd, as the file sees it (memslots.py EmuMemslot)."""

    @property
    def slot(self) -> int: ...
    @property
    def as_id(self) -> int: ...
    @property
    def flags(self) -> int: ...
    @property
    def gpa(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def userspace_addr(self) -> int: ...
    @property
    def gmem_offset(self) -> int: ...
    @property
    def end(self) -> int: ...


class GmemVm(Protocol):
    """What a guest_memfd needs of the VM it belongs to (vm.py EmuVm)."""

    @property
    def lock(self) -> contextlib.AbstractContextManager[Any]: ...
    @property
    def profile(self) -> Profile: ...
    def invalidate(self, gpa_lo: int, gpa_hi: int) -> None: ...
    def unbind_gmem(self, gmem: EmuGmem) -> None: ...


class EmuGmem:
    """One guest_memfd: ``fd`` (the caller's handle), the contents (a mapping at ``base``;
    ``contents()`` gives an fd of it for one operation), ``size``, ``flags`` and its ``vm``.

    Holding ``vm`` keeps the VM alive after its fd closes (the kernel's file takes a reference
    on the kvm in __kvm_gmem_create()). ``bindings`` maps a memslot key (as_id << 16 | id) to
    the bound slot; the slot records gmem_offset and size.
    """

    def __init__(self, vm: GmemVm, size: int, flags: int) -> None:
        self.vm = vm
        self.size = size
        self.flags = flags
        # Held by a one-page mapping: a VMA of the whole size would not fit for sizes near
        # LLONG_MAX (the kernel accepts those).
        self._contents = HeldFile(_contents_file(size))
        try:
            self.fd, self.handle_kind = make_handle(size)
        except BaseException:
            self._contents.release()
            raise
        self.bindings: dict[int, GmemBinding] = {}
        self.closed = False
        self._sigbus: HeldFile | None = None
        self._compat_fd = -1

    def __repr__(self) -> str:
        return f"<EmuGmem fd {self.fd} size {self.size:#x} flags {self.flags:#x}>"

    def contents(self) -> contextlib.AbstractContextManager[int]:
        """An fd of the contents memfd, closed when the block ends."""
        return self._contents.open()

    def map_contents(self, addr: int, length: int, prot: int, flags: int, offset: int) -> int:
        """mmap(2) of the contents memfd."""
        with self.contents() as fd:
            return libc_mmap(addr, length, prot, flags, fd, offset)

    def allocate(self, offset: int, length: int) -> None:
        """fallocate(KEEP_SIZE) of the contents (kvm_gmem_allocate() / pre-fault)."""
        with self.contents() as fd:
            libc_fallocate(fd, FALLOC_FL_KEEP_SIZE, offset, length)

    @property
    def mem_fd(self) -> int:
        """An fd of the contents for code outside the emulator that writes them directly
        (the fault injector's gmem-not-zeroed); opened on first use, closed at release, so
        only a guest_memfd someone asked this of shows a second fd. -1 once released."""
        if self._compat_fd < 0 and not self.closed:
            with self.contents() as fd:
                self._compat_fd = os.dup(fd)
        return self._compat_fd

    # --- binding bookkeeping (under vm.lock) -------------------------------------------------
    def overlaps(self, offset: int, size: int) -> bool:
        """Whether [offset, offset+size) intersects an existing binding (kvm_gmem_bind)."""
        end = offset + size
        return any(s.gmem_offset < end and offset < s.gmem_offset + s.size
                   for s in self.bindings.values())

    def bound_gpa_ranges(self, offset: int, end: int) -> list[tuple[int, int]]:
        """GPA ranges of bindings that map file range [offset, end)."""
        out = []
        for s in self.bindings.values():
            lo = max(offset, s.gmem_offset)
            hi = min(end, s.gmem_offset + s.size)
            if lo < hi:
                out.append((s.gpa + lo - s.gmem_offset, s.gpa + hi - s.gmem_offset))
        return out

    # --- file operations ---------------------------------------------------------------------
    def fallocate(self, mode: int, offset: int, length: int) -> None:
        """fallocate(2) with vfs_fallocate()'s generic checks, then kvm_gmem_fallocate()."""
        if offset < 0 or length <= 0:
            raise OSError(errno.EINVAL, "fallocate: offset < 0 or len <= 0")
        if mode & ~FALLOC_FL_SUPPORTED_MASK:
            raise OSError(errno.EOPNOTSUPP, "fallocate: unknown mode bits")
        if offset + length > LLONG_MAX:
            raise OSError(errno.EFBIG, "fallocate: offset + len beyond s_maxbytes")
        if not mode & FALLOC_FL_KEEP_SIZE:
            raise OSError(errno.EOPNOTSUPP, "guest_memfd fallocate needs FALLOC_FL_KEEP_SIZE")
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE):
            raise OSError(errno.EOPNOTSUPP, "guest_memfd allows only KEEP_SIZE|PUNCH_HOLE")
        if offset % PAGE_SIZE or length % PAGE_SIZE:
            raise OSError(errno.EINVAL, "guest_memfd fallocate: offset/len not page aligned")
        end = offset + length
        with self.vm.lock:
            if mode & FALLOC_FL_PUNCH_HOLE:
                # kvm_gmem_punch_hole(): zap the bound GPAs, then truncate the page cache.
                # A hole past i_size is a no-op success.
                ranges = self.bound_gpa_ranges(offset, end)
                if offset < self.size:
                    with self.contents() as fd:
                        libc_fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE,
                                       offset, min(end, self.size) - offset)
                for lo, hi in ranges:
                    self.vm.invalidate(lo, hi)
                return
            # kvm_gmem_allocate(): the range must lie inside the file.
            if end > self.size:
                raise OSError(errno.EINVAL, "guest_memfd allocation past i_size")
            self.allocate(offset, length)
            for lo, hi in self.bound_gpa_ranges(offset, end):
                self.vm.invalidate(lo, hi)

    def mmap(self, length: int, prot: int, flags: int, offset: int, addr: int) -> int:
        """kvm_gmem_mmap(): ENODEV without GUEST_MEMFD_FLAG_MMAP, EINVAL unless MAP_SHARED.

        Host faults on memory that is not shared SIGBUS (kvm_gmem_fault_user_mapping(): a
        file without GUEST_MEMFD_FLAG_INIT_SHARED has no shared pages); pages past i_size
        SIGBUS as for any file. The first is modelled by mapping an empty memfd instead of
        the contents, the second by the memfd's own size.
        """
        if prot & PROT_EXEC and self.vm.profile.gmem_noexec:
            # mm/mmap.c do_mmap(): path_noexec() refuses VM_EXEC before f_op->mmap is called.
            raise OSError(errno.EPERM, "PROT_EXEC mapping of a guest_memfd (noexec mount)")
        if not self.flags & GuestMemfdFlag.MMAP:
            raise OSError(self.vm.profile.gmem_mmap_noflag_errno,
                          "mmap of a guest_memfd without GUEST_MEMFD_FLAG_MMAP")
        if flags & MAP_TYPE not in (MAP_SHARED, MAP_SHARED_VALIDATE):
            raise OSError(errno.EINVAL, "guest_memfd can only be mapped MAP_SHARED")
        if self.flags & GuestMemfdFlag.INIT_SHARED:
            return self.map_contents(addr, length, prot, flags, offset)
        if self._sigbus is None:
            # An empty memfd: every page of a shared mapping of it raises SIGBUS when touched.
            self._sigbus = HeldFile(os.memfd_create("kvm-gmem-private", os.MFD_CLOEXEC))
        with self._sigbus.open() as fd:
            return libc_mmap(addr, length, prot, flags, fd, offset)

    def release(self) -> None:
        """The last reference to the file went away (kvm_gmem_release()): bound slots lose their
        guest_memfd (private accesses then fault), the VM reference is dropped."""
        if self.closed:
            return
        self.closed = True
        vm = self.vm
        with vm.lock:
            vm.unbind_gmem(self)
        if self._sigbus is not None:
            self._sigbus.release()
            self._sigbus = None
        # Mappings of the contents (the caller's, the vCPUs') keep the pages alive.
        if self._compat_fd >= 0:
            os.close(self._compat_fd)
            self._compat_fd = -1
        self._contents.release()
