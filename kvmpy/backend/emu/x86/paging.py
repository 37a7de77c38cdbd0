"""A 4-level x86-64 page walk in Python, for the emulator's own accesses (IDT, GDT, TSS and
stack during event delivery; instruction bytes of a vmcall) - unicorn walks for the guest."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

PTE_P, PTE_W, PTE_U, PTE_PS = 1, 2, 4, 0x80
PTE_NX = 1 << 63
ADDR_MASK = 0x000F_FFFF_FFFF_F000
CR0_WP = 1 << 16
CR4_PAE, CR4_LA57, CR4_SMEP, CR4_SMAP = 1 << 5, 1 << 12, 1 << 20, 1 << 21
EFER_NXE = 1 << 11

# #PF error code bits (SDM vol. 3, 4.7).
PFEC_P, PFEC_W, PFEC_U, PFEC_RSVD, PFEC_I = 1, 2, 4, 8, 16


class GuestFault(Exception):
    """An architectural exception raised by an emulator-side access."""

    def __init__(self, vector: int, error_code: int | None = 0, cr2: int | None = None) -> None:
        super().__init__(f"vector {vector} error {error_code} cr2 {cr2}")
        self.vector = vector
        self.error_code = error_code
        self.cr2 = cr2


@dataclass(frozen=True)
class PagingMode:
    cr0: int
    cr3: int
    cr4: int
    efer: int


def canonical(va: int) -> bool:
    top = va >> 47
    return top == 0 or top == 0x1FFFF


def translate(read64: Callable[[int], int], m: PagingMode, va: int, *, write: bool = False,
              user: bool = False, fetch: bool = False) -> int:
    """Linear -> physical under 4-level paging; raises GuestFault(#PF/#GP) like the CPU."""
    va &= (1 << 64) - 1
    if not canonical(va):
        raise GuestFault(13, 0)
    if not m.cr0 & (1 << 31):
        return va
    nxe = bool(m.efer & EFER_NXE)
    table = m.cr3 & ADDR_MASK
    allow_w = allow_u = True
    allow_x = True
    for level, shift in ((4, 39), (3, 30), (2, 21), (1, 12)):
        idx = (va >> shift) & 0x1FF
        pte = read64(table + idx * 8)
        code = (PFEC_W if write else 0) | (PFEC_U if user else 0) | \
            (PFEC_I if fetch and nxe else 0)
        if not pte & PTE_P:
            raise GuestFault(14, code, va)
        if (pte & PTE_NX and not nxe) or (level == 4 and pte & PTE_PS):
            raise GuestFault(14, code | PFEC_P | PFEC_RSVD, va)
        allow_w &= bool(pte & PTE_W)
        allow_u &= bool(pte & PTE_U)
        allow_x &= not (nxe and pte & PTE_NX)
        if level in (3, 2) and pte & PTE_PS:
            size_mask = (1 << shift) - 1
            pa = (pte & ADDR_MASK & ~size_mask) | (va & size_mask)
            break
        if level == 1:
            pa = (pte & ADDR_MASK) | (va & 0xFFF)
            break
        table = pte & ADDR_MASK
    bad = (user and not allow_u) or (fetch and not allow_x) or \
        (write and not allow_w and (user or m.cr0 & CR0_WP))
    if bad:
        raise GuestFault(14, PFEC_P | (PFEC_W if write else 0) | (PFEC_U if user else 0) |
                         (PFEC_I if fetch and nxe else 0), va)
    return pa


def make_read64(read: Callable[[int, int], bytes]) -> Callable[[int], int]:
    def read64(pa: int) -> int:
        return int(struct.unpack("<Q", read(pa, 8))[0])
    return read64
