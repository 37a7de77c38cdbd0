"""x86-64 long-mode structures the VM builder writes into guest memory.

Encodings follow the Intel SDM vol. 3 (4-level paging §4.5, segment and gate descriptors
§3.4.5/§6.14.1, the 64-bit TSS §8.7) and the values the kernel selftests' lib/x86/processor.c
uses (vcpu_init_sregs(), tools/testing/selftests/kvm/lib/x86/processor.c).
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Callable

from ..uapi import kvm_segment, kvm_sregs

PAGE_SIZE = 4096
PAGE_2M = 2 << 20
PAGE_1G = 1 << 30

PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_USER = 1 << 2
PTE_PS = 1 << 7
PTE_NX = 1 << 63
PTE_ADDR_MASK = 0x000F_FFFF_FFFF_F000

CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11

SEL_CODE = 0x08
SEL_DATA = 0x10
SEL_TSS = 0x18

GDT_CODE64 = 0x00AF_9B00_0000_FFFF  # present, DPL0, execute/read, accessed, L=1, G=1
GDT_DATA = 0x00CF_9300_0000_FFFF    # present, DPL0, read/write, accessed, D/B=1, G=1
TSS_SIZE = 0x68

#: Exceptions that push an error code (SDM vol. 3 table 6-1).
ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})

VECTOR_NAMES = {0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM",
                8: "#DF", 10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF",
                17: "#AC", 18: "#MC", 19: "#XM", 20: "#VE", 21: "#CP", 29: "#VC", 30: "#SX"}


def vector_name(v: int) -> str:
    return VECTOR_NAMES.get(v, f"vector {v}")


def canonical(addr: int) -> bool:
    return addr < (1 << 47) or (0xFFFF_8000_0000_0000 <= addr < (1 << 64))


class PageTables:
    """4-level page tables in a guest memory window.

    ``mem`` is a view of guest-physical memory starting at GPA ``base``; ``alloc`` returns the
    GPA of a fresh zeroed page inside that window for a new table.
    """

    def __init__(self, mem: memoryview, alloc: Callable[[], int], base: int = 0) -> None:
        self.mem = mem
        self.base = base
        self.alloc = alloc
        self.root = alloc()

    # --- raw entries ------------------------------------------------------------------
    def _off(self, table: int, idx: int) -> int:
        off = table - self.base + idx * 8
        if not 0 <= off <= len(self.mem) - 8:
            raise ValueError(f"page table at {table:#x} outside the builder's memory")
        return off

    def read_entry(self, table: int, idx: int) -> int:
        return int(struct.unpack_from("<Q", self.mem, self._off(table, idx))[0])

    def write_entry(self, table: int, idx: int, value: int) -> None:
        struct.pack_into("<Q", self.mem, self._off(table, idx), value)

    @staticmethod
    def indices(gva: int) -> tuple[int, int, int, int]:
        return ((gva >> 39) & 511, (gva >> 30) & 511, (gva >> 21) & 511, (gva >> 12) & 511)

    def _next(self, table: int, idx: int, gva: int, level: str) -> int:
        e = self.read_entry(table, idx)
        if e & PTE_PRESENT:
            if e & PTE_PS:
                raise ValueError(f"gva {gva:#x}: {level} entry is a large page; unmap it first")
            return e & PTE_ADDR_MASK
        t = self.alloc()
        self.write_entry(table, idx, t | PTE_PRESENT | PTE_WRITABLE)
        return t

    def _pd(self, gva: int) -> int:
        i4, i3, _, _ = self.indices(gva)
        pdpt = self._next(self.root, i4, gva, "PML4")
        return self._next(pdpt, i3, gva, "PDPT")

    # --- mapping ----------------------------------------------------------------------
    def map(self, gva: int, gpa: int, size: int, page_size: int = PAGE_SIZE,
            writable: bool = True, nx: bool = False) -> None:
        """Map [gva, gva+size) to [gpa, gpa+size) with 4 KiB or 2 MiB pages."""
        if page_size not in (PAGE_SIZE, PAGE_2M):
            raise ValueError(f"page size {page_size:#x} not supported (4 KiB or 2 MiB)")
        if gva % page_size or gpa % page_size or size % page_size or size <= 0:
            raise ValueError(f"gva {gva:#x}, gpa {gpa:#x}, size {size:#x} must be multiples "
                             f"of the page size {page_size:#x}")
        if not canonical(gva) or not canonical(gva + size - 1):
            raise ValueError(f"gva range {gva:#x}+{size:#x} is not canonical")
        if gpa + size > 1 << 52:
            raise ValueError(f"gpa {gpa:#x}+{size:#x} beyond 52-bit physical addresses")
        flags = PTE_PRESENT | (PTE_WRITABLE if writable else 0) | (PTE_NX if nx else 0)
        end = gva + size
        while gva < end:
            pd = self._pd(gva)
            i2 = (gva >> 21) & 511
            if page_size == PAGE_2M:
                e = self.read_entry(pd, i2)
                if e & PTE_PRESENT and not e & PTE_PS:
                    raise ValueError(f"gva {gva:#x} is mapped with 4 KiB pages; unmap it first")
                self.write_entry(pd, i2, gpa | flags | PTE_PS)
                gva += PAGE_2M
                gpa += PAGE_2M
                continue
            pt = self._next(pd, i2, gva, "PD")
            first = (gva >> 12) & 511
            n = min(512 - first, (end - gva) // PAGE_SIZE)
            # One write per page table, built in C: gpa is page-aligned and below bit 52, so
            # (gpa + i * 4K) | flags == (gpa | flags) + i * 4K.
            first_entry = gpa | flags
            entries = array("Q", range(first_entry, first_entry + n * PAGE_SIZE, PAGE_SIZE))
            if sys.byteorder != "little":
                entries.byteswap()
            off = self._off(pt, first)
            self.mem[off: off + 8 * n] = entries.tobytes()
            gva += n * PAGE_SIZE
            gpa += n * PAGE_SIZE

    def unmap(self, gva: int, size: int) -> None:
        """Clear the leaf entries of [gva, gva+size) (4 KiB granularity; a 2 MiB leaf is
        cleared only when the range covers it whole)."""
        end = gva + size
        while gva < end:
            leaf = self._leaf(gva)
            if leaf is None:
                gva = (gva + PAGE_SIZE) & ~(PAGE_SIZE - 1)
                continue
            table, idx, psize = leaf
            if psize == PAGE_2M and (gva % PAGE_2M or end - gva < PAGE_2M):
                raise ValueError(f"gva {gva:#x}: cannot unmap part of a 2 MiB page")
            self.write_entry(table, idx, 0)
            gva += psize

    def _leaf(self, gva: int) -> tuple[int, int, int] | None:
        """(table, index, page size) of the leaf entry mapping ``gva``, or None."""
        i4, i3, i2, i1 = self.indices(gva)
        e = self.read_entry(self.root, i4)
        if not e & PTE_PRESENT:
            return None
        pdpt = e & PTE_ADDR_MASK
        e = self.read_entry(pdpt, i3)
        if not e & PTE_PRESENT:
            return None
        if e & PTE_PS:
            return pdpt, i3, PAGE_1G
        pd = e & PTE_ADDR_MASK
        e = self.read_entry(pd, i2)
        if not e & PTE_PRESENT:
            return None
        if e & PTE_PS:
            return pd, i2, PAGE_2M
        pt = e & PTE_ADDR_MASK
        if not self.read_entry(pt, i1) & PTE_PRESENT:
            return None
        return pt, i1, PAGE_SIZE

    def translate(self, gva: int) -> int | None:
        """The GPA ``gva`` maps to, or None when it is not mapped."""
        leaf = self._leaf(gva)
        if leaf is None:
            return None
        table, idx, psize = leaf
        return (self.read_entry(table, idx) & PTE_ADDR_MASK & ~(psize - 1)) | (gva & (psize - 1))


# --- descriptors ----------------------------------------------------------------------
def tss_descriptor(base: int, limit: int = TSS_SIZE - 1) -> tuple[int, int]:
    """A 16-byte available 64-bit TSS descriptor (type 9), as two u64s."""
    low = ((limit & 0xFFFF) | (base & 0xFF_FFFF) << 16 | 0x9 << 40 | 1 << 47
           | ((limit >> 16) & 0xF) << 48 | ((base >> 24) & 0xFF) << 56)
    return low, base >> 32


def idt_gate(handler: int, selector: int = SEL_CODE, ist: int = 0, dpl: int = 0) -> tuple[int, int]:
    """A 16-byte 64-bit interrupt gate (type 0xE), as two u64s."""
    low = ((handler & 0xFFFF) | selector << 16 | (ist & 7) << 32 | (0xE | dpl << 5 | 0x80) << 40
           | ((handler >> 16) & 0xFFFF) << 48)
    return low, handler >> 32


def _seg(s: kvm_segment, selector: int, type_: int, *, code: bool = False, base: int = 0,
         limit: int = 0xFFFF_FFFF, system: bool = False) -> None:
    s.base = base
    s.limit = limit
    s.selector = selector
    s.type = type_
    s.present = 1
    s.dpl = 0
    s.db = 0 if code or system else 1
    s.s = 0 if system else 1
    s.l = 1 if code else 0
    s.g = 0 if system else 1
    s.avl = 0
    s.unusable = 0


def long_mode_sregs(s: kvm_sregs, *, cr3: int, gdt: int, gdt_limit: int, idt: int,
                    idt_limit: int, tss: int) -> None:
    """Fill ``s`` (from KVM_GET_SREGS) for 64-bit mode at CPL 0, paging on: the selftests'
    vcpu_init_sregs values (tools/testing/selftests/kvm/lib/x86/processor.c)."""
    s.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG
    s.cr4 |= CR4_PAE | CR4_OSFXSR
    s.efer |= EFER_LME | EFER_LMA | EFER_NXE
    s.cr3 = cr3
    _seg(s.cs, SEL_CODE, 0xB, code=True)
    for seg in (s.ds, s.es, s.fs, s.gs, s.ss):
        _seg(seg, SEL_DATA, 0x3)
    _seg(s.tr, SEL_TSS, 0xB, base=tss, limit=TSS_SIZE - 1, system=True)  # busy 64-bit TSS
    s.ldt.selector = 0
    s.ldt.unusable = 1
    s.ldt.present = 0
    s.gdt.base = gdt
    s.gdt.limit = gdt_limit
    s.idt.base = idt
    s.idt.limit = idt_limit


__all__ = [
    "ERROR_CODE_VECTORS",
    "PAGE_2M",
    "PAGE_SIZE",
    "PageTables",
    "canonical",
    "idt_gate",
    "long_mode_sregs",
    "tss_descriptor",
    "vector_name",
]
