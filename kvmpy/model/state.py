"""A pure-Python reference model of guest_memfd, memslot bindings, memory attributes and what a
guest access observes. No KVM, no syscalls: it answers "what must the kernel do" for the
model-based tests (kvmpy.model.harness drives a real or emulated backend next to it).

Every rule cites the document it models (Documentation/virt/kvm/api.rst unless named):

* guest_memfd files: 4.141 KVM_CREATE_GUEST_MEMFD (size page aligned and > 0, flags within
  KVM_CAP_GUEST_MEMFD_FLAGS; fallocate() allocates, PUNCH_HOLE frees and the range reads back
  zeroed; no read/write); virt/kvm/guest_memfd.c kvm_gmem_fallocate() for the errnos
  (KEEP_SIZE required, page-aligned ranges, allocation inside i_size, a hole past i_size is a
  no-op).
* memslots: 4.35 KVM_SET_USER_MEMORY_REGION / KVM_SET_USER_MEMORY_REGION2 ("memory_size 0
  deletes", overlapping GPA ranges are EEXIST, a guest_memfd memslot is immutable and can only
  be deleted, guest_memfd_offset + memory_size must lie inside the file, two slots may not bind
  the same guest_memfd range: the errno changed across kernels, see
  kvmpy.testing.errnos.Behaviour.GMEM_BIND_OVERLAP).
* attributes: 4.141 KVM_SET_MEMORY_ATTRIBUTES (page-aligned non-empty ranges, only bits in
  KVM_CAP_MEMORY_ATTRIBUTES, flags 0; attributes are per gfn and independent of memslots).
* guest accesses: 5. "KVM_EXIT_MMIO" (no memslot: an MMIO exit, a read completes with the data
  userspace puts in kvm_run), 5. "KVM_EXIT_MEMORY_FAULT" (a private gfn KVM cannot back: -1/EFAULT,
  flags KVM_MEMORY_EXIT_FLAG_PRIVATE, the faulting page's gpa, size 4096), KVM_SET_MEMORY_ATTRIBUTES
  (a private gfn is served from the slot's guest_memfd, a shared one from userspace_addr) and
  4.141 GUEST_MEMFD_FLAG_MMAP (6.18: a slot whose guest_memfd has MMAP is "guest_memfd only":
  shared gfns are served from the guest_memfd too, kvm_memslot_is_gmem_only()).
* closing a guest_memfd (kvm_gmem_release()): its bindings are dropped; the slots stay, shared
  gfns still resolve through userspace_addr, private gfns fault.

Memory is modelled at qword granularity: a sparse map offset -> value, absent = 0.
"""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Iterable

PAGE = 4096
MASK64 = (1 << 64) - 1

# uapi numbers (kept local: the model does not import the ioctl layer).
GMEM_FLAG_MMAP = 1 << 0
GMEM_FLAG_INIT_SHARED = 1 << 1
ATTR_PRIVATE = 1 << 3
MEM_EXIT_FLAG_PRIVATE = 1 << 3
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

#: An expected result: the set of acceptable errnos (0 = success).
Expect = frozenset[int]
OK: Expect = frozenset({0})


def err(*codes: int) -> Expect:
    return frozenset(codes)


