"""Small stand-ins and builders for testing the emulated vCPU without the rest of the backend:
a VM with the EmuVm surface the vCPU uses, memfd-backed memory, a long-mode bring-up, and a
GNU as wrapper for hand-written guests. Test support only."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
import shutil
import struct
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any

from ....uapi import PAGE_SHIFT, Ioctl, kvm_regs, kvm_run, kvm_segment, kvm_sregs
from ...libc import libc_mmap
from ..attributes import AttributeMap
from ..memslots import EmuMemslot

RUN_SIZE = 3 * 4096


_ASM_MEMO: dict[tuple[str, int], bytes] = {}


def _toolchain_id() -> str:
    """as and ld by path, size and mtime: cheap (no subprocess) and the same in a VM whose root
    is this machine's."""
    parts = []
    for tool in ("as", "ld"):
        path = shutil.which(tool)
        st = os.stat(path) if path else None
        parts.append(f"{path}:{st.st_size}:{st.st_mtime_ns}" if st else f"{tool}:missing")
    return ";".join(parts)


def asm(src: str, base: int = 0) -> bytes:
    """Assemble Intel-syntax x86-64 ``src`` linked at ``base`` into a flat binary. Results are
    kept in memory and on disk beside the built guests (kvmpy.guest.build.cache_dir()/asm,
    keyed by source, base and toolchain): under TCG one as+ld pair costs ~2 s, and a VM run
    reads what the host assembled (issue 15: nothing is compiled in the guest)."""
    memo = _ASM_MEMO.get((src, base))
    if memo is not None:
        return memo
    from ....guest.build import cache_dir

    key = hashlib.sha256(f"{_toolchain_id()}\n{base:#x}\n{src}".encode()).hexdigest()
    path = cache_dir() / "asm" / f"{key[:40]}.bin"
    try:
        data = path.read_bytes()
    except OSError:
        data = _assemble(src, base)
        try:  # a read-only or missing cache only costs time
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError:
            pass
    _ASM_MEMO[(src, base)] = data
    return data


def _assemble(src: str, base: int) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        with open(f"{d}/a.s", "w") as f:
            f.write(".intel_syntax noprefix\n.code64\n.globl _start\n_start:\n" + src + "\n")
        subprocess.run(["as", "--64", "-o", f"{d}/a.o", f"{d}/a.s"], check=True,
                       capture_output=True)
        subprocess.run(["ld", "-e", "_start", "-Ttext", hex(base), "--oformat", "binary",
                        "-o", f"{d}/a.bin", f"{d}/a.o"], check=True, capture_output=True)
        with open(f"{d}/a.bin", "rb") as f:
            return f.read()


class Memfd:
    """A memfd mapped MAP_SHARED (like kvmpy.memory.SharedMemory)."""

    def __init__(self, size: int, name: str = "emu-test") -> None:
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.size = size
        self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED)
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.map))

    def write(self, off: int, data: bytes) -> None:
        self.map[off:off + len(data)] = data

    def read(self, off: int, n: int) -> bytes:
        return bytes(self.map[off:off + n])

    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:
            pass
        os.close(self.fd)


@dataclass
class FakeGmem:
    fd: int
    size: int
    flags: int = 0
    vm: Any = None

    @property
    def mem_fd(self) -> int:
        """The contents file (EmuGmem keeps it apart from the caller's handle ``fd``)."""
        return self.fd

    def map_contents(self, addr: int, length: int, prot: int, flags: int, offset: int) -> int:
        """EmuGmem.map_contents(): an mmap of the contents."""
        return libc_mmap(addr, length, prot, flags, self.fd, offset)

    def poisoned(self) -> set[int]:
        """EmuGmem.poisoned(): no hwpoisoned pages in a stand-in file."""
        return set()


