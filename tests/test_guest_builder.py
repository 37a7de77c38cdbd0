"""The VM builder's pieces without a vCPU: page tables, descriptors, sregs, the ELF image,
and the watchdog's kicking logic."""

from __future__ import annotations

import os
import time

import pytest
from elftools.common.exceptions import ELFError

from kvmpy.guest import build
from kvmpy.guest.elf import GuestImage
from kvmpy.guest.watchdog import Watchdog
from kvmpy.guest.x86 import (
    PAGE_2M,
    PTE_NX,
    PageTables,
    canonical,
    idt_gate,
    long_mode_sregs,
    tss_descriptor,
)
from kvmpy.uapi import kvm_sregs

MEM = 4 << 20


@pytest.fixture
def pt() -> PageTables:
    mem = bytearray(MEM)
    nxt = [0x1000]

    def alloc() -> int:
        a = nxt[0]
        nxt[0] += 0x1000
        return a

    return PageTables(memoryview(mem), alloc)


def test_4k_map_and_translate(pt: PageTables) -> None:
    pt.map(0x10_0000_0000, 0x1_0000_0000, 3 * 4096)
    assert pt.translate(0x10_0000_0000) == 0x1_0000_0000
    assert pt.translate(0x10_0000_2ABC) == 0x1_0000_2ABC
    assert pt.translate(0x10_0000_3000) is None
    assert pt.translate(0x20_0000_0000) is None


def test_4k_range_crossing_page_tables(pt: PageTables) -> None:
    base = PAGE_2M - 2 * 4096
    pt.map(base, 0x5000_0000, 4 * 4096)
    for i in range(4):
        assert pt.translate(base + i * 4096 + 8) == 0x5000_0000 + i * 4096 + 8


def test_2m_pages(pt: PageTables) -> None:
    pt.map(0x40_0000_0000, 0x1_0020_0000, 2 * PAGE_2M, page_size=PAGE_2M)
    assert pt.translate(0x40_0000_0000 + PAGE_2M + 0x12345) == 0x1_0040_0000 + 0x12345
    i4, i3, i2, _ = pt.indices(0x40_0000_0000)
    pdpt = pt.read_entry(pt.root, i4) & ~0xFFF
    pd = pt.read_entry(pdpt, i3) & ~0xFFF
    assert pt.read_entry(pd, i2) == 0x1_0020_0000 | 0x83  # present, writable, PS


def test_flags(pt: PageTables) -> None:
    pt.map(0x1000, 0x1000, 4096, writable=False, nx=True)
    leaf = pt._leaf(0x1000)
    assert leaf is not None
    e = pt.read_entry(leaf[0], leaf[1])
    assert e & 1 and not e & 2 and e & PTE_NX


def test_unmap(pt: PageTables) -> None:
    pt.map(0x200000, 0x200000, 4 * 4096)
    pt.unmap(0x201000, 4096)
    assert pt.translate(0x201000) is None
    assert pt.translate(0x202000) == 0x202000
    pt.map(0x40000000, 0x40000000, PAGE_2M, page_size=PAGE_2M)
    with pytest.raises(ValueError, match="part of a 2 MiB page"):
        pt.unmap(0x40001000, 4096)
    pt.unmap(0x40000000, PAGE_2M)
    assert pt.translate(0x40000000) is None