@dataclasses.dataclass(frozen=True)
class Config:
    """What the kernel under test offers, probed on the VM (never a kernel version)."""

    #: KVM_CAP_GUEST_MEMFD on the VM: KVM_CREATE_GUEST_MEMFD and KVM_MEM_GUEST_MEMFD slots.
    guest_memfd: bool
    #: KVM_CAP_GUEST_MEMFD_FLAGS on the VM.
    gmem_flags: int
    #: KVM_CAP_MEMORY_ATTRIBUTES on the VM (0: the ioctl is not usable).
    attributes: int
    #: errnos a kernel may give for binding an already-bound guest_memfd range.
    bind_overlap_errnos: frozenset[int] = frozenset({errno.EEXIST, errno.EINVAL})
    #: 6.18 "guest_memfd only" slots: GUEST_MEMFD_FLAG_MMAP files serve shared gfns.
    gmem_only_mmap: bool = True
    #: Model the known KVM issue "stale MMIO SPTE" (kvmpy.testing.known_issues, docs/findings.md)
    #: instead of the documented behaviour: only for real KVM; the emulator is documented.
    stale_mmio_spte: bool = False
    #: Deleting a memslot zaps every SPTE (kvm_arch_flush_shadow_memslot(): only a
    #: KVM_X86_DEFAULT_VM with KVM_X86_QUIRK_SLOT_ZAP_ALL); other VM types unmap the slot's range.
    zap_all_on_delete: bool = True


@dataclasses.dataclass
class Gmem:
    """A guest_memfd file: size, flags, contents (qword offset -> value), open or closed."""

    gid: int
    size: int
    flags: int
    data: dict[int, int] = dataclasses.field(default_factory=dict)
    open: bool = True

    def read(self, off: int) -> int:
        return self.data.get(off, 0)

    def punch(self, off: int, length: int) -> None:
        end = min(off + length, self.size)
        for k in [k for k in self.data if off <= k < end]:
            del self.data[k]