@dataclass(eq=False)
class FakeVm:
    """The EmuVm surface used by EmuVcpu (docs/emulator.md, "vCPU")."""

    type: int = 1
    exit_hypercall_mask: int = 0
    irqchip: bool = False
    lock: Any = field(default_factory=threading.RLock)
    vcpus: list[Any] = field(default_factory=list)
    memslots: dict[int, EmuMemslot] = field(default_factory=dict)
    attributes: AttributeMap = field(default_factory=AttributeMap)
    memory_version: int = 0

    def find_memslot(self, gpa: int) -> EmuMemslot | None:
        for s in self.memslots.values():
            if s.gpa <= gpa < s.gpa + s.size:
                return s
        return None

    def is_private(self, gpa: int) -> bool:
        return self.attributes.is_private(gpa >> PAGE_SHIFT)

    def invalidate(self, lo: int, hi: int) -> None:
        self.memory_version += 1
        for v in self.vcpus:
            v.invalidate(lo, hi)

    def set_slot(self, slot: int, gpa: int, size: int, hva: int, gmem: Any = None,
                 gmem_offset: int = 0, flags: int = 0) -> None:
        # One swap under the lock, as KVM installs a new memslot array: a vCPU resolving a
        # fault in between must not see the slot missing (it would exit as MMIO).
        with self.lock:
            old = self.memslots.pop(slot, None)
            if size:
                self.memslots[slot] = EmuMemslot(slot, 0, flags | (4 if gmem else 0), gpa,
                                                 size, hva, gmem, gmem_offset)
        if old is not None:
            self.invalidate(old.gpa, old.gpa + old.size)
        if size:
            self.invalidate(gpa, gpa + size)

    def set_private(self, gpa: int, size: int, private: bool) -> None:
        self.attributes.set(gpa >> PAGE_SHIFT, (gpa + size) >> PAGE_SHIFT, private)
        self.invalidate(gpa, gpa + size)


# Low-memory layout of the test bring-up (all in a 2 MiB memfd slot at gpa 0).
PML4, PDPT, PD0, GDT, IDT, TSS = 0x1000, 0x2000, 0x3000, 0xB000, 0xC000, 0xD000
CODE, STACK_TOP, DATA = 0x10000, 0x80000, 0x90000
LOW_SIZE = 0x200000


def build_low_memory(mem: Memfd, code: bytes, idt_entries: dict[int, int] | None = None,
                     ident_gib: int = 8) -> None:
    """Identity page tables for the first ``ident_gib`` GiB (2 MiB pages), a GDT with
    code 0x08 / data 0x10 / TSS 0x18, an IDT with the given vector -> handler gates, and the
    code at CODE."""
    mem.write(PML4, struct.pack("<Q", PDPT | 3))
    for g in range(ident_gib):
        mem.write(PDPT + 8 * g, struct.pack("<Q", (PD0 + g * 0x1000) | 3))
        mem.write(PD0 + g * 0x1000, b"".join(
            struct.pack("<Q", ((g << 30) + (i << 21)) | 0x83) for i in range(512)))
    tss_lo = 0x67 | ((TSS & 0xFFFFFF) << 16) | (0x89 << 40) | (((TSS >> 24) & 0xFF) << 56)
    mem.write(GDT, struct.pack("<QQQQQ", 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF,
                               tss_lo, TSS >> 32))
    for vec, handler in (idt_entries or {}).items():
        lo = (handler & 0xFFFF) | (0x08 << 16) | (0x8E << 40) | ((handler >> 16 & 0xFFFF) << 48)
        mem.write(IDT + vec * 16, struct.pack("<QQ", lo, handler >> 32))
    mem.write(CODE, code)


def long_mode_sregs(idt_limit: int = 0xFFF) -> kvm_sregs:
    s = kvm_sregs()
    s.cs = kvm_segment(limit=0xFFFFFFFF, selector=8, type=11, present=1, s=1, l=1, g=1)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(s, name, kvm_segment(limit=0xFFFFFFFF, selector=0x10, type=3, present=1, s=1,
                                     db=1, g=1))
    s.tr = kvm_segment(base=TSS, limit=0x67, selector=0x18, type=11, present=1)
    s.ldt = kvm_segment(unusable=1, type=2, present=1)
    s.gdt.base, s.gdt.limit = GDT, 0x27
    s.idt.base, s.idt.limit = IDT, idt_limit
    s.cr0, s.cr3, s.cr4, s.efer = 0x80000033, PML4, 0x220, 0xD00
    s.apic_base = 0xFEE00900
    return s


