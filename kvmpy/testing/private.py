"""Host side of the private-memory selftests (private_mem_conversions, private_mem_kvm_exits,
the guest_memfd guest case and the beyond-upstream cases).

* :func:`require_private_mem` skips unless the kernel offers what KVM's private_mem tests need:
  KVM_X86_SW_PROTECTED_VM in KVM_CAP_VM_TYPES, KVM_MEMORY_ATTRIBUTE_PRIVATE in
  KVM_CAP_MEMORY_ATTRIBUTES, KVM_CAP_GUEST_MEMFD and (optionally) KVM_HC_MAP_GPA_RANGE in
  KVM_CAP_EXIT_HYPERCALL, each probed on a VM of that type.
* :func:`handle_map_gpa_range` answers a KVM_EXIT_HYPERCALL for KVM_HC_MAP_GPA_RANGE the way
  private_mem_conversions_test's host does: fallocate/punch-hole on the guest_memfd(s) behind the
  range, KVM_SET_MEMORY_ATTRIBUTES, then ``hypercall.ret = 0``
  (Documentation/virt/kvm/x86/hypercalls.rst "KVM_HC_MAP_GPA_RANGE"; api.rst "KVM_EXIT_HYPERCALL",
  "KVM_SET_MEMORY_ATTRIBUTES"). The a2 bits are the test's own (KVM passes a2 through unread).
* :func:`run_conversion_vcpu` is the per-vCPU host loop of the conversions test (HYPERCALL ->
  handle; SYNC_SHARED / SYNC_PRIVATE -> check the shared backing; DONE -> return).
"""

from __future__ import annotations

import dataclasses
import errno
import struct
from collections.abc import Iterator

import pytest

from ..errors import KvmError
from ..guest.stats import read_stats
from ..guest.ucall import UcallCmd, UnexpectedExit, UnexpectedUcall
from ..guest.vm import GuestVm
from ..system import Kvm
from ..uapi import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    PAGE_SIZE,
    Cap,
    ExitReason,
    Hypercall,
    MemoryAttribute,
    VmType,
)
from ..vcpu import Exit, Vcpu
from ..vm import Vm
from .require import require_cap, require_vm_type, where

#: The conversions test's own bits in KVM_HC_MAP_GPA_RANGE's a2 (guests/private_mem_*.c).
MAP_GPA_SET_ATTRIBUTES = 1 << 0
MAP_GPA_SHARED = 1 << 1
MAP_GPA_DO_FALLOCATE = 1 << 2

#: GUEST_SYNC stages of guests/private_mem_conversions.c.
SYNC_SHARED = 1
SYNC_PRIVATE = 2

#: KVM_CAP_EXIT_HYPERCALL bit for KVM_HC_MAP_GPA_RANGE (api.rst 7.37).
MAP_GPA_RANGE_BIT = 1 << Hypercall.MAP_GPA_RANGE


def require_private_mem(kvm: Kvm, *, hypercall_exit: bool = True) -> None:
    """Skip unless SW_PROTECTED VMs with private memory are offered (private_mem_*_test's
    TEST_REQUIRE(kvm_check_cap(KVM_CAP_VM_TYPES) & BIT(KVM_X86_SW_PROTECTED_VM)), plus the
    capabilities that implies, probed on such a VM so a skip names the one missing)."""
    require_vm_type(kvm, VmType.SW_PROTECTED)
    with kvm.create_vm(VmType.SW_PROTECTED) as vm:
        require_cap(vm, Cap.MEMORY_ATTRIBUTES, int(MemoryAttribute.PRIVATE))
        require_cap(vm, Cap.GUEST_MEMFD)
        require_cap(vm, Cap.USER_MEMORY2)
        if hypercall_exit:
            require_cap(vm, Cap.EXIT_HYPERCALL, MAP_GPA_RANGE_BIT)


def enable_map_gpa_range_exit(vm: Vm) -> None:
    """KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL, BIT(KVM_HC_MAP_GPA_RANGE))."""
    vm.enable_cap(Cap.EXIT_HYPERCALL, MAP_GPA_RANGE_BIT)