@dataclasses.dataclass
class Backing:
    """Host memory behind a slot's userspace_addr (a memfd here): qword offset -> value."""

    data: dict[int, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Slot:
    """An installed memslot. ``hva`` is "backing" (its own host memory) or "gmem" (the
    guest_memfd's own mapping at gmem_offset, which needs GUEST_MEMFD_FLAG_MMAP)."""

    slot: int
    gpa: int
    size: int
    hva: str
    gmem: int | None = None            # gmem id, None for a plain slot
    gmem_offset: int = 0
    backing: Backing | None = None
    bound: bool = False                # still bound (the file was not closed)

    @property
    def end(self) -> int:
        return self.gpa + self.size


@dataclasses.dataclass(frozen=True)
class Mem:
    """A guest access served from memory; ``value`` is what a read returns."""

    value: int
    source: str   # "shared", "gmem"


@dataclasses.dataclass(frozen=True)
class Mmio:
    """KVM_EXIT_MMIO at ``gpa`` (len 8)."""

    gpa: int
    is_write: bool


@dataclasses.dataclass(frozen=True)
class Fault:
    """KVM_EXIT_MEMORY_FAULT: flags, gpa (the page), size."""

    flags: int
    gpa: int
    size: int = PAGE


Outcome = Mem | Mmio | Fault


class Model:
    """The documented state of one VM's memory. Methods return the expected errno set of an
    operation and apply it when success is the only expectation (a caller that sees success
    where the model allowed failure calls :meth:`apply_*` explicitly)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.gmems: dict[int, Gmem] = {}
        self.slots: dict[int, Slot] = {}
        self.private: set[int] = set()        # gfns with KVM_MEMORY_ATTRIBUTE_PRIVATE
        self._next_gid = 0
        # Known issue "stale MMIO SPTE" (Config.stale_mmio_spte; docs/findings.md): gfn -> the
        # memslot generation of the MMIO SPTE an access without memslot installed
        # (kvm_handle_noslot_fault -> make_mmio_spte), and the generation, bumped by every
        # memslot change (kvm_swap_active_memslots).
        self.mmio_sptes: dict[int, int] = {}
        self.memslot_gen = 0

    # --- SPTE lifetime, for the known issue ---------------------------------------------------
    def _zap_slot_gfns(self, lo: int, hi: int) -> None:
        """kvm_unmap_gfn_range() over memslots only: drop cached MMIO SPTEs for gfns in
        [lo, hi) that lie inside a memslot (kvm_handle_gfn_range() skips the rest)."""
        for gfn in [g for g in self.mmio_sptes if lo <= g < hi]:
            if self.slot_at(gfn * PAGE) is not None:
                del self.mmio_sptes[gfn]

    def _zap_gmem_range(self, gid: int, off: int, end: int) -> None:
        """kvm_gmem_invalidate_begin(): unmap the gfns bound to [off, end) of ``gid``."""
        for s in self.slots.values():
            if s.gmem == gid and s.bound:
                lo = max(off, s.gmem_offset)
                hi = min(end, s.gmem_offset + s.size)
                if lo < hi:
                    base = (s.gpa - s.gmem_offset) // PAGE
                    self._zap_slot_gfns(base + lo // PAGE, base + -(-hi // PAGE))

    # --- guest_memfd files (api.rst 4.141) ------------------------------------------------
    def create_gmem(self, size: int, flags: int) -> tuple[Expect, int | None]:
        """KVM_CREATE_GUEST_MEMFD: EINVAL for flags outside KVM_CAP_GUEST_MEMFD_FLAGS or a size
        that is 0 or not page aligned. Returns (expected errnos, new id on success)."""
        if not self.config.guest_memfd:
            return err(errno.ENOTTY, errno.EINVAL), None
        if flags & ~self.config.gmem_flags or size <= 0 or size % PAGE:
            return err(errno.EINVAL), None
        g = Gmem(self._next_gid, size, flags)
        self._next_gid += 1
        self.gmems[g.gid] = g
        return OK, g.gid

    def close_gmem(self, gid: int) -> None:
        """close(): the last reference drops the bindings (kvm_gmem_release())."""
        g = self.gmems[gid]
        self._zap_gmem_range(gid, 0, g.size)
        g.open = False
        for s in self.slots.values():
            if s.gmem == gid:
                s.bound = False

    def fallocate(self, gid: int, mode: int, off: int, length: int) -> Expect:
        """fallocate(2) on a guest_memfd (kvm_gmem_fallocate()): KEEP_SIZE required
        (EOPNOTSUPP), page-aligned offset and length (EINVAL), allocation inside i_size
        (EINVAL); PUNCH_HOLE frees the range, which reads back zeroed (api.rst 4.141), and a
        hole past i_size is a no-op."""
        g = self.gmems[gid]
        if off < 0 or length <= 0:
            return err(errno.EINVAL)
        if not mode & FALLOC_FL_KEEP_SIZE or mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE):
            return err(errno.EOPNOTSUPP)
        if off % PAGE or length % PAGE:
            return err(errno.EINVAL)
        if mode & FALLOC_FL_PUNCH_HOLE:
            self._zap_gmem_range(gid, off, off + length)
            g.punch(off, length)
            return OK
        if off + length > g.size:
            return err(errno.EINVAL)
        return OK    # allocation keeps contents

    # --- memslots (api.rst 4.35) ----------------------------------------------------------
    def set_slot(self, slot: int, gpa: int, size: int, hva: str, gid: int | None,
                 gmem_offset: int) -> Expect:
        """KVM_SET_USER_MEMORY_REGION2 creating (or re-setting) ``slot``; size 0 deletes.

        Order of the checks (kvm_set_memory_region(), kvm_gmem_bind()): alignment (EINVAL);
        delete; an existing guest_memfd slot, or any change but GPA/dirty-log of an existing
        slot (EINVAL); overlapping GPA ranges (EEXIST); the binding: offset + size inside the
        file (EINVAL), a range already bound by another slot (version-dependent errno).
        """
        if size % PAGE or gpa % PAGE or (gid is not None and gmem_offset % PAGE):
            return err(errno.EINVAL)
        if size == 0:
            return self.delete_slot(slot)
        if gid is not None and not self.config.guest_memfd:
            return err(errno.EINVAL)
        old = self.slots.get(slot)
        if old is not None:
            # Re-setting an identical slot would be a no-op for a plain slot, but any
            # KVM_MEM_GUEST_MEMFD request on an existing slot is EINVAL (immutable), and
            # changing size/userspace_addr is EINVAL. The harness never re-sets identically.
            return err(errno.EINVAL)
        for s in self.slots.values():
            if s.gpa < gpa + size and gpa < s.end:
                return err(errno.EEXIST)
        if gid is not None:
            g = self.gmems[gid]
            if gmem_offset + size > g.size:
                return err(errno.EINVAL)
            for s in self.slots.values():
                if s.gmem == gid and s.bound and s.gmem_offset < gmem_offset + size \
                        and gmem_offset < s.gmem_offset + s.size:
                    return self.config.bind_overlap_errnos
        self.slots[slot] = Slot(slot, gpa, size, hva, gid, gmem_offset if gid is not None else 0,
                                Backing() if hva == "backing" else None, gid is not None)
        # KVM_MR_CREATE zaps nothing; the new generation makes older MMIO SPTEs stale.
        self.memslot_gen += 1
        return OK

    def delete_slot(self, slot: int) -> Expect:
        """memory_size 0 deletes; deleting a slot that does not exist is EINVAL."""
        if slot not in self.slots:
            return err(errno.EINVAL)
        del self.slots[slot]
        if self.config.zap_all_on_delete:  # kvm_mmu_zap_all_fast()
            self.mmio_sptes.clear()
        # Otherwise kvm_unmap_gfn_range() of the slot's gfns, whose tdp_mmu_zap_leafs() skips
        # MMIO SPTEs (not shadow-present): cached ones outlive the deletion, stale by generation.
        self.memslot_gen += 1
        return OK

    def slot_at(self, gpa: int) -> Slot | None:
        for s in self.slots.values():
            if s.gpa <= gpa < s.end:
                return s
        return None

    # --- attributes (api.rst 4.141 KVM_SET_MEMORY_ATTRIBUTES) ------------------------------
    def set_attributes(self, gpa: int, size: int, attributes: int, flags: int = 0) -> Expect:
        """ENOTTY where the ioctl is absent; EINVAL for flags, unsupported bits, a zero or
        unaligned range. Attributes are per gfn, with or without memslots."""
        if not self.config.attributes:
            return err(errno.ENOTTY, errno.EINVAL)
        if flags or attributes & ~self.config.attributes or size == 0 \
                or gpa % PAGE or size % PAGE or gpa + size > MASK64:
            return err(errno.EINVAL)
        gfns = range(gpa // PAGE, (gpa + size) // PAGE)
        want_private = bool(attributes & ATTR_PRIVATE)
        # kvm_vm_set_mem_attributes(): nothing (no zap) if the range already has them.
        if any((g in self.private) != want_private for g in gfns):
            self._zap_slot_gfns(gfns.start, gfns.stop)
        if attributes & ATTR_PRIVATE:
            self.private.update(gfns)
        else:
            self.private.difference_update(gfns)
        return OK

    def is_private(self, gpa: int) -> bool:
        return gpa // PAGE in self.private

    # --- what an access observes ----------------------------------------------------------
    def _gmem_only(self, s: Slot) -> bool:
        if not (self.config.gmem_only_mmap and s.bound and s.gmem is not None):
            return False
        return bool(self.gmems[s.gmem].flags & GMEM_FLAG_MMAP)

    def _shared_store(self, s: Slot) -> tuple[dict[int, int], int] | None:
        """Where a shared access to slot ``s`` lands: (qword map, base offset), or None if the
        slot's userspace_addr maps nothing (a closed guest_memfd's mapping)."""
        if self._gmem_only(s) or s.hva == "gmem":
            assert s.gmem is not None
            g = self.gmems[s.gmem]
            if s.hva == "gmem" and not g.open and not self._gmem_only(s):
                # kvmpy unmaps a guest_memfd's mappings when it closes it: never exercised.
                return None
            return g.data, s.gmem_offset
        assert s.backing is not None
        return s.backing.data, 0

    def resolve(self, gpa: int, is_write: bool) -> tuple[Outcome, dict[int, int] | None, int]:
        """The outcome of a guest qword access at ``gpa`` and, when it is served from memory,
        the store and the key the qword lives at."""
        gen = self.mmio_sptes.get(gpa // PAGE) if self.config.stale_mmio_spte else None
        if gen is not None:
            # Known issue (docs/findings.md): the access hits the cached MMIO SPTE, a
            # reserved-bit fault, for which kvm_mmu_page_fault() never sets
            # PFERR_PRIVATE_ACCESS. Same generation: handle_mmio_page_fault() emulates MMIO.
            if gen == self.memslot_gen:
                return Mmio(gpa, is_write), None, 0
            # Stale generation: the slow path sees a shared access to a private gfn,
            # kvm_mmu_faultin_pfn() -> KVM_EXIT_MEMORY_FAULT without the PRIVATE flag.
            if self.is_private(gpa):
                return Fault(0, gpa & ~(PAGE - 1)), None, 0
        s = self.slot_at(gpa)
        if s is None:
            # kvm_handle_noslot_fault() (arch/x86/kvm/mmu/mmu.c, 6.10+): a private fault with
            # no memslot exits with KVM_EXIT_MEMORY_FAULT (PRIVATE), not emulated MMIO.
            if self.is_private(gpa):
                return Fault(MEM_EXIT_FLAG_PRIVATE, gpa & ~(PAGE - 1)), None, 0
            return Mmio(gpa, is_write), None, 0
        off = gpa - s.gpa
        if self.is_private(gpa):
            if s.gmem is None or not s.bound:
                return Fault(MEM_EXIT_FLAG_PRIVATE, gpa & ~(PAGE - 1)), None, 0
            g = self.gmems[s.gmem]
            key = s.gmem_offset + off
            return Mem(g.read(key), "gmem"), g.data, key
        where = self._shared_store(s)
        if where is None:
            return Fault(0, gpa & ~(PAGE - 1)), None, 0
        store, base = where
        src = "gmem" if self._gmem_only(s) else "shared"
        return Mem(store.get(base + off, 0), src), store, base + off

    def _accessed(self, gpa: int, out: Outcome) -> None:
        """An MMIO exit leaves an MMIO SPTE behind; a mapped access replaces any SPTE."""
        if isinstance(out, Mmio):
            self.mmio_sptes[gpa // PAGE] = self.memslot_gen
        elif isinstance(out, Mem):
            self.mmio_sptes.pop(gpa // PAGE, None)

    def guest_read(self, gpa: int) -> Outcome:
        out = self.resolve(gpa, False)[0]
        self._accessed(gpa, out)
        return out

    def guest_write(self, gpa: int, value: int) -> Outcome:
        out, store, key = self.resolve(gpa, True)
        self._accessed(gpa, out)
        if isinstance(out, Mem):
            assert store is not None
            store[key] = value & MASK64
            return Mem(value & MASK64, out.source)
        return out

    # --- host views -----------------------------------------------------------------------
    def host_write_backing(self, slot: int, off: int, value: int) -> None:
        b = self.slots[slot].backing
        assert b is not None
        b.data[off] = value & MASK64

    def host_read_backing(self, slot: int, off: int) -> int:
        b = self.slots[slot].backing
        assert b is not None
        return b.data.get(off, 0)

    def host_write_gmem(self, gid: int, off: int, value: int) -> None:
        """A write through the guest_memfd's own mapping (GUEST_MEMFD_FLAG_MMAP|INIT_SHARED)."""
        self.gmems[gid].data[off] = value & MASK64

    def host_read_gmem(self, gid: int, off: int) -> int:
        return self.gmems[gid].read(off)

    def bound_slots(self, gid: int) -> Iterable[Slot]:
        return [s for s in self.slots.values() if s.gmem == gid and s.bound]


__all__ = ["OK", "Backing", "Config", "Expect", "Fault", "Gmem", "Mem", "Mmio", "Model",
           "Outcome", "Slot", "err"]