@pytest.mark.parametrize(("gva", "gpa", "size", "psize", "msg"), [
    (0x1001, 0x1000, 4096, 4096, "multiples"),
    (0x1000, 0x1000, 0, 4096, "multiples"),
    (0x1000, 0x1000, 4096, 8192, "not supported"),
    (0x0000_8000_0000_0000, 0x1000, 4096, 4096, "not canonical"),
    (0x1000, 1 << 52, 4096, 4096, "52-bit"),
], ids=["unaligned", "empty", "bad-size", "noncanonical", "gpa-too-high"])
def test_map_rejects(pt: PageTables, gva: int, gpa: int, size: int, psize: int,
                     msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        pt.map(gva, gpa, size, page_size=psize)


def test_map_conflicts(pt: PageTables) -> None:
    pt.map(0, 0, PAGE_2M, page_size=PAGE_2M)
    with pytest.raises(ValueError, match="large page"):
        pt.map(0x1000, 0x1000, 4096)
    pt.map(PAGE_2M, PAGE_2M, 4096)
    with pytest.raises(ValueError, match="4 KiB pages"):
        pt.map(PAGE_2M, PAGE_2M, PAGE_2M, page_size=PAGE_2M)


def test_table_outside_window_is_an_error() -> None:
    pt = PageTables(memoryview(bytearray(0x2000)), lambda: 0x5000)
    with pytest.raises(ValueError, match="outside"):
        pt.translate(0)


def test_canonical() -> None:
    assert canonical(0x7FFF_FFFF_FFFF) and canonical(0xFFFF_8000_0000_0000)
    assert not canonical(0x8000_0000_0000)


def test_tss_descriptor() -> None:
    """SDM vol. 3 fig. 8-4: limit 15:0, base 23:0, type 9 (available 64-bit TSS), P, base
    31:24, then base 63:32 in the high quadword."""
    low, high = tss_descriptor(0x1234_5678_9ABC_DEF0)
    assert low & 0xFFFF == 0x67
    assert (low >> 16) & 0xFF_FFFF == 0xBC_DEF0
    assert (low >> 40) & 0xFF == 0x89
    assert low >> 56 == 0x9A
    assert high == 0x1234_5678


def test_idt_gate() -> None:
    low, high = idt_gate(0xFFFF_FFFF_8040_1234)
    assert low & 0xFFFF == 0x1234 and (low >> 16) & 0xFFFF == 0x08
    assert (low >> 40) & 0xFF == 0x8E and low >> 48 == 0x8040
    assert high == 0xFFFF_FFFF


def test_long_mode_sregs() -> None:
    s = kvm_sregs()
    long_mode_sregs(s, cr3=0x5000, gdt=0x1000, gdt_limit=0xFFF, idt=0x2000, idt_limit=0xFFF,
                    tss=0x3000)
    assert (s.cr0, s.cr3, s.cr4 & 0x220, s.efer & 0xD00) == (0x80000031, 0x5000, 0x220, 0xD00)
    assert (s.cs.selector, s.cs.l, s.cs.db, s.cs.type) == (0x08, 1, 0, 0xB)
    assert (s.ss.selector, s.ds.type, s.ds.db) == (0x10, 3, 1)
    assert (s.tr.selector, s.tr.base, s.tr.limit, s.tr.type, s.tr.s) == (0x18, 0x3000, 0x67, 0xB, 0)
    assert s.ldt.unusable == 1 and (s.gdt.base, s.idt.limit) == (0x1000, 0xFFF)


def test_smoke_image() -> None:
    """The built smoke guest: static ELF at 4 MiB, the IDT stub table and entry points."""
    img = GuestImage(build("smoke"))
    assert img.low == 0x400000
    stubs = img.symbol("guest_idt_stubs")
    assert img.symbol("guest_idt_stubs_end") - stubs == 256 * 16
    text = next(s for s in img.segments if s.executable)
    code = text.data[stubs - text.paddr: stubs - text.paddr + 32]
    # vector 0: push $0; push $0; jmp ...   vector 1 starts 16 bytes later
    assert code[:4] == b"\x6a\x00\x6a\x00"
    assert code[16:20] == b"\x6a\x00\x6a\x01"
    # vector 8 (#DF) has a CPU error code: no dummy push
    off8 = stubs + 16 * 8 - text.paddr
    assert text.data[off8:off8 + 2] == b"\x6a\x08"
    addr = img.symbol("guest_sync_stages")
    assert img.symbolize(addr + 3) == f"{addr + 3:#x} (guest_sync_stages+0x3)"
    assert img.symbolize(0x10) == "0x10"
    with pytest.raises(KeyError, match="similar: guest_sync_stages"):
        img.symbol("sync_stages")


def test_not_an_elf(tmp_path: os.PathLike[str]) -> None:
    p = os.path.join(tmp_path, "x.elf")
    with open(p, "wb") as f:
        f.write(b"\x7fELF" + b"\0" * 60)
    with pytest.raises(ELFError, match="EI_CLASS"):  # pyelftools' own error type
        GuestImage(p)


class _KickRecorder:
    """Only kick() matters for the watchdog: a stand-in vCPU that records its kicks."""

    def __init__(self, ident: int) -> None:
        self.ident = ident
        self.kicks: list[tuple[int, float]] = []

    def kick(self) -> bool:
        self.kicks.append((self.ident, time.monotonic()))
        return True


def test_watchdog_kicks_after_deadline_until_released() -> None:
    dog = Watchdog(kick_interval=0.01)
    v = _KickRecorder(42)
    t0 = time.monotonic()
    with dog.watch(v, t0 + 0.1) as w:  # type: ignore[arg-type]
        time.sleep(0.3)
    n = len(v.kicks)
    assert w.fired and n >= 3 and w.kicks == n, v.kicks  # repeated, not once
    assert v.kicks[0][1] >= t0 + 0.1
    time.sleep(0.05)
    assert len(v.kicks) == n, "kicks continued after the run returned"


def test_watchdog_does_not_kick_before_deadline() -> None:
    dog = Watchdog()
    v1, v2 = _KickRecorder(1), _KickRecorder(2)
    with dog.watch(v1, time.monotonic() + 5) as w:  # type: ignore[arg-type]
        time.sleep(0.05)
    assert not w.fired and v1.kicks == []
    # An earlier deadline registered later still wakes the thread in time.
    with dog.watch(v2, time.monotonic() + 0.05) as w2:  # type: ignore[arg-type]
        time.sleep(0.2)
    assert w2.fired and v2.kicks and v1.kicks == []

