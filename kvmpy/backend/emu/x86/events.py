"""Exception delivery through the guest's 64-bit IDT, which unicorn does not do.

Follows the SDM (vol. 3, 6.12-6.14 "Exception and Interrupt Handling in 64-bit Mode") and the
double-fault rules (6.15, Table 6-5): benign + anything is delivered serially; contributory
+ contributory and #PF + (#PF or contributory) become #DF; a fault while delivering #DF is a
triple fault, which KVM reports as KVM_EXIT_SHUTDOWN.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from .paging import GuestFault, PagingMode, canonical, make_read64, translate

VEC_DE, VEC_UD, VEC_DF, VEC_NP, VEC_SS, VEC_GP, VEC_PF = 0, 6, 8, 11, 12, 13, 14
HAS_ERROR_CODE = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
CONTRIBUTORY = frozenset({0, 10, 11, 12, 13})
# Fault-class exceptions push RFLAGS with RF set (SDM vol. 3, 17.3.1.1; KVM's
# exception_type(): everything but #DB/#BP/#OF (traps) and #DF/#MC (aborts)); the RF set for
# the first fault stays for the events it escalates to (measured on real KVM: #PF -> #DF).
FAULTS = frozenset(range(32)) - {1, 3, 4, 8, 18}
RFLAGS_TF, RFLAGS_IF, RFLAGS_NT, RFLAGS_RF, RFLAGS_VM = 1 << 8, 1 << 9, 1 << 14, 1 << 16, 1 << 17


class TripleFault(Exception):
    """A fault while delivering #DF: the CPU shuts down (KVM_EXIT_SHUTDOWN)."""


@dataclass
class Event:
    """An exception or software interrupt to deliver. ``fault_rip`` is the instruction that
    raised it; ``return_rip`` is pushed (the next instruction for INT n / INT3 / INTO)."""

    vector: int
    error_code: int | None
    soft: bool
    fault_rip: int
    return_rip: int
    cr2: int | None = None


@dataclass
class CpuState:
    """What delivery reads and writes (the vCPU moves it to/from the engine)."""

    rip: int
    rsp: int
    rflags: int
    cs: int
    ss: int
    gdt_base: int
    gdt_limit: int
    idt_base: int
    idt_limit: int
    tr_base: int
    mode: PagingMode
    cr2: int


def needs_double_fault(first: int, second: int) -> bool:
    if first == VEC_PF:
        return second == VEC_PF or second in CONTRIBUTORY
    return first in CONTRIBUTORY and second in CONTRIBUTORY


def deliver(st: CpuState, ev: Event, read: Callable[[int, int], bytes],
            write: Callable[[int, bytes], None]) -> None:
    """Deliver ``ev`` (and whatever it escalates to) into ``st``. Raises TripleFault, or lets
    physmem.PhysFault through when delivery touches memory the emulator cannot serve."""
    cur = ev
    if not ev.soft and ev.vector in FAULTS:
        st.rflags |= RFLAGS_RF
    while True:
        if cur.vector == VEC_PF and cur.cr2 is not None:
            st.cr2 = cur.cr2
        try:
            _deliver_one(st, cur, read, write)
            return
        except GuestFault as f:
            if cur.vector == VEC_DF and not cur.soft:
                raise TripleFault(f"fault {f.vector} while delivering #DF") from None
            if not cur.soft and needs_double_fault(cur.vector, f.vector):
                cur = Event(VEC_DF, 0, False, ev.fault_rip, ev.fault_rip)
            else:
                cur = Event(f.vector, f.error_code if f.vector in HAS_ERROR_CODE else None,
                            False, ev.fault_rip, ev.fault_rip, f.cr2)


def _deliver_one(st: CpuState, ev: Event, read: Callable[[int, int], bytes],
                 write: Callable[[int, bytes], None]) -> None:
    read64 = make_read64(read)
    cpl = st.cs & 3
    ext = 0 if ev.soft else 1
    vec = ev.vector

    def lin_read(va: int, n: int) -> bytes:
        out = b""
        while n:
            chunk = min(n, 0x1000 - (va & 0xFFF))
            out += read(translate(read64, st.mode, va), chunk)
            va, n = va + chunk, n - chunk
        return out

    if vec * 16 + 15 > st.idt_limit:
        raise GuestFault(VEC_GP, vec * 8 + 2 + ext)
    lo, hi = struct.unpack("<QQ", lin_read(st.idt_base + vec * 16, 16))
    offset = (lo & 0xFFFF) | ((lo >> 32) & 0xFFFF_0000) | ((hi & 0xFFFF_FFFF) << 32)
    sel = (lo >> 16) & 0xFFFF
    ist = (lo >> 32) & 7
    gtype = (lo >> 40) & 0xF
    gdpl = (lo >> 45) & 3
    if gtype not in (0xE, 0xF):
        raise GuestFault(VEC_GP, vec * 8 + 2 + ext)
    if ev.soft and gdpl < cpl:
        raise GuestFault(VEC_GP, vec * 8 + 2)
    if not (lo >> 47) & 1:
        raise GuestFault(VEC_NP, vec * 8 + 2 + ext)
    if sel & ~3 == 0:
        raise GuestFault(VEC_GP, ext)
    sel_err = (sel & 0xFFFC) + ext
    if sel & 4 or (sel & ~7) + 7 > st.gdt_limit:
        raise GuestFault(VEC_GP, sel_err)          # LDT descriptors are not modelled
    (d,) = struct.unpack("<Q", lin_read(st.gdt_base + (sel & ~7), 8))
    is_code = (d >> 43) & 1 and (d >> 44) & 1
    ddpl = (d >> 45) & 3
    if not is_code or ddpl > cpl or not (d >> 53) & 1 or (d >> 54) & 1:
        raise GuestFault(VEC_GP, sel_err)
    if not (d >> 47) & 1:
        raise GuestFault(VEC_NP, sel_err)
    new_cpl = cpl if (d >> 42) & 1 else ddpl
    if ist:
        rsp = read64_lin(lin_read, st.tr_base + 0x24 + (ist - 1) * 8)
    elif new_cpl < cpl:
        rsp = read64_lin(lin_read, st.tr_base + 4 + new_cpl * 8)
    else:
        rsp = st.rsp
    if not canonical(offset):
        raise GuestFault(VEC_GP, 0)
    rsp &= ~0xF & ((1 << 64) - 1)
    frame = [st.ss, st.rsp, st.rflags, st.cs, ev.return_rip]
    if not ev.soft and vec in HAS_ERROR_CODE:
        frame.append(ev.error_code or 0)
    writes: list[tuple[int, bytes]] = []
    for val in frame:
        rsp = (rsp - 8) & ((1 << 64) - 1)
        if not canonical(rsp):
            raise GuestFault(VEC_SS, 0)
        writes.append((translate(read64, st.mode, rsp, write=True), struct.pack("<Q", val)))
    for pa, data in writes:
        write(pa, data)
    st.rsp = rsp
    st.rip = offset
    if new_cpl != cpl:
        st.ss = new_cpl
    st.cs = (sel & ~3) | new_cpl
    flags = st.rflags & ~(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM)
    if gtype == 0xE:
        flags &= ~RFLAGS_IF
    st.rflags = flags


def read64_lin(lin_read: Callable[[int, int], bytes], va: int) -> int:
    return int(struct.unpack("<Q", lin_read(va, 8))[0])
