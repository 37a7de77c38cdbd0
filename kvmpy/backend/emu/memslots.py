"""Memslots: KVM_SET_USER_MEMORY_REGION{,2} with kvm_set_memory_region()'s validation.

api.rst 4.35 KVM_SET_USER_MEMORY_REGION and 4.140 KVM_SET_USER_MEMORY_REGION2; the order of the
checks (and so which errno wins when several apply) follows virt/kvm/kvm_main.c:
check_memory_region_flags(), the general sanity checks, delete, modify-vs-create, GPA overlap
(EEXIST), kvm_gmem_bind() and finally the arch check of the highest gfn.
"""

from __future__ import annotations

import bisect
import dataclasses
import errno
import os
from collections.abc import ItemsView, ValuesView
from typing import TYPE_CHECKING, Protocol

from ...uapi import PAGE_SIZE, Cap, MemFlag, VmType

if TYPE_CHECKING:
    from .gmem import EmuGmem
    from .profiles import Profile

KVM_MEM_SLOTS_NUM = 32767
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1
TASK_SIZE_MAX = (1 << 47) - PAGE_SIZE       # x86-64, 4-level paging: access_ok() limit
# Plain ints: ~ on an IntFlag inverts only within the flag's own bits.
LOG_DIRTY = int(MemFlag.LOG_DIRTY_PAGES)
READONLY = int(MemFlag.READONLY)
GUEST_MEMFD = int(MemFlag.GUEST_MEMFD)
CAP_READONLY_MEM = int(Cap.READONLY_MEM)
V1_FLAGS = LOG_DIRTY | READONLY


@dataclasses.dataclass(frozen=True)
class EmuMemslot:
    """One installed memslot (address space ``as_id``; ``slot`` is the id within it)."""

    slot: int
    as_id: int
    flags: int
    gpa: int
    size: int
    userspace_addr: int
    gmem: EmuGmem | None
    gmem_offset: int

    @property
    def end(self) -> int:
        return self.gpa + self.size

    @property
    def key(self) -> int:
        return self.as_id << 16 | self.slot

    def __repr__(self) -> str:
        g = f", gmem fd {self.gmem.fd} +{self.gmem_offset:#x}" if self.gmem else ""
        return (f"EmuMemslot({self.as_id}:{self.slot}, flags {self.flags:#x}, gpa "
                f"{self.gpa:#x}+{self.size:#x}, hva {self.userspace_addr:#x}{g})")


@dataclasses.dataclass(frozen=True)
class RegionArgs:
    """kvm_userspace_memory_region2 as copied from the caller (v1: the tail is zero)."""

    slot: int
    flags: int
    gpa: int
    size: int
    userspace_addr: int
    gmem_offset: int = 0
    gmem_fd: int = 0


