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
import ctypes
import errno
import fcntl
import os
import weakref
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
MAP_FIXED, MAP_ANONYMOUS = 0x10, 0x20
PROT_READ, PROT_WRITE = 0x1, 0x2
PROT_NONE = 0x0
PROT_EXEC = 0x4
SYS_memfd_secret = 447          # x86-64 (arch/x86/entry/syscalls/syscall_64.tbl)
# Seals that keep a memfd's size fixed for good (include/uapi/linux/fcntl.h).
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE = 0x1, 0x2, 0x4, 0x8
# Which kind of handle new guest_memfds get: "secret" (memfd_secret, when the kernel offers
# it) or "sealed" (the fallback); tests force the fallback through this.
handle_kind = "secret"


# --- memory failure (MADV_HWPOISON of a guest_memfd page) --------------------------------------
# The kernel's hwpoison is a property of the page, seen by every process mapping it, and the
# selftests inject it from a forked child. So the emulator's record is in memory shared across
# fork: one MAP_SHARED anonymous area made at import, (contents inode, page index) pairs and an
# epoch that every change bumps. Each process applies it to its own host mappings (SIGBUS pages)
# and vCPUs when it next enters the backend or forks (sync_poison()). Never host RAM's poison.
_POISON_SLOTS = 1022
_POISON_BYTES = (2 + 2 * _POISON_SLOTS) * 8