# --- guest_memfd behind a GPA range -----------------------------------------------------------
def gmem_chunks(vm: Vm, gpa: int, size: int) -> Iterator[tuple[int, int, int]]:
    """(guest_memfd fd, file offset, length) for each memslot piece of [gpa, gpa+size), as the
    selftests' vm_guest_mem_fallocate(); a piece with no guest_memfd slot raises."""
    end = gpa + size
    while gpa < end:
        slot = next((m for m in vm.memslots.values()
                     if m.guest_phys_addr <= gpa < m.end and (m.slot >> 16) == 0), None)
        if slot is None or slot.guest_memfd is None:
            raise AssertionError(f"gpa {gpa:#x} of the range is not in a guest_memfd memslot "
                                 f"({'no memslot' if slot is None else repr(slot)})")
        n = min(end, slot.end) - gpa
        yield (slot.guest_memfd.fd,
               slot.guest_memfd_offset + gpa - slot.guest_phys_addr, n)
        gpa += n


def gmem_fallocate(vm: Vm, gpa: int, size: int, punch_hole: bool) -> None:
    """Allocate (private) or punch (free) the guest_memfd pages behind [gpa, gpa+size)."""
    mode = FALLOC_FL_KEEP_SIZE | (FALLOC_FL_PUNCH_HOLE if punch_hole else 0)
    for fd, off, n in gmem_chunks(vm, gpa, size):
        try:
            vm.backend.fallocate(fd, mode, off, n)
        except OSError as e:
            raise KvmError(e.errno or errno.EIO, "fallocate",
                           f"guest_memfd fd {fd} {'punch' if punch_hole else 'allocate'} "
                           f"offset {off:#x} len {n:#x} (gpa {gpa:#x})") from None


@dataclasses.dataclass(frozen=True)
class MapGpaRange:
    """One decoded KVM_HC_MAP_GPA_RANGE exit."""

    gpa: int
    size: int
    set_attributes: bool
    shared: bool
    do_fallocate: bool

    @classmethod
    def decode(cls, ex: Exit) -> MapGpaRange:
        h = ex.hypercall
        if ex.reason != ExitReason.HYPERCALL or h is None:
            raise AssertionError(f"expected KVM_EXIT_HYPERCALL, got {ex}")
        if h.nr != Hypercall.MAP_GPA_RANGE:
            raise AssertionError(f"hypercall.nr {h.nr}, expected KVM_HC_MAP_GPA_RANGE (12)")
        a2 = h.args[2]
        return cls(h.args[0], h.args[1] * PAGE_SIZE, bool(a2 & MAP_GPA_SET_ATTRIBUTES),
                   bool(a2 & MAP_GPA_SHARED), bool(a2 & MAP_GPA_DO_FALLOCATE))


def handle_map_gpa_range(vcpu: Vcpu, ex: Exit) -> MapGpaRange:
    """Answer a KVM_HC_MAP_GPA_RANGE exit: fallocate (punch when converting to shared) if
    DO_FALLOCATE, KVM_SET_MEMORY_ATTRIBUTES if SET_ATTRIBUTES, then hypercall.ret = 0 (copied to
    the guest's RAX by the next KVM_RUN)."""
    req = MapGpaRange.decode(ex)
    vm = vcpu.vm
    if req.do_fallocate:
        gmem_fallocate(vm, req.gpa, req.size, punch_hole=req.shared)
    if req.set_attributes:
        vm.set_memory_attributes(req.gpa, req.size, MemoryAttribute.NONE if req.shared
                                 else MemoryAttribute.PRIVATE)
    vcpu.run_struct.exit.hypercall.ret = 0
    return req


# --- the shared backing (the memslots' userspace_addr) ----------------------------------------
def _host_pieces(g: GuestVm, gpa: int, size: int) -> Iterator[tuple[int, int, int]]:
    """(region index, offset in region, length) for [gpa, gpa+size), crossing memslots."""
    end = gpa + size
    while gpa < end:
        for i, r in enumerate(g.regions):
            if r.gpa <= gpa < r.gpa + r.size:
                n = min(end, r.gpa + r.size) - gpa
                yield i, gpa - r.gpa, n
                gpa += n
                break
        else:
            raise AssertionError(f"gpa {gpa:#x} is in no test memslot of this VM")