class MemslotTable:
    """A VM's installed memslots by key (as_id << 16 | id), plus each address space's slots
    sorted by gpa (virt/kvm/kvm_main.c keeps one kvm_memslots per address space: overlap is
    checked within one). ``find`` serves address space 0, the one a vCPU outside SMM uses
    (kvm_arch_vcpu_memslots_id()); in SMM the vCPU maps the address-space-1 slots afresh for
    every slice (x86/smm.py). Owned by the VM (vm.py ``EmuVm.memslots``); changed under the
    VM's lock."""

    def __init__(self) -> None:
        self._by_key: dict[int, EmuMemslot] = {}
        # Per address space: slots sorted by gpa and their start gpas.
        self._sorted: dict[int, tuple[list[EmuMemslot], list[int]]] = {0: ([], [])}
        self._slots0, self._starts0 = self._sorted[0]

    def get(self, key: int) -> EmuMemslot | None:
        return self._by_key.get(key)

    def values(self) -> ValuesView[EmuMemslot]:
        return self._by_key.values()

    def items(self) -> ItemsView[int, EmuMemslot]:
        return self._by_key.items()

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def __len__(self) -> int:
        return len(self._by_key)

    def find(self, gpa: int) -> EmuMemslot | None:
        """The address-space-0 memslot containing ``gpa``."""
        i = bisect.bisect_right(self._starts0, gpa) - 1
        if i >= 0:
            s = self._slots0[i]
            if gpa < s.gpa + s.size:
                return s
        return None

    def add(self, s: EmuMemslot) -> None:
        self._by_key[s.key] = s
        slots, starts = self._sorted.setdefault(s.as_id, ([], []))
        i = bisect.bisect_right(starts, s.gpa)
        starts.insert(i, s.gpa)
        slots.insert(i, s)

    def remove(self, s: EmuMemslot) -> None:
        del self._by_key[s.key]
        if s.gmem is not None:
            s.gmem.bindings.pop(s.key, None)
        slots, starts = self._sorted[s.as_id]
        i = bisect.bisect_left(starts, s.gpa)
        while slots[i] is not s:
            i += 1
        del slots[i]
        del starts[i]

    def overlapping(self, as_id: int, sid: int, lo: int, hi: int) -> EmuMemslot | None:
        """kvm_check_memslot_overlap(): a slot of address space ``as_id`` other than ``sid``
        intersecting [lo, hi)."""
        slots, starts = self._sorted.get(as_id, ([], []))
        # Slots are disjoint and sorted, so their ends are sorted too: walk down from the last
        # slot starting below hi while slots still end above lo.
        i = bisect.bisect_left(starts, hi) - 1
        while i >= 0 and slots[i].gpa + slots[i].size > lo:
            if slots[i].slot != sid:
                return slots[i]
            i -= 1
        return None


class MemslotVm(Protocol):
    """What kvm_set_memory_region() needs of the VM (vm.py EmuVm)."""

    @property
    def type(self) -> int: ...
    @property
    def profile(self) -> Profile: ...
    @property
    def nr_address_spaces(self) -> int: ...
    @property
    def memslots(self) -> MemslotTable: ...
    def invalidate(self, gpa_lo: int, gpa_hi: int) -> None: ...
    def backend_gmem(self, fd: int) -> EmuGmem | None: ...


def _einval(why: str) -> OSError:
    return OSError(errno.EINVAL, why)


def check_flags(vm: MemslotVm, r: RegionArgs) -> None:
    """check_memory_region_flags()."""
    valid = LOG_DIRTY
    if vm.profile.gmem_slot_vm_types & (1 << vm.type):
        valid |= GUEST_MEMFD
    # Dirty logging of private memory is not supported.
    if r.flags & GUEST_MEMFD:
        valid &= ~LOG_DIRTY
    # GUEST_MEMFD is incompatible with read-only slots (writes to them are MMIO).
    if vm.profile.cap(CAP_READONLY_MEM, vm.type) and not r.flags & GUEST_MEMFD:
        valid |= READONLY
    if r.flags & ~valid:
        raise _einval(f"memslot flags {r.flags:#x} not in {valid:#x} for this VM type")