class _PoisonTable:
    """[epoch, count, (ino, page) * count] in a MAP_SHARED page pair inherited by children."""

    def __init__(self) -> None:
        self.addr = libc_mmap(0, _POISON_BYTES, PROT_READ | PROT_WRITE,
                              MAP_SHARED | MAP_ANONYMOUS, -1, 0)
        self.words = (ctypes.c_uint64 * (_POISON_BYTES // 8)).from_address(self.addr)

    @property
    def epoch(self) -> int:
        return int(self.words[0])

    def pages(self, ino: int) -> set[int]:
        w = self.words
        return {int(w[3 + 2 * i]) for i in range(int(w[1])) if w[2 + 2 * i] == ino}

    def add(self, ino: int, page: int) -> None:
        if page in self.pages(ino):
            return
        w = self.words
        n = int(w[1])
        if n >= _POISON_SLOTS:
            raise OSError(errno.ENOMEM, f"emulated KVM: more than {_POISON_SLOTS} hwpoisoned "
                                        "guest_memfd pages are not modelled")
        w[2 + 2 * n], w[3 + 2 * n] = ino, page
        w[1] = n + 1
        w[0] += 1

    def remove(self, ino: int, p0: int, p1: int) -> bool:
        w = self.words
        keep = [(int(w[2 + 2 * i]), int(w[3 + 2 * i])) for i in range(int(w[1]))]
        left = [(i, p) for i, p in keep if i != ino or not p0 <= p < p1]
        if len(left) == len(keep):
            return False
        for k, (i, p) in enumerate(left):
            w[2 + 2 * k], w[3 + 2 * k] = i, p
        w[1] = len(left)
        w[0] += 1
        return True


_poison = _PoisonTable()
#: Live guest_memfds of this process (for sync_poison()).
_live: weakref.WeakSet[EmuGmem] = weakref.WeakSet()
_seen_epoch = 0


def poison_epoch() -> int:
    """Bumped by every poison or unpoison in any process of this tree (vCPUs compare it)."""
    return _poison.epoch


def sync_poison() -> None:
    """Bring this process's host mappings of guest_memfds up to date with poison recorded by
    another process (a forked injector): cheap when nothing changed."""
    global _seen_epoch
    epoch = _poison.epoch
    if epoch == _seen_epoch:
        return
    _seen_epoch = epoch
    for g in list(_live):
        g.apply_poison()


os.register_at_fork(before=sync_poison)


def has_cap_sys_admin() -> bool:
    """CAP_SYS_ADMIN in the effective set (/proc/self/status CapEff bit 21)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> 21 & 1)
    except OSError:
        pass
    return os.geteuid() == 0


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
        #: This process's host mappings of the file made through the backend: (start, end,
        #: file offset of start); the backend keeps it (EmuBackend.mmap/munmap).
        self.host_maps: list[tuple[int, int, int]] = []
        #: Host page addresses already turned into SIGBUS pages for a poisoned page.
        self._sigbus_pages: set[int] = set()
        self._ino = 0
        _live.add(self)

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

    # --- memory failure -----------------------------------------------------------------------
    @property
    def ino(self) -> int:
        """The contents memfd's inode number: the file's identity in the poison table."""
        if not self._ino:
            with self.contents() as fd:
                self._ino = os.fstat(fd).st_ino
        return self._ino

    def poisoned(self) -> set[int]:
        """Page indices of the file that are hwpoisoned (empty without any poison)."""
        return _poison.pages(self.ino) if _poison.words[1] else set()

    def hwpoison(self, offset: int) -> None:
        """memory_failure() of the page at file ``offset`` (7.3 virt/kvm/guest_memfd.c
        kvm_gmem_error_folio(): KVM's mappings of it are zapped, the folio stays in the file,
        MF_DELAYED). The injecting task is not killed here (the kernel may kill it with
        BUS_MCEERR_AR). A page the host cannot fault in - not shared, or past i_size - is
        EFAULT, as get_user_pages_fast() in madvise_inject_error() fails there."""
        if not self.flags & GuestMemfdFlag.INIT_SHARED or not 0 <= offset < self.size:
            raise OSError(errno.EFAULT, "madvise(MADV_HWPOISON): the page cannot be faulted in")
        page = offset // PAGE_SIZE
        with self.vm.lock:
            _poison.add(self.ino, page)
            self.apply_poison()
            for lo, hi in self.bound_gpa_ranges(page * PAGE_SIZE, (page + 1) * PAGE_SIZE):
                self.vm.invalidate(lo, hi)

    def apply_poison(self) -> None:
        """Make this process's host mappings of poisoned pages SIGBUS for real: the page of
        each mapping is replaced (MAP_FIXED) by a page of an empty memfd, past its end. It
        stays so after a punch-hole, as the kernel's hwpoison PTE survives truncation
        (mm/memory.c zap_nonpresent_ptes()); a new mapping gets the fresh page."""
        if self.closed or not self.host_maps:
            return
        pages = self.poisoned()
        for start, end, off in self.host_maps:
            for page in pages:
                a = start + page * PAGE_SIZE - off
                if start <= a < end and a not in self._sigbus_pages:
                    self._map_sigbus(a, PAGE_SIZE)
                    self._sigbus_pages.add(a)

    def set_host_maps(self, maps: list[tuple[int, int, int]]) -> None:
        """After an munmap: the mappings left (SIGBUS pages of unmapped ones are forgotten)."""
        self.host_maps = maps
        self._sigbus_pages = {a for a in self._sigbus_pages
                              if any(s <= a < e for s, e, _ in maps)}

    def _map_sigbus(self, addr: int, length: int) -> None:
        if self._sigbus is None:
            # An empty memfd: every page of a shared mapping of it raises SIGBUS when touched.
            self._sigbus = HeldFile(os.memfd_create("kvm-gmem-private", os.MFD_CLOEXEC))
        with self._sigbus.open() as fd:
            libc_mmap(addr, length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0)

    def unpoison(self, offset: int, end: int) -> None:
        """PUNCH_HOLE over poisoned pages: truncate_inode_pages_range() drops the folios, the
        next fault allocates fresh zeroed pages (kvm_gmem_punch_hole())."""
        if _poison.words[1]:
            _poison.remove(self.ino, offset // PAGE_SIZE, -(-end // PAGE_SIZE))

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
                    self.unpoison(offset, min(end, self.size))
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
            a = self.map_contents(addr, length, prot, flags, offset)
            # A poisoned page faults VM_FAULT_HWPOISON: SIGBUS (kvm_gmem_fault_user_mapping()).
            for page in self.poisoned():
                pa = a + page * PAGE_SIZE - offset
                if a <= pa < a + length:
                    self._map_sigbus(pa, PAGE_SIZE)
                    self._sigbus_pages.add(pa)
            return a
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