def check_shared(g: GuestVm, gpa: int, size: int, byte: int, what: str = "") -> None:
    """Assert the shared backing (userspace_addr view) holds ``byte`` over [gpa, gpa+size)."""
    want = bytes([byte]) * PAGE_SIZE
    for i, off, n in _host_pieces(g, gpa, size):
        r = g.regions[i]
        data = r.read(off, n)
        if data != want[:1] * n:
            bad = next(k for k in range(n) if data[k] != byte)
            raise AssertionError(
                f"shared backing at gpa {r.gpa + off + bad:#x} (slot {r.slot}) holds "
                f"{data[bad]:#04x}, expected {byte:#04x}{': ' + what if what else ''}")


def fill_shared(g: GuestVm, gpa: int, size: int, byte: int) -> None:
    """memset the shared backing behind [gpa, gpa+size) from the host."""
    for i, off, n in _host_pieces(g, gpa, size):
        g.regions[i].fill(byte, off, n)


@dataclasses.dataclass
class ConversionStats:
    hypercalls: int = 0
    to_private: int = 0
    to_shared: int = 0
    punches: int = 0
    sync_shared: int = 0
    sync_private: int = 0


def run_conversion_vcpu(g: GuestVm, vcpu: Vcpu, timeout: float | None = None) -> ConversionStats:
    """The conversions test's vCPU loop (one thread per vCPU): HYPERCALL -> handle_map_gpa_range;
    otherwise only ucalls are allowed: SYNC_SHARED(gpa, size, cur, new) checks the shared backing
    holds ``cur`` then fills it with ``new``; SYNC_PRIVATE(gpa, size, p) checks it still holds
    ``p``; DONE ends. Anything else fails naming it."""
    st = ConversionStats()
    while True:
        r = g.run(vcpu, timeout)
        if isinstance(r, Exit):
            if r.reason != ExitReason.HYPERCALL:
                raise UnexpectedExit(r, f"{g.where(vcpu)}: expected KVM_EXIT_HYPERCALL or a "
                                        f"ucall (KVM_EXIT_IO), got {r}")
            req = handle_map_gpa_range(vcpu, r)
            st.hypercalls += 1
            if req.set_attributes:
                if req.shared:
                    st.to_shared += 1
                else:
                    st.to_private += 1
            elif req.do_fallocate and req.shared:
                st.punches += 1
            continue
        if r.cmd == UcallCmd.DONE:
            return st
        stage = r.stage
        if stage == SYNC_SHARED and len(r.args) == 5:
            _, gpa, size, cur, new = r.args
            check_shared(g, gpa, size, cur, f"SYNC_SHARED from {g.where(vcpu, with_rip=False)}: "
                         "the guest's shared writes must reach the backing")
            fill_shared(g, gpa, size, new)
            st.sync_shared += 1
        elif stage == SYNC_PRIVATE and len(r.args) == 4:
            _, gpa, size, p = r.args
            check_shared(g, gpa, size, p, f"SYNC_PRIVATE from {g.where(vcpu, with_rip=False)}: "
                         "private writes must not be visible in the shared backing")
            st.sync_private += 1
        else:
            raise UnexpectedUcall(r, f"{g.where(vcpu)}: unexpected ucall {r}")


# --- scripted guests (guests/private_mem_beyond.c guest_script) -----------------------------------
OP_FILL, OP_CHECK, OP_MAP, OP_SYNC = 1, 2, 3, 4


@dataclasses.dataclass(frozen=True)
class Op:
    """One step of guest_script: FILL/CHECK (gpa, size, byte), MAP (gpa, size, a2 bits: a
    KVM_HC_MAP_GPA_RANGE), SYNC (arg). ``gpa`` is relative to the script's base."""

    kind: int
    gpa: int
    size: int
    arg: int

    def __str__(self) -> str:
        name = {OP_FILL: "fill", OP_CHECK: "check", OP_MAP: "map", OP_SYNC: "sync"}[self.kind]
        return f"{name}(+{self.gpa:#x}, {self.size:#x}, {self.arg:#x})"