def set_memory_region(vm: MemslotVm, r: RegionArgs, v2: bool) -> None:
    """kvm_vm_ioctl_set_memory_region(): validate, then create/delete/move/flags-change.

    Caller holds vm.lock. Raises OSError with the kernel's errno.
    """
    if not v2 and r.flags & ~V1_FLAGS:
        raise _einval("KVM_SET_USER_MEMORY_REGION: only LOG_DIRTY_PAGES|READONLY")
    if r.slot & 0xFFFF >= vm.profile.nr_memslots():
        raise _einval(f"slot id {r.slot & 0xFFFF} >= KVM_USER_MEM_SLOTS")
    check_flags(vm, r)
    as_id, sid = r.slot >> 16, r.slot & 0xFFFF
    if r.size % PAGE_SIZE:
        raise _einval("memory_size not page aligned")
    if r.gpa % PAGE_SIZE:
        raise _einval("guest_phys_addr not page aligned")
    if r.userspace_addr % PAGE_SIZE or r.userspace_addr + r.size > TASK_SIZE_MAX:
        raise _einval("userspace_addr not page aligned or not a user address")
    if r.flags & GUEST_MEMFD and (r.gmem_offset % PAGE_SIZE or
                                          r.gmem_offset + r.size >= 1 << 64):
        raise _einval("guest_memfd_offset not page aligned or wraps")
    if as_id >= vm.nr_address_spaces or sid >= KVM_MEM_SLOTS_NUM:
        raise _einval(f"address space {as_id} / slot {sid} out of range")
    if r.gpa + r.size >= 1 << 64:
        raise _einval("guest_phys_addr + memory_size wraps")
    if r.size // PAGE_SIZE > KVM_MEM_MAX_NR_PAGES:
        raise _einval("memslot larger than KVM_MEM_MAX_NR_PAGES")

    key = as_id << 16 | sid
    old = vm.memslots.get(key)
    if r.size == 0:
        if old is None:
            raise _einval(f"deleting slot {sid}, which does not exist")
        vm.memslots.remove(old)
        if as_id == 0:
            vm.invalidate(old.gpa, old.end)
        return

    if old is not None:
        # Private memslots are immutable: they can only be deleted.
        if r.flags & GUEST_MEMFD:
            raise _einval("a guest_memfd memslot cannot be modified, only deleted")
        if (r.userspace_addr != old.userspace_addr or r.size != old.size
                or (r.flags ^ old.flags) & (READONLY | GUEST_MEMFD)):
            raise _einval("modifying a memslot may change only its GPA or dirty logging")
        if r.gpa != old.gpa:
            change = "move"
        elif r.flags != old.flags:
            change = "flags"
        else:
            return
    else:
        change = "create"

    if change in ("create", "move"):
        s = vm.memslots.overlapping(as_id, sid, r.gpa, r.gpa + r.size)
        if s is not None:
            raise OSError(errno.EEXIST, f"GPA range overlaps slot {s.slot}")

    gmem: EmuGmem | None = None
    if r.flags & GUEST_MEMFD:
        gmem = bind_check(vm, r)

    # kvm_arch_prepare_memory_region(): the last gfn must be mappable.
    if change in ("create", "move") and r.gpa + r.size > 1 << vm.profile.max_gpa_bits:
        raise _einval(f"memslot ends above the MMU's {vm.profile.max_gpa_bits}-bit GPA limit")

    new = EmuMemslot(sid, as_id, r.flags, r.gpa, r.size, r.userspace_addr, gmem,
                     r.gmem_offset if gmem else 0)
    if old is not None:
        vm.memslots.remove(old)
    vm.memslots.add(new)
    if gmem is not None:
        gmem.bindings[new.key] = new
    if as_id != 0:
        return          # SMM maps address space 1 per slice, under the VM lock: no zap needed
    if old is not None and change == "move":
        vm.invalidate(old.gpa, old.end)
    vm.invalidate(new.gpa, new.end)


def bind_check(vm: MemslotVm, r: RegionArgs) -> EmuGmem:
    """kvm_gmem_bind(): EBADF for no file, EINVAL for a foreign file / another VM's guest_memfd /
    an offset range outside the file, the profile's errno for an overlapping binding."""
    fd = r.gmem_fd & 0xFFFF_FFFF
    gmem = vm.backend_gmem(fd)
    if gmem is None:
        try:
            if fd >= 1 << 31:
                raise OSError(errno.EBADF, "no such fd")
            os.fstat(fd)
        except OSError:
            raise OSError(errno.EBADF, f"guest_memfd {fd} is not an open file") from None
        raise _einval(f"fd {fd} is not a guest_memfd")
    owner: object = gmem.vm
    if owner is not vm:
        raise _einval(f"guest_memfd {fd} belongs to another VM")
    if r.gmem_offset >= 1 << 63 or r.gmem_offset + r.size > gmem.size:
        raise _einval("guest_memfd_offset + memory_size beyond the guest_memfd's size")
    if gmem.overlaps(r.gmem_offset, r.size):
        raise OSError(vm.profile.gmem_overlap_errno,
                      "guest_memfd range overlaps an existing binding")
    return gmem


def is_private_vm(vm_type: int) -> bool:
    """kvm_arch_has_private_mem(): SW_PROTECTED (SEV/TDX are not modelled)."""
    return vm_type == VmType.SW_PROTECTED
