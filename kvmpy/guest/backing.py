"""Test memory for guests: memslots of the backing types the kernel selftests use.

Backings (the selftests' vm_mem_backing_src_type):
  "shmem"      a memfd mapped MAP_SHARED (kvmpy.memory.SharedMemory) - the default, and the one
               the emulated KVM can alias into a guest;
  "anonymous"  private anonymous memory;
  "thp"        private anonymous memory, 2 MiB aligned, madvise(MADV_HUGEPAGE);
  "hugetlb"    a memfd with MFD_HUGETLB (needs free hugetlb pages on the host), mapped in whole
               huge pages (the size rounded up; the memslot uses the size asked for);
  "hugetlb_2m" the same with 2 MiB pages asked for explicitly (MFD_HUGE_2MB), whole 2 MiB pages;
  "none"       no host backing (a guest_memfd-only slot; userspace_addr from ``shared``).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from ..backend import MAP_ANONYMOUS, MAP_NORESERVE, MAP_PRIVATE, PROT_READ, PROT_WRITE, Backend
from ..gmem import GuestMemfd
from ..memory import MappedMemory, Mapping, SharedMemory, anonymous
from .x86 import PAGE_2M

BACKINGS = ("shmem", "anonymous", "thp", "hugetlb", "hugetlb_2m", "none")
MADV_HUGEPAGE = 14


class BackingUnavailable(RuntimeError):
    """The host cannot provide a backing type (tests skip with this message)."""


def _meminfo(key: str) -> int:
    text = Path("/proc/meminfo").read_text()
    m = re.search(rf"^{key}:\s+(\d+)", text, re.M)
    return int(m.group(1)) if m else 0


def hugetlb_page_size() -> int:
    """The default hugetlb page size (/proc/meminfo Hugepagesize; 2 MiB on x86 if absent)."""
    return (_meminfo("Hugepagesize") * 1024) or PAGE_2M


def hugetlb_size(size: int, page: int | None = None) -> int:
    """``size`` rounded up to whole huge pages: a MFD_HUGETLB file can only be truncated and
    mapped in multiples of its page size (mm/hugetlb.c hugetlb_get_unmapped_area /
    hugetlbfs_file_mmap: EINVAL for a length that is not huge-page aligned)."""
    if size <= 0:
        raise ValueError(f"hugetlb backing size {size:#x} must be positive")
    page = hugetlb_page_size() if page is None else page
    return -(-size // page) * page


def hugetlb_available(size: int) -> tuple[bool, str]:
    free = _meminfo("HugePages_Free")
    page_kb = _meminfo("Hugepagesize")
    size = hugetlb_size(size, page_kb * 1024 or PAGE_2M)
    if free * page_kb * 1024 < size:
        return False, (f"hugetlb backing of {size:#x} bytes needs free hugetlb pages: "
                       f"HugePages_Free={free} ({page_kb} kB pages) on this host")
    return True, ""


def hugetlb_2m_available(size: int) -> tuple[bool, str]:
    p = Path("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
    try:
        free = int(p.read_text())
    except OSError:
        return False, f"2 MiB hugetlb backing: {p} is absent"
    if free * (2 << 20) < size:
        return False, (f"2 MiB hugetlb backing of {size:#x} bytes needs free 2 MiB hugetlb "
                       f"pages: {p} = {free}")
    return True, ""


def thp_available() -> tuple[bool, str]:
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        return False, "THP backing: /sys/kernel/mm/transparent_hugepage/enabled is absent"
    if "[never]" in mode:
        return False, f"THP backing: transparent_hugepage/enabled is {mode!r}"
    return True, ""


class Backing(MappedMemory):
    """Host memory behind a memslot: ``addr``/``size`` and ``mapping`` for access."""

    def __init__(self, kind: str, mapping: Mapping, shared: SharedMemory | None = None) -> None:
        self.kind = kind
        self.mapping = mapping
        self._shared = shared

    def close(self) -> None:
        if self._shared is not None:
            self._shared.close()
        else:
            self.mapping.close()


def make_backing(backend: Backend, kind: str, size: int, name: str = "kvmpy-test-mem") -> Backing:
    """Allocate ``size`` bytes of host memory of backing type ``kind``."""
    if kind == "shmem":
        sm = SharedMemory(backend, size, name)
        return Backing(kind, sm.mapping, sm)
    if kind == "hugetlb":
        ok, why = hugetlb_available(size)
        if not ok:
            raise BackingUnavailable(why)
        # The mapping covers whole huge pages; the memslot uses the first ``size`` bytes.
        sm = SharedMemory(backend, hugetlb_size(size), name, hugetlb=True)
        return Backing(kind, sm.mapping, sm)
    if kind == "hugetlb_2m":
        ok, why = hugetlb_2m_available(size)
        if not ok:
            raise BackingUnavailable(why)
        sm = SharedMemory(backend, hugetlb_size(size, 2 << 20), name, huge_2m=True)
        return Backing(kind, sm.mapping, sm)
    if kind == "anonymous":
        return Backing(kind, anonymous(backend, size, name))
    if kind == "thp":
        ok, why = thp_available()
        if not ok:
            raise BackingUnavailable(why)
        # Over-allocate and trim so the range is 2 MiB aligned (THP needs aligned ranges).
        raw = backend.mmap(-1, size + PAGE_2M, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, 0)
        addr = (raw + PAGE_2M - 1) & ~(PAGE_2M - 1)
        if addr > raw:
            backend.munmap(raw, addr - raw)
        tail = raw + size + PAGE_2M - (addr + size)
        if tail:
            backend.munmap(addr + size, tail)
        backend.madvise(addr, size, MADV_HUGEPAGE)
        return Backing(kind, Mapping(backend, addr, size, name))
    raise ValueError(f"unknown backing {kind!r} (one of {', '.join(BACKINGS)})")


@dataclasses.dataclass
class MemRegion:
    """A test memslot made by :meth:`GuestVm.add_memory`.

    ``host`` is the host's view of the memory the guest reads as shared: the backing, or the
    guest_memfd mapping when the slot's userspace_addr is that mapping; None when
    userspace_addr is 0.
    """

    slot: int
    gpa: int
    size: int
    gva: int | None
    flags: int
    userspace_addr: int
    backing: Backing | None = None
    gmem: GuestMemfd | None = None
    gmem_offset: int = 0
    gmem_map: Mapping | None = None

    @property
    def host(self) -> Mapping | None:
        if self.backing is not None and self.userspace_addr == self.backing.addr:
            return self.backing.mapping
        if self.gmem_map is not None and self.userspace_addr == self.gmem_map.addr:
            return self.gmem_map
        return None

    def _view(self) -> Mapping:
        m = self.host or self.gmem_map
        if m is None:
            raise ValueError(f"memslot {self.slot} at gpa {self.gpa:#x} has no host mapping "
                             "(userspace_addr 0 and no guest_memfd mapping)")
        return m

    def read(self, offset: int, length: int) -> bytes:
        return self._view().read(offset, length)

    def write(self, offset: int, data: bytes) -> None:
        self._view().write(offset, data)

    def fill(self, byte: int, offset: int = 0, length: int | None = None) -> None:
        self._view().fill(offset, self.size - offset if length is None else length, byte)

    def close(self) -> None:
        if self.backing is not None:
            self.backing.close()

    def __repr__(self) -> str:
        g = f", gmem fd {self.gmem.fd}+{self.gmem_offset:#x}" if self.gmem else ""
        b = self.backing.kind if self.backing else "no backing"
        return (f"MemRegion(slot {self.slot}, gpa {self.gpa:#x}+{self.size:#x}, {b}, "
                f"hva {self.userspace_addr:#x}{g})")


__all__ = ["BACKINGS", "Backing", "BackingUnavailable", "MemRegion", "hugetlb_available",
           "hugetlb_page_size", "hugetlb_size", "make_backing", "thp_available"]
