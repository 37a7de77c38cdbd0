"""Guest-physical memory of one vCPU engine, resolved page by page as KVM's MMU does.

KVM resolves a guest page fault through the memslot that contains the gfn, then the gfn's
memory attribute picks the backing (Documentation/virt/kvm/api.rst, KVM_SET_MEMORY_ATTRIBUTES,
KVM_EXIT_MEMORY_FAULT; arch/x86/kvm/mmu/mmu.c kvm_mmu_faultin_pfn()):

  no memslot                              -> emulated MMIO (KVM_EXIT_MMIO)
  private gfn, slot bound to guest_memfd  -> the guest_memfd page
  private gfn, slot without guest_memfd   -> KVM_EXIT_MEMORY_FAULT (flags PRIVATE)
  shared gfn                              -> the host page at userspace_addr + offset
                                             (6.18+: a slot whose guest_memfd has
                                             GUEST_MEMFD_FLAG_MMAP is "gmem only" and serves
                                             shared gfns from the guest_memfd too)
  shared gfn whose host page is missing   -> KVM_EXIT_MEMORY_FAULT (flags 0), KVM_RUN EFAULT

Design (docs/emulator.md, "vCPU"): one unicorn region per memslot over a host VA *window*
filled with mmap(MAP_FIXED|MAP_SHARED) of the backing files (the shared backing's file found
through /proc/self/maps + map_files, or the guest_memfd's memfd), so a conversion is one mmap
and unicorn's TLB (which caches host VAs) sees it at once. Pages that must trap are holes in
the unicorn regions. Shared backings that are private anonymous memory cannot be aliased; such
slots are mapped *directly* (unicorn points at userspace_addr) and private guest_memfd pages
get their own view of the memfd; conversions then re-split unicorn regions (slower, correct).

Slots are built lazily (the unmapped-access hook, and eagerly for the page-table root before
each run) because unicorn's page walker reads physical memory without hooks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ....uapi import PAGE_SHIFT, PAGE_SIZE, MemFlag, MemoryExitFlag
from ...libc import MS_ASYNC, libc_mmap, libc_msync, libc_munmap
from .runmap import RunMap

if TYPE_CHECKING:
    from ..memslots import EmuMemslot
    from ..vm import EmuVm

PROT_NONE, PROT_READ, PROT_WRITE = 0, 1, 2
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS, MAP_NORESERVE = 1, 2, 0x10, 0x20, 0x4000
GMEM_FLAG_MMAP = 1

# Page states in a slot's RunMap (page index within the slot -> state).
SHARED = "S"       # served from the shared backing
GMEM = "G"         # served from the guest_memfd
# Trapping pages carry ("T", memory_fault_flags).
TrapState = tuple[str, int]
#: Not a KVM flag: marks a trap on a hwpoisoned guest_memfd page, which fails KVM_RUN with
#: EHWPOISON instead of EFAULT (exits.py _memory_fault()).
TRAP_HWPOISON = 1 << 62
State = str | TrapState


class PhysFault(Exception):
    """An access the emulator cannot serve from memory: ``kind`` is "mmio" (no memslot) or
    "fault" (KVM_EXIT_MEMORY_FAULT with ``flags``)."""

    def __init__(self, kind: str, gpa: int, flags: int = 0) -> None:
        super().__init__(f"{kind} at gpa {gpa:#x} flags {flags:#x}")
        self.kind = kind
        self.gpa = gpa
        self.flags = flags


@dataclass
class _Seg:
    """A piece of a slot's shared backing: slot offsets [lo, hi) are ``kind`` ("file": fd at
    foff + (off - lo), valid below file offset ``fsize``; "anon": not aliasable; "none": no
    host mapping)."""

    lo: int
    hi: int
    kind: str
    fd: int = -1
    foff: int = 0
    fsize: int = 0


def _host_segments(hva: int, size: int, fds: dict[tuple[int, int], int],
                   going: tuple[tuple[int, int], ...] | list[tuple[int, int]] = ()) -> list[_Seg]:
    """Describe host range [hva, hva+size) from /proc/self/maps (we are root, so
    /proc/self/map_files gives an fd for each file mapping). Host ranges in ``going`` (being
    unmapped through the backend right now) count as unmapped already."""
    segs = _read_host_segments(hva, size, fds)
    for lo, hi in going:
        segs = _carve(segs, lo - hva, hi - hva)
    return segs


def _carve(segs: list[_Seg], lo: int, hi: int) -> list[_Seg]:
    """Slot offsets [lo, hi) become "none" (no host mapping)."""
    out: list[_Seg] = []
    for seg in segs:
        if seg.hi <= lo or seg.lo >= hi or seg.kind == "none":
            out.append(seg)
            continue
        if seg.lo < lo:
            out.append(dataclasses.replace(seg, hi=lo))
        out.append(_Seg(max(seg.lo, lo), min(seg.hi, hi), "none"))
        if seg.hi > hi:
            out.append(dataclasses.replace(seg, lo=hi, foff=seg.foff + (hi - seg.lo)))
    return out


def _read_host_segments(hva: int, size: int, fds: dict[tuple[int, int], int]) -> list[_Seg]:
    segs: list[_Seg] = []
    end = hva + size
    pos = hva
    with open("/proc/self/maps") as f:
        lines = f.read().splitlines()
    for line in lines:
        parts = line.split(maxsplit=5)
        lo_s, hi_s = parts[0].split("-")
        lo, hi = int(lo_s, 16), int(hi_s, 16)
        if hi <= pos or lo >= end:
            continue
        if lo > pos:
            segs.append(_Seg(pos - hva, lo - hva, "none"))
            pos = lo
        s, e = max(lo, pos), min(hi, end)
        perms, off, inode = parts[1], int(parts[2], 16), int(parts[4])
        dev = parts[3]
        kind = "anon"
        fd, fsize = -1, 0
        if not ("r" in perms and "w" in perms):
            # KVM cannot fault in a PROT_NONE page (EFAULT) and cannot write a read-only one;
            # the emulator must not touch either (SIGSEGV), so both trap (see docs, gaps).
            kind = "none"
        elif inode != 0 and "s" in perms:
            key = (hash(dev), inode)
            fd = fds.get(key, -1)
            if fd < 0:
                try:
                    fd = os.open(f"/proc/self/map_files/{lo:x}-{hi:x}", os.O_RDWR | os.O_CLOEXEC)
                    fds[key] = fd
                except OSError as oe:
                    if oe.errno is None:
                        raise       # a signal handler's exception (TimeoutError): the caller's
                    fd = -1
            if fd >= 0:
                st = os.fstat(fd)
                # hugetlbfs files map only in huge-page units: they cannot back single pages
                # of the window, so such slots are mapped directly like anonymous memory.
                kind = "file" if st.st_blksize <= PAGE_SIZE else "anon"
                fsize = st.st_size
        segs.append(_Seg(s - hva, e - hva, kind, fd, off + (s - lo), fsize))
        pos = e
        if pos >= end:
            break
    if pos < end:
        segs.append(_Seg(pos - hva, end - hva, "none"))
    return segs


class SlotMap:
    """The emulator's mapping of one memslot into one unicorn engine."""

    def __init__(self, uc: Any, vm: EmuVm, slot: EmuMemslot) -> None:
        self.uc = uc
        self.vm = vm
        self.slot = slot
        self.npages = slot.size >> PAGE_SHIFT
        self.fds: dict[tuple[int, int], int] = {}
        gmem = slot.gmem
        self.gmem_only = gmem is not None and bool(gmem.flags & GMEM_FLAG_MMAP)
        if slot.userspace_addr and not self.gmem_only:
            self.segs = _host_segments(slot.userspace_addr, slot.size, self.fds,
                                       getattr(vm, "hva_unmapping", ()))
        else:
            self.segs = [_Seg(0, slot.size, "none")]
        self.direct = any(s.kind == "anon" for s in self.segs)
        self.window = 0
        self.gmem_view = 0
        self.state: RunMap[State] = RunMap()
        self.regions: list[tuple[int, int, int]] = []
        self.perms = 5 if slot.flags & MemFlag.READONLY else 7   # UC_PROT_READ|EXEC / ALL
        if self.direct:
            if gmem is not None:
                self.gmem_view = gmem.map_contents(0, slot.size, PROT_READ | PROT_WRITE,
                                                   MAP_SHARED, slot.gmem_offset)
        else:
            self.window = libc_mmap(0, slot.size, PROT_NONE,
                                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        self.update(0, self.npages)

    # --- resolution -----------------------------------------------------------------------
    def _states(self, p0: int, p1: int) -> list[tuple[int, int, State]]:
        """Page states for slot pages [p0, p1) from the attributes and backings."""
        slot, vm = self.slot, self.vm
        out: list[tuple[int, int, State]] = []
        gfn0 = slot.gpa >> PAGE_SHIFT
        attrs = getattr(vm, "attributes", None)
        p = p0
        while p < p1:
            gfn = gfn0 + p
            private = vm.is_private(gfn << PAGE_SHIFT)
            nb = attrs.next_boundary(gfn) if attrs is not None else gfn + 1
            q = p1 if nb is None else min(p1, max(nb - gfn0, p + 1))
            if private:
                if slot.gmem is not None:
                    self._gmem_runs(out, p, q, int(MemoryExitFlag.PRIVATE))
                else:
                    out.append((p, q, ("T", int(MemoryExitFlag.PRIVATE))))
            elif self.gmem_only:
                self._gmem_runs(out, p, q, 0)
            else:
                for seg in self.segs:
                    s = max(p, seg.lo >> PAGE_SHIFT)
                    e = min(q, seg.hi >> PAGE_SHIFT)
                    if s >= e:
                        continue
                    if seg.kind == "none":
                        out.append((s, e, ("T", 0)))
                    elif seg.kind == "anon":
                        out.append((s, e, SHARED))
                    else:
                        # Pages past the file's end would SIGBUS: KVM gets EFAULT there.
                        lim = s + max(0, (seg.fsize - (seg.foff + (s << PAGE_SHIFT) - seg.lo))
                                      >> PAGE_SHIFT)
                        lim = min(max(lim, s), e)
                        if lim > s:
                            out.append((s, lim, SHARED))
                        if lim < e:
                            out.append((lim, e, ("T", 0)))
            p = q
        return out

    def _gmem_runs(self, out: list[tuple[int, int, State]], p: int, q: int,
                   flags: int) -> None:
        """Slot pages [p, q) served by the guest_memfd, except hwpoisoned ones, which trap:
        __kvm_gmem_get_pfn() returns -EHWPOISON for a hwpoisoned folio."""
        gmem = self.slot.gmem
        assert gmem is not None
        base = self.slot.gmem_offset >> PAGE_SHIFT
        bad = sorted(pg - base for pg in gmem.poisoned() if p <= pg - base < q)
        for b in bad:
            if p < b:
                out.append((p, b, GMEM))
            out.append((b, b + 1, ("T", flags | TRAP_HWPOISON)))
            p = b + 1
        if p < q:
            out.append((p, q, GMEM))

    def _fill_window(self, p0: int, p1: int, st: State) -> None:
        off, length = p0 << PAGE_SHIFT, (p1 - p0) << PAGE_SHIFT
        slot = self.slot
        if st == GMEM:
            assert slot.gmem is not None
            slot.gmem.map_contents(self.window + off, length, PROT_READ | PROT_WRITE,
                                   MAP_SHARED | MAP_FIXED, slot.gmem_offset + off)
            return
        for seg in self.segs:
            s, e = max(off, seg.lo), min(off + length, seg.hi)
            if s < e and seg.kind == "file":
                libc_mmap(self.window + s, e - s, PROT_READ | PROT_WRITE,
                          MAP_SHARED | MAP_FIXED, seg.fd, seg.foff + (s - seg.lo))

    def update(self, p0: int, p1: int) -> bool:
        """Re-resolve slot pages [p0, p1). Returns whether anything changed."""
        p0, p1 = max(p0, 0), min(p1, self.npages)
        if p0 >= p1:
            return False
        changed = False
        for s, e, st in self._states(p0, p1):
            if isinstance(st, str) and not self.direct:
                self._fill_window(s, e, st)
                changed = True
            if any(old != st for _, _, old in self.state.runs(s, e)) or \
                    sum(b - a for a, b, _ in self.state.runs(s, e)) != e - s:
                changed = True
            self.state.set(s, e, st)
        self._sync_regions()
        return changed

    def host_of(self, p: int, st: State) -> int:
        if not self.direct:
            return self.window + (p << PAGE_SHIFT)
        if st == GMEM:
            return self.gmem_view + (p << PAGE_SHIFT)
        return self.slot.userspace_addr + (p << PAGE_SHIFT)

    def _wanted(self) -> list[tuple[int, int, int]]:
        out: list[tuple[int, int, int]] = []
        cur: list[int] | None = None      # [p0, p1, host0]
        cur_kind: str | None = None
        for s, e, st in self.state.runs():
            if not isinstance(st, str):
                continue
            kind = st if self.direct else "W"
            host = self.host_of(s, st)
            if cur is not None and cur_kind == kind and cur[1] == s and \
                    cur[2] + ((s - cur[0]) << PAGE_SHIFT) == host:
                cur[1] = e
                continue
            if cur is not None:
                out.append(self._region(cur))
            cur, cur_kind = [s, e, host], kind
        if cur is not None:
            out.append(self._region(cur))
        return out

    def _region(self, cur: list[int]) -> tuple[int, int, int]:
        return (self.slot.gpa + (cur[0] << PAGE_SHIFT), (cur[1] - cur[0]) << PAGE_SHIFT, cur[2])

    def _sync_regions(self) -> None:
        want = self._wanted()
        if want == self.regions:
            return
        keep = set(want) & set(self.regions)
        for r in self.regions:
            if r not in keep:
                self.uc.mem_unmap(r[0], r[1])
        for r in want:
            if r not in keep:
                self.uc.mem_map_ptr(r[0], r[1], self.perms, r[2])
        self.regions = want

    def trap_flags(self, gpa: int) -> int | None:
        """None if the page is mapped, else the memory-fault flags for it."""
        st = self.state.get((gpa - self.slot.gpa) >> PAGE_SHIFT)
        if st is None or isinstance(st, str):
            return None
        return st[1]

    def host_still_mapped(self) -> bool:
        """For a direct slot: whether every host page it points at is still mapped (msync
        fails with ENOMEM over a hole). Unicorn would SIGSEGV on a vanished page."""
        if not self.direct:
            return True
        return _msync(self.slot.userspace_addr, self.slot.size) == 0 if any(
            seg.kind == "anon" for seg in self.segs) else True

    def rescan(self) -> None:
        """Re-read the host mappings behind the slot (KVM follows them with MMU notifiers)."""
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        self.segs = _host_segments(self.slot.userspace_addr, self.slot.size, self.fds,
                                   getattr(self.vm, "hva_unmapping", ()))
        self.state = RunMap()
        self.update(0, self.npages)

    def close(self) -> None:
        for r in self.regions:
            try:
                self.uc.mem_unmap(r[0], r[1])
            except Exception:
                pass
        self.regions = []
        if self.window:
            libc_munmap(self.window, self.slot.size)
            self.window = 0
        if self.gmem_view:
            libc_munmap(self.gmem_view, self.slot.size)
            self.gmem_view = 0
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _msync(addr: int, size: int) -> int:
    """0, or the errno of msync(MS_ASYNC) over [addr, addr+size) (ENOMEM: a hole)."""
    try:
        libc_msync(addr, size, MS_ASYNC)
    except OSError as e:
        return e.errno or 0
    return 0


class PhysMap:
    """All memslots as one engine sees them, plus the pending invalidations."""

    def __init__(self, uc: Any, vm: EmuVm) -> None:
        self.uc = uc
        self.vm = vm
        self.slots: dict[int, SlotMap] = {}
        self._pending: list[tuple[int, int]] = []
        self._pending_hva: list[tuple[int, int]] = []
        #: Sequence numbers of queued / applied invalidations (for synchronous waiters).
        self.queued_seq = 0
        self.applied_seq = 0
        #: Threads blocked in EmuVcpu.invalidate() waiting for this engine; they hold vm.lock
        #: (the core invalidates with it held), so the engine reads VM state without it then.
        self.sync_waiters = 0
        self._plock = threading.Lock()
        #: Set when mapped contents may have changed: translated code must be flushed.
        self.flush_needed = False
        #: Bumped whenever a slot map is built or dropped.
        self.generation = 0

    # --- invalidation (any thread) ----------------------------------------------------------
    def invalidate(self, lo: int, hi: int) -> int:
        with self._plock:
            self._pending.append((lo, hi))
            self.queued_seq += 1
            return self.queued_seq

    def invalidate_hva(self, lo: int, hi: int) -> int:
        """Queue the drop of every slot map over host range [lo, hi) (the MMU notifier of an
        munmap: kvm_mmu_notifier_invalidate_range_start() zaps by hva)."""
        with self._plock:
            self._pending_hva.append((lo, hi))
            self.queued_seq += 1
            return self.queued_seq

    @contextlib.contextmanager
    def vm_locked(self) -> Iterator[None]:
        """vm.lock, unless an invalidating thread that holds it is waiting for this engine
        (taking it would deadlock; that thread mutates nothing while it waits)."""
        # Polled, not one blocking acquire: the holder may start waiting for this engine after
        # we looked at sync_waiters (its ioctl takes vm.lock first), and a blocked acquire then
        # sat out its INVALIDATE_WAIT_S (2 s a conversion with 4 vCPUs: 134 s for one test).
        lock = self.vm.lock
        while not lock.acquire(timeout=0.001):
            if self.sync_waiters:
                yield
                return
        try:
            yield
        finally:
            lock.release()

    @property
    def has_pending(self) -> bool:
        return bool(self._pending or self._pending_hva)

    def apply_pending(self) -> None:
        """Apply queued invalidations (engine thread, engine stopped)."""
        with self._plock:
            pending, self._pending = self._pending, []
            hvas, self._pending_hva = self._pending_hva, []
            seq = self.queued_seq
        if not pending and not hvas:
            self.applied_seq = seq
            return
        with self.vm_locked():
            for lo, hi in hvas:
                # Dropped, not rescanned: the next access builds the map again from the host
                # mappings as they are then (a range still being unmapped counts as gone).
                for key, sm in list(self.slots.items()):
                    a = sm.slot.userspace_addr
                    if a and a < hi and lo < a + sm.slot.size:
                        self._drop(key)
                        self.flush_needed = True
            for lo, hi in pending:
                for key, sm in list(self.slots.items()):
                    s = sm.slot
                    if s.gpa >= hi or s.gpa + s.size <= lo:
                        continue
                    if self.vm.memslots.get(key) is not s:
                        self._drop(key)
                        self.flush_needed = True
                        continue
                    if sm.update((lo - s.gpa) >> PAGE_SHIFT,
                                 (hi - s.gpa + PAGE_SIZE - 1) >> PAGE_SHIFT):
                        self.flush_needed = True
        self.applied_seq = seq

    def check_direct(self) -> None:
        """Before running: a directly mapped slot whose host memory was unmapped behind KVM's
        back is re-resolved (its vanished pages then trap) instead of crashing the process."""
        for sm in self.slots.values():
            if sm.direct and not sm.host_still_mapped():
                with self.vm_locked():
                    sm.rescan()
                self.flush_needed = True

    def _drop(self, key: int) -> None:
        sm = self.slots.pop(key)
        sm.close()
        self.generation += 1

    # --- lookups (engine thread) ------------------------------------------------------------
    def ensure(self, gpa: int) -> SlotMap | None:
        """The built SlotMap for ``gpa``'s memslot (building it now), or None (no memslot)."""
        with self.vm_locked():
            slot = self.vm.find_memslot(gpa)
            if slot is None:
                return None
            sm = self.slots.get(slot.key)
            if sm is not None and sm.slot is slot:
                return sm
            if sm is not None:
                self._drop(slot.key)
            # Stale maps of deleted/moved slots overlapping this one go first.
            for key, other in list(self.slots.items()):
                o = other.slot
                if o.gpa < slot.gpa + slot.size and slot.gpa < o.gpa + o.size:
                    self._drop(key)
            sm = SlotMap(self.uc, self.vm, slot)
            self.slots[slot.key] = sm
            self.generation += 1
            self.flush_needed = True
            return sm

    def classify(self, gpa: int) -> PhysFault | None:
        """None if ``gpa`` is (now) mapped in the engine, else what the access becomes."""
        sm = self.ensure(gpa)
        if sm is None:
            # kvm_handle_noslot_fault(): a private fault without a memslot exits to userspace
            # (KVM_MEMORY_EXIT_FLAG_PRIVATE) instead of taking the emulated-MMIO path.
            if self.vm.is_private(gpa):
                return PhysFault("fault", gpa & ~(PAGE_SIZE - 1), int(MemoryExitFlag.PRIVATE))
            return PhysFault("mmio", gpa)
        flags = sm.trap_flags(gpa)
        if flags is None:
            return None
        return PhysFault("fault", gpa & ~(PAGE_SIZE - 1), flags)

    def read(self, gpa: int, size: int) -> bytes:
        """Read guest-physical memory as the CPU would (for page walks and event delivery)."""
        f = self.classify(gpa) or (self.classify(gpa + size - 1) if size > 1 else None)
        if f is not None:
            raise f
        return bytes(self.uc.mem_read(gpa, size))

    def write(self, gpa: int, data: bytes) -> None:
        f = self.classify(gpa) or (self.classify(gpa + len(data) - 1) if len(data) > 1 else None)
        if f is not None:
            raise f
        sm = self.ensure(gpa)
        if sm is not None and sm.perms != 7:
            raise PhysFault("mmio", gpa)       # a write to a read-only slot is MMIO in KVM
        self.uc.mem_write(gpa, data)

    @contextlib.contextmanager
    def hole(self, page: int) -> Iterator[None]:
        """Temporarily take ``page`` out of the engine (to retire one instruction against a
        scratch page, e.g. a write to a read-only slot that KVM reports as MMIO)."""
        split: list[tuple[tuple[int, int, int], list[tuple[int, int, int]], int]] = []
        for sm in self.slots.values():
            for r in sm.regions:
                if r[0] <= page < r[0] + r[1]:
                    parts = [p for p in ((r[0], page - r[0], r[2]),
                                         (page + PAGE_SIZE, r[0] + r[1] - page - PAGE_SIZE,
                                          r[2] + page + PAGE_SIZE - r[0])) if p[1] > 0]
                    self.uc.mem_unmap(r[0], r[1])
                    for p in parts:
                        self.uc.mem_map_ptr(p[0], p[1], sm.perms, p[2])
                    split.append((r, parts, sm.perms))
        try:
            yield
        finally:
            for r, parts, perms in split:
                for p in parts:
                    self.uc.mem_unmap(p[0], p[1])
                self.uc.mem_map_ptr(r[0], r[1], perms, r[2])
            self.flush_needed = True

    def close(self) -> None:
        for key in list(self.slots):
            self._drop(key)