def write_script(g: GuestVm, base: int, ops: list[Op]) -> tuple[int, int]:
    """Put ``ops`` (gpa relative to ``base``) in low guest memory; returns the (gpa, count)
    arguments of guest_script."""
    table = g.alloc_low((len(ops) * 32 + PAGE_SIZE - 1) // PAGE_SIZE)
    g.write_phys(table, b"".join(struct.pack("<4Q", o.kind, base + o.gpa, o.size, o.arg)
                                 for o in ops))
    return table, len(ops)


# --- how KVM reaches guest memory -------------------------------------------------------------
def guest_accesses_emulated(g: GuestVm, probe_entry: str) -> tuple[bool, str]:
    """Whether KVM runs this guest in its instruction emulator (which reaches memory through the
    slot's userspace_addr), from the vCPU stat insn_emulation (KVM_GET_STATS_FD) over one ucall
    round trip of ``probe_entry`` (a guest function that SYNCs once). Returns the verdict and the
    observed fact, for messages. Without the stats fd there is no sign of emulation."""
    probe = g.vcpu(probe_entry)
    try:
        before = read_stats(probe).get("insn_emulation")
    except KvmError as e:
        g.run_until_ucall(probe)
        return False, f"no vCPU stats ({e.call}: {errno.errorcode.get(e.errno or 0, str(e.errno))})"
    g.run_until_ucall(probe)
    if before is None:
        return False, "no insn_emulation vCPU stat"
    grew = read_stats(probe)["insn_emulation"] - before
    return grew >= 20, f"insn_emulation grew by {grew} over one ucall round trip"


# --- known gaps of the emulated KVM --------------------------------------------------------------
#: Reported to the emulator's owners; each names the kernel behaviour the emulator misses.
EMU_GAP_NOSLOT_PRIVATE = (
    "a private gfn with no memslot gives KVM_EXIT_MMIO instead of KVM_EXIT_MEMORY_FAULT "
    "(arch/x86/kvm/mmu/mmu.c: a private fault goes to kvm_faultin_pfn_private(), which exits "
    "with KVM_MEMORY_EXIT_FLAG_PRIVATE when the slot cannot be private, before the no-slot "
    "MMIO path)")
EMU_GAP_ANON_HLT = (
    "with a private-anonymous shared backing (mapped directly, not aliased) a vmcall after "
    "several conversions is reported as KVM_EXIT_HLT at the vmcall's RIP (minimal: "
    "test_private_mem_beyond.py::test_scripted_conversions[overlapping_2m_then_free_all-anonymous])")


def emu_gap(request: pytest.FixtureRequest, kvm: Kvm, what: str) -> None:
    """Mark the running test as a strict xfail on the emulated KVM only: the gap stays visible
    in every run, and a fixed emulator turns the XPASS into a failure that asks for the marker
    to go. On real KVM the test runs normally."""
    if kvm.backend.name == "emu":
        request.node.add_marker(pytest.mark.xfail(strict=True, reason=f"emulated KVM: {what}"))


__all__ = [
    "EMU_GAP_ANON_HLT",
    "EMU_GAP_NOSLOT_PRIVATE",
    "MAP_GPA_DO_FALLOCATE",
    "MAP_GPA_RANGE_BIT",
    "MAP_GPA_SET_ATTRIBUTES",
    "MAP_GPA_SHARED",
    "OP_CHECK",
    "OP_FILL",
    "OP_MAP",
    "OP_SYNC",
    "SYNC_PRIVATE",
    "SYNC_SHARED",
    "ConversionStats",
    "MapGpaRange",
    "Op",
    "check_shared",
    "emu_gap",
    "enable_map_gpa_range_exit",
    "fill_shared",
    "gmem_chunks",
    "gmem_fallocate",
    "guest_accesses_emulated",
    "handle_map_gpa_range",
    "require_private_mem",
    "run_conversion_vcpu",
    "where",
    "write_script",
]