def start_in_long_mode(kvm: Any, vcpu: Any, rip: int = CODE, rsp: int = STACK_TOP) -> None:
    """Put a kvmpy Vcpu of ``kvm`` where the hand-assembled guests start: the supported CPUID,
    long_mode_sregs(), RIP and RSP, RFLAGS 2 (bit 1 is reserved, always set)."""
    vcpu.set_cpuid2(kvm.get_supported_cpuid())
    vcpu.set_sregs(long_mode_sregs())
    r = kvm_regs()
    r.rip, r.rsp, r.rflags = rip, rsp, 2
    vcpu.set_regs(r)


class VcpuHarness:
    """An EmuVcpu with its kvm_run in a memfd, driven through its ioctl entry point."""

    def __init__(self, vm: FakeVm, vcpu_id: int = 0) -> None:
        from ..vcpu import EmuVcpu

        self.runmem = Memfd(RUN_SIZE, "kvm-run")
        self.vcpu = EmuVcpu(vm, vcpu_id,  # type: ignore[arg-type]
                             self.runmem.addr, RUN_SIZE)
        vm.vcpus.append(self.vcpu)
        self.run_struct = kvm_run.from_address(self.runmem.addr)

    def run(self) -> int:
        """KVM_RUN; returns 0 or the errno."""
        try:
            return self.vcpu.ioctl(Ioctl.KVM_RUN, 0)
        except OSError as e:
            return e.errno or errno.EIO

    @property
    def exit_reason(self) -> int:
        return int(self.run_struct.exit_reason)

    def get_regs(self) -> kvm_regs:
        r = kvm_regs()
        self.vcpu.ioctl(Ioctl.KVM_GET_REGS, ctypes.addressof(r))
        return r

    def set_regs(self, r: kvm_regs) -> None:
        self.vcpu.ioctl(Ioctl.KVM_SET_REGS, ctypes.addressof(r))

    def get_sregs(self) -> kvm_sregs:
        s = kvm_sregs()
        self.vcpu.ioctl(Ioctl.KVM_GET_SREGS, ctypes.addressof(s))
        return s

    def set_sregs(self, s: kvm_sregs) -> None:
        self.vcpu.ioctl(Ioctl.KVM_SET_SREGS, ctypes.addressof(s))

    def io_data(self, n: int) -> bytes:
        return self.runmem.read(4096, n)

    def set_io_data(self, data: bytes) -> None:
        self.runmem.write(4096, data)

    def close(self) -> None:
        self.vcpu.close()
        self.runmem.close()


class Guest:
    """FakeVm + low memory + one vCPU in long mode at CODE with RSP at STACK_TOP."""

    def __init__(self, src: str, idt: dict[str, int] | None = None, vm: FakeVm | None = None,
                 idt_limit: int = 0xFFF, extra: str = "") -> None:
        self.vm = vm or FakeVm()
        self.low = Memfd(LOW_SIZE, "low")
        code = asm(src + "\n" + extra, CODE)
        self.code = code
        self.symbols: dict[str, int] = {}
        self.vm.set_slot(0, 0, LOW_SIZE, self.low.addr)
        self.h = VcpuHarness(self.vm)
        entries = {}
        for label, vec in (idt or {}).items():
            entries[vec] = CODE + code_offset(src + "\n" + extra, label)
        build_low_memory(self.low, code, entries)
        self.h.set_sregs(long_mode_sregs(idt_limit))
        r = kvm_regs()
        r.rip, r.rsp, r.rflags = CODE, STACK_TOP, 2
        self.h.set_regs(r)

    def close(self) -> None:
        self.h.close()
        self.low.close()


def code_offset(src: str, label: str) -> int:
    """Offset of ``label`` in the assembled ``src`` (by assembling a marker program)."""
    probe = asm(src + f"\n.section .marker,\"a\"\n.quad {label} - _start\n", 0)
    # The marker section follows .text in the flat image (ld default script).
    return int(struct.unpack("<Q", probe[-8:])[0])
