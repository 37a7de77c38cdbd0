"""GuestVm: a VM with a guest program loaded in long mode, and the ucall run loop.

    with GuestVm(kvm, "smoke") as g:
        vcpu = g.vcpu("guest_sync_stages", 3)
        assert g.expect_sync(vcpu, 0).args == (0, 0)

Guest-physical layout (slot 0, "low memory", a memfd so the emulated KVM can alias it):
  0x0                 unmapped page (a NULL dereference is a #PF)
  0x1000 ..           GDT, IDT, TSS, page tables, stacks (bump-allocated, skipping the image)
  0x400000 ..         the guest ELF at its link addresses (guests/guest.ld)
  .. low_mem          more allocations
Low memory is identity-mapped with 4 KiB pages, so a guest's stack or global has
GVA == GPA (which is what lets ucall pass a guest-physical address). Test memory goes at or
above 4 GiB (add_memory), clear of the APIC page and the 32-bit hole.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from ..errors import KvmError
from ..gmem import GuestMemfd
from ..memory import SharedMemory
from ..system import Kvm
from ..uapi import ExitReason, GuestMemfdFlag, IoDirection, MemFlag, VmType, kvm_cpuid_entry2
from ..uapi.constants import UCALL_PIO_PORT
from ..vcpu import Exit, Vcpu
from ..vm import Vm
from . import x86
from .backing import BACKINGS, Backing, MemRegion, make_backing
from .build import build
from .elf import GuestImage
from .threads import VcpuThread, join_all
from .ucall import (
    UCALL_SIZE,
    GuestAssertionError,
    GuestException,
    GuestTimeout,
    Ucall,
    UcallCmd,
    UnexpectedExit,
    UnexpectedUcall,
    decode_ucall,
)
from .watchdog import WATCHDOG

log = logging.getLogger("kvmpy.guest")

PAGE = x86.PAGE_SIZE
LOW_MEM_DEFAULT = 16 << 20
TEST_MEM_BASE = 1 << 32
DEFAULT_TIMEOUT = 10.0
STACK_PAGES = 4
_RUN_RETRY_LIMIT = 1000


_cpuid_cache: weakref.WeakKeyDictionary[Kvm, list[kvm_cpuid_entry2]] = \
    weakref.WeakKeyDictionary()


def _supported_cpuid(kvm: Kvm) -> list[kvm_cpuid_entry2]:
    """KVM_GET_SUPPORTED_CPUID, once per Kvm (it does not change while /dev/kvm is open)."""
    c = _cpuid_cache.get(kvm)
    if c is None:
        c = _cpuid_cache[kvm] = kvm.get_supported_cpuid()
    return c


class GuestVm:
    """A VM running a guest program from guests/ (see the module docstring and docs/guests.md).

    ``program``: a name under guests/ ("smoke") or a path to a .c file; built once and cached.
    ``timeout``: the default watchdog budget, in seconds, of each run call.
    """

    def __init__(self, kvm: Kvm, program: str | os.PathLike[str] = "smoke", *,
                 vm_type: int = VmType.DEFAULT, low_mem: int = LOW_MEM_DEFAULT,
                 timeout: float = DEFAULT_TIMEOUT,
                 stack_pages: int = STACK_PAGES, image: GuestImage | None = None) -> None:
        if low_mem % x86.PAGE_2M or low_mem > TEST_MEM_BASE // 2:
            raise ValueError(f"low_mem {low_mem:#x} must be a multiple of 2 MiB below 2 GiB")
        self.kvm = kvm
        self.backend = kvm.backend
        self.image = image if image is not None else GuestImage.load(build(program))
        #: The program's name for messages ("smoke").
        self.name = (os.path.splitext(os.path.basename(program))[0] if image is None
                     else image.path.stem.rsplit("-", 1)[0])
        self.timeout = timeout
        self.stack_pages = stack_pages
        self.printed: list[str] = []
        self.regions: list[MemRegion] = []
        self._next_gpa = TEST_MEM_BASE
        self._next_slot = 1
        self._entries: dict[int, str] = {}
        self._lock = threading.RLock()
        self.vm: Vm = kvm.create_vm(vm_type)
        self.low: SharedMemory | None = None
        try:
            self._build_low(low_mem)
            self.cpuid = _supported_cpuid(kvm)
        except BaseException:
            self.close()
            raise

    # --- construction ---------------------------------------------------------------------
    def _build_low(self, size: int) -> None:
        img = self.image
        for seg in img.segments:
            if seg.vaddr != seg.paddr:  # loaded at paddr, run through the identity map
                raise ValueError(f"guest image {img.path.name}: segment at vaddr {seg.vaddr:#x} "
                                 f"!= paddr {seg.paddr:#x}; link it with guests/guest.ld")
        if img.low < PAGE or img.high > size:
            raise ValueError(f"guest image {img.path.name} spans [{img.low:#x}, {img.high:#x}), "
                             f"outside low memory [{PAGE:#x}, {size:#x})")
        self.low = SharedMemory(self.backend, size, "kvmpy-guest-low")
        self.low_size = size
        self._mem = self.low.mapping.view()
        for seg in img.segments:
            self._mem[seg.paddr: seg.paddr + len(seg.data)] = seg.data
        self._alloc_next = PAGE
        self._image_range = (img.low & ~(PAGE - 1), (img.high + PAGE - 1) & ~(PAGE - 1))
        self.vm.set_user_memory_region(0, 0, 0, size, self.low.addr)

        self.pt = x86.PageTables(self._mem, lambda: self.alloc_low(1))
        self.gdt = self.alloc_low(1)
        self.idt = self.alloc_low(1)
        self.tss = self.alloc_low(1)
        struct.pack_into("<4Q", self._mem, self.gdt, 0, x86.GDT_CODE64, x86.GDT_DATA,
                         x86.tss_descriptor(self.tss)[0])
        struct.pack_into("<Q", self._mem, self.gdt + 32, x86.tss_descriptor(self.tss)[1])
        stubs = img.symbol("guest_idt_stubs")
        if img.symbols.get("guest_idt_stubs_end", 0) - stubs != 256 * 16:
            raise ValueError(f"{img.path.name}: guest_idt_stubs is not 256 stubs of 16 bytes")
        gates: list[int] = []
        for v in range(256):
            gates.extend(x86.idt_gate(stubs + 16 * v))
        struct.pack_into("<512Q", self._mem, self.idt, *gates)
        self.return_trampoline = img.symbol("guest_return_trampoline")
        # Identity map all of low memory except page 0.
        self.pt.map(PAGE, PAGE, size - PAGE)

    def alloc_low(self, pages: int) -> int:
        """Allocate zeroed, identity-mapped pages of low memory; returns their GPA."""
        with self._lock:
            lo, hi = self._image_range
            start = self._alloc_next
            if start < hi and start + pages * PAGE > lo:
                start = max(start, hi)
            end = start + pages * PAGE
            if end > self.low_size:
                raise MemoryError(f"guest low memory ({self.low_size:#x} bytes) is full; "
                                  "pass a larger low_mem to GuestVm")
            self._alloc_next = end
            return start

    # --- vCPUs ------------------------------------------------------------------------------
    def vcpu(self, entry: str | int, *args: int, vcpu_id: int | None = None) -> Vcpu:
        """Create a vCPU that starts at ``entry`` (a guest symbol or address) in long mode with
        ``args`` in RDI, RSI, RDX, RCX, R8, R9 and its own stack (an unmapped guard page
        below it). Returning from ``entry`` sends UCALL_DONE(return value)."""
        v = self.vm.create_vcpu(vcpu_id)
        v.set_cpuid2(self._cpuid_for(v.id))
        s = v.get_sregs()
        x86.long_mode_sregs(s, cr3=self.pt.root, gdt=self.gdt, gdt_limit=PAGE - 1,
                            idt=self.idt, idt_limit=256 * 16 - 1, tss=self.tss)
        v.set_sregs(s)
        guard = self.alloc_low(self.stack_pages + 1)
        self.pt.unmap(guard, PAGE)
        top = guard + (self.stack_pages + 1) * PAGE
        struct.pack_into("<Q", self._mem, top - 8, self.return_trampoline)
        r = v.get_regs()
        r.rflags = 0x2
        r.rsp = top - 8  # as after a call: RSP + 8 is 16-byte aligned (SysV)
        r.rbp = 0
        r.rip = self.image.symbol(entry) if isinstance(entry, str) else entry
        v.set_regs(r)
        self._entries[v.id] = entry if isinstance(entry, str) else hex(entry)
        if args:
            self.set_args(v, *args)
        return v

    def set_args(self, vcpu: Vcpu, *args: int) -> None:
        """Guest function arguments in RDI, RSI, RDX, RCX, R8, R9 (selftests' vcpu_args_set)."""
        if len(args) > 6:
            raise ValueError(f"at most 6 register arguments, got {len(args)}")
        r = vcpu.get_regs()
        for name, a in zip(("rdi", "rsi", "rdx", "rcx", "r8", "r9"), args, strict=False):
            setattr(r, name, a & 0xFFFF_FFFF_FFFF_FFFF)
        vcpu.set_regs(r)

    def _cpuid_for(self, vcpu_id: int) -> list[kvm_cpuid_entry2]:
        out = []
        for e in self.cpuid:
            e = kvm_cpuid_entry2.from_buffer_copy(e)
            if e.function == 1:  # initial APIC ID in EBX[31:24]
                e.ebx = (e.ebx & 0x00FF_FFFF) | (vcpu_id & 0xFF) << 24
            elif e.function in (0xB, 0x1F):  # x2APIC ID
                e.edx = vcpu_id
            out.append(e)
        return out

    # --- memory -----------------------------------------------------------------------------
    def add_memory(self, size: int, *, gpa: int | None = None, backing: str = "shmem",
                   gmem: bool | GuestMemfd = False, gmem_flags: int = 0, gmem_offset: int = 0,
                   shared: str = "backing", slot: int | None = None,
                   gva: int | None = None, map: bool = True, page_size: int = PAGE,
                   writable: bool = True) -> MemRegion:
        """Add a test memslot (at or above 4 GiB unless ``gpa`` says otherwise).

        ``backing``: shmem (default) | anonymous | thp | hugetlb | hugetlb_2m | none (backing.py).
        ``gmem``: True to create a guest_memfd (``gmem_flags``) for the slot, or an existing
        one; the slot then has KVM_MEM_GUEST_MEMFD at ``gmem_offset``.
        ``shared``: what userspace_addr points at: "backing", "gmem" (the guest_memfd's own
        mmap, needs GUEST_MEMFD_FLAG_MMAP) or "none" (0).
        ``map``: map the range in the guest page tables at ``gva`` (default: gva = gpa) with
        ``page_size`` (4 KiB or 2 MiB) pages.
        """
        if backing not in BACKINGS:
            raise ValueError(f"unknown backing {backing!r} (one of {', '.join(BACKINGS)})")
        if shared not in ("backing", "gmem", "none"):
            raise ValueError(f"shared must be 'backing', 'gmem' or 'none', not {shared!r}")
        if size <= 0 or size % PAGE:
            raise ValueError(f"size {size:#x} must be a positive multiple of {PAGE:#x}")
        align = max(x86.PAGE_2M, page_size)
        with self._lock:
            if gpa is None:
                gpa = (self._next_gpa + align - 1) & ~(align - 1)
            self._next_gpa = max(self._next_gpa, gpa + size)
            if slot is None:
                slot = self._next_slot
            self._next_slot = max(self._next_slot, slot + 1)
        if shared == "backing" and backing == "none":
            raise ValueError("shared='backing' needs a backing (or use shared='gmem'/'none')")
        region = MemRegion(slot=slot, gpa=gpa, size=size, gva=None, flags=0, userspace_addr=0)
        try:
            if backing != "none":
                region.backing = make_backing(self.backend, backing, size,
                                              f"kvmpy-{backing}-slot{slot}")
            if gmem is not False:
                g = gmem if isinstance(gmem, GuestMemfd) else \
                    self.vm.create_guest_memfd(gmem_offset + size, gmem_flags)
                region.gmem = g
                region.gmem_offset = gmem_offset
                region.flags |= MemFlag.GUEST_MEMFD
                if g.flags & GuestMemfdFlag.MMAP:
                    region.gmem_map = g.mmap(size, gmem_offset)
            if shared == "backing":
                assert region.backing is not None
                region.userspace_addr = region.backing.addr
            elif shared == "gmem":
                if region.gmem_map is None:
                    raise ValueError("shared='gmem' needs a guest_memfd created with "
                                     "GUEST_MEMFD_FLAG_MMAP")
                region.userspace_addr = region.gmem_map.addr
            if region.gmem is not None:
                self.vm.set_user_memory_region2(slot, region.flags, gpa, size,
                                                region.userspace_addr, region.gmem, gmem_offset)
            else:
                self.vm.set_user_memory_region(slot, region.flags, gpa, size,
                                               region.userspace_addr)
        except BaseException:
            region.close()
            raise
        self.regions.append(region)
        if map:
            region.gva = gpa if gva is None else gva
            self.map(region.gva, gpa, size, page_size=page_size, writable=writable)
        return region

    def map(self, gva: int, gpa: int, size: int, *, page_size: int = PAGE,
            writable: bool = True) -> None:
        """Map guest virtual [gva, gva+size) onto [gpa, gpa+size) (selftests' virt_map)."""
        with self._lock:
            self.pt.map(gva, gpa, size, page_size=page_size, writable=writable)

    def unmap(self, gva: int, size: int) -> None:
        with self._lock:
            self.pt.unmap(gva, size)

    def translate(self, gva: int) -> int | None:
        """The GPA a guest virtual address maps to (None if unmapped)."""
        return self.pt.translate(gva)

    def symbol(self, name: str) -> int:
        return self.image.symbol(name)

    def _phys_pieces(self, gpa: int, length: int, what: str) -> list[tuple[Any, int, int]]:
        """(low mapping or region, offset in it, length) covering [gpa, gpa+length)."""
        out: list[tuple[Any, int, int]] = []
        end = gpa + length
        while gpa < end:
            if self.low is not None and gpa < self.low_size:
                n = min(end, self.low_size) - gpa
                out.append((self.low.mapping, gpa, n))
            else:
                r = next((r for r in self.regions if r.gpa <= gpa < r.gpa + r.size), None)
                if r is None:
                    raise ValueError(f"gpa {gpa:#x} (of {end - length:#x}+{length:#x}) is not in "
                                     f"guest memory this GuestVm can {what}")
                n = min(end, r.gpa + r.size) - gpa
                out.append((r, gpa - r.gpa, n))
            gpa += n
        return out

    def read_phys(self, gpa: int, length: int) -> bytes:
        """Read guest-physical memory through the host mappings behind it (across memslots;
        for a test memslot, its shared backing: the userspace_addr view)."""
        return b"".join(t.read(off, n) for t, off, n in self._phys_pieces(gpa, length, "read"))

    def write_phys(self, gpa: int, data: bytes) -> None:
        pos = 0
        for t, off, n in self._phys_pieces(gpa, len(data), "write"):
            t.write(off, data[pos:pos + n])
            pos += n

    # --- running ------------------------------------------------------------------------
    def where(self, vcpu: Vcpu, rip: int | None = None, *, with_rip: bool = True) -> str:
        """'vCPU n (program:entry) at RIP ...' for messages."""
        if rip is None and with_rip:
            try:
                rip = int(vcpu.get_regs().rip)
            except KvmError:
                rip = None
        at = f" at RIP {self.image.symbolize(rip)}" if rip is not None else ""
        return f"vCPU {vcpu.id} ({self.name}:{self._entries.get(vcpu.id, '?')}){at}"

    def run_exit(self, vcpu: Vcpu, timeout: float | None = None,
                 deadline: float | None = None) -> Exit:
        """One KVM_RUN under the watchdog. A run that the watchdog has to stop raises
        GuestTimeout (RIP and the last exit); a stray signal is retried within the budget."""
        budget = self.timeout if timeout is None else timeout
        if deadline is None:
            deadline = time.monotonic() + budget
        prev = vcpu.last_exit
        for _ in range(_RUN_RETRY_LIMIT):
            with WATCHDOG.watch(vcpu, deadline) as w:
                ex = vcpu.run()
            if ex.reason != ExitReason.INTR:
                return ex
            if w.error is not None:
                raise RuntimeError(f"watchdog could not stop {self.where(vcpu)}: "
                                   f"{w.error}") from w.error
            if w.fired or time.monotonic() >= deadline:
                break
        rip = int(vcpu.get_regs().rip)
        raise GuestTimeout(f"{self.where(vcpu, rip)} did not exit within its {budget:g} s "
                           f"budget; stopped by the watchdog; last exit before it: "
                           f"{prev if prev is not None else 'none (first run)'}", rip, prev)

    def run(self, vcpu: Vcpu, timeout: float | None = None) -> Ucall | Exit:
        """Run until a SYNC or DONE ucall (returned) or a non-ucall exit (returned as Exit).

        PRINTF is logged (and kept in ``printed``) and the guest resumed; ABORT raises
        GuestAssertionError, UNHANDLED raises GuestException. ``timeout`` (seconds, default
        the GuestVm's) bounds the whole call.
        """
        budget = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + budget
        while True:
            ex = self.run_exit(vcpu, budget, deadline)
            io = ex.io
            if not (ex.reason == ExitReason.IO and io is not None
                    and io.port == UCALL_PIO_PORT and io.direction == IoDirection.IN):
                return ex
            uc = self.get_ucall(vcpu)
            if uc.cmd == UcallCmd.PRINTF:
                self.printed.append(uc.buffer)
                log.info("guest %s: %s", self.where(vcpu, with_rip=False), uc.buffer)
                continue
            if uc.cmd == UcallCmd.ABORT:
                raise GuestAssertionError(uc, self.where(vcpu, with_rip=False))
            if uc.cmd == UcallCmd.UNHANDLED:
                rip = uc.args[2] if len(uc.args) > 2 else 0
                raise GuestException(uc, self.image.symbolize(rip),
                                     self.where(vcpu, with_rip=False))
            if uc.cmd in (UcallCmd.SYNC, UcallCmd.DONE):
                return uc
            raise UnexpectedUcall(uc, f"unknown ucall command {uc.cmd} from {self.where(vcpu)}")

    def get_ucall(self, vcpu: Vcpu) -> Ucall:
        """Decode the ucall of the current IN exit and complete the IN (immediate_exit), as
        the selftests' get_ucall + vcpu_run_complete_io."""
        gpa = int(vcpu.get_regs().rdi)
        try:
            raw = self.read_phys(gpa, UCALL_SIZE)
        except ValueError as e:
            raise UnexpectedExit(vcpu.last_exit or Exit(ExitReason.IO),
                                 f"{self.where(vcpu)}: ucall with RDI {gpa:#x}: {e}") from None
        # Imported here to keep this change local to get_ucall (vm.py has several editors).
        from .ucall import MalformedUcall

        try:
            uc = decode_ucall(raw, vcpu.id)
        except MalformedUcall as e:
            src = f" (sent from {e.source})" if e.source else ""
            raise MalformedUcall(f"{self.where(vcpu)}{src}: {e} (RDI {gpa:#x})", e.file,
                                 e.line) from None
        self._complete_io(vcpu)
        return uc

    def _complete_io(self, vcpu: Vcpu) -> None:
        # KVM finishes an IN on the next KVM_RUN; immediate_exit makes that run return -EINTR
        # right after (api.rst 5. "immediate_exit"). A stray signal can also give EINTR here,
        # which is fine: either way the IN is complete.
        try:
            vcpu.complete_io()
        except KvmError as e:
            if e.errno != errno.EINTR:
                raise

    def run_until_ucall(self, vcpu: Vcpu, timeout: float | None = None) -> Ucall:
        """Like :meth:`run`, but an exit that is not a ucall raises UnexpectedExit."""
        r = self.run(vcpu, timeout)
        if isinstance(r, Exit):
            raise UnexpectedExit(r, f"{self.where(vcpu)}: expected a ucall, got {r}")
        return r

    def expect_sync(self, vcpu: Vcpu, stage: int | None = None, *values: int,
                    timeout: float | None = None) -> Ucall:
        """Run to the next ucall and check it is SYNC(stage, values...)."""
        uc = self.run_until_ucall(vcpu, timeout)
        want = (stage, *values) if stage is not None else ()
        if uc.cmd != UcallCmd.SYNC or uc.args[:len(want)] != want:
            exp = f"UCALL_SYNC{want}" if want else "UCALL_SYNC"
            raise UnexpectedUcall(uc, f"{self.where(vcpu)}: expected {exp}, got {uc}")
        return uc

    def expect_done(self, vcpu: Vcpu, timeout: float | None = None) -> Ucall:
        """Run to the next ucall and check it is DONE."""
        uc = self.run_until_ucall(vcpu, timeout)
        if uc.cmd != UcallCmd.DONE:
            raise UnexpectedUcall(uc, f"{self.where(vcpu)}: expected UCALL_DONE, got {uc}")
        return uc

    def run_until_done(self, vcpu: Vcpu, timeout: float | None = None,
                       on_sync: Callable[[Vcpu, Ucall], None] | None = None) -> list[Ucall]:
        """Run until DONE; returns the SYNCs seen (``on_sync`` is called for each)."""
        syncs: list[Ucall] = []
        while True:
            uc = self.run_until_ucall(vcpu, timeout)
            if uc.cmd == UcallCmd.DONE:
                return syncs
            syncs.append(uc)
            if on_sync is not None:
                on_sync(vcpu, uc)

    # --- several vCPUs ------------------------------------------------------------------
    def start(self, vcpu: Vcpu, target: Callable[..., Any] | None = None,
              *args: Any) -> VcpuThread:
        """Start a thread running ``target(vcpu, *args)`` (default: run_until_done)."""
        fn = target if target is not None else self.run_until_done
        t = VcpuThread(vcpu, fn, *args)
        t.start()
        return t

    def join(self, threads: list[VcpuThread], timeout: float | None = None) -> list[Any]:
        """Join vCPU threads; re-raise the first failure (others are attached as notes)."""
        return join_all(threads, self.timeout * 2 if timeout is None else timeout)

    # --- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """Close the VM (vCPUs, guest_memfds and their mappings), then the host memory."""
        self.vm.close()
        for r in self.regions:
            r.close()
        self.regions.clear()
        if self.low is not None:
            self._mem.release()
            self.low.close()
            self.low = None

    def __enter__(self) -> GuestVm:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["LOW_MEM_DEFAULT", "TEST_MEM_BASE", "Backing", "GuestVm"]
