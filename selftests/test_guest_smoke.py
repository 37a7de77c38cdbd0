"""Smoke tests of guest execution: ucall, guest asserts, exceptions, the watchdog, guest_memfd
slots seen by a guest, several vCPUs. Guests are in guests/smoke.c (one C function per case).

These pin the harness's own contract (docs/guests.md) on each backend, plus two kernel
behaviours: a guest reading and writing a KVM_MEM_GUEST_MEMFD slot whose userspace_addr is the
guest_memfd's own MMAP|INIT_SHARED mapping (Documentation/virt/kvm/api.rst 4.142
KVM_CREATE_GUEST_MEMFD, GUEST_MEMFD_FLAG_MMAP / INIT_SHARED), and what a gmem slot with
userspace_addr 0 does, which depends on how KVM reaches guest memory (see that test).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest
from _pytest._code import ExceptionInfo

from kvmpy.errors import KvmError
from kvmpy.guest import (
    BACKINGS,
    BackingUnavailable,
    GuestAssertionError,
    GuestException,
    GuestTimeout,
    GuestVm,
    UcallCmd,
)
from kvmpy.guest.backing import hugetlb_page_size, hugetlb_size, make_backing
from kvmpy.guest.build import guests_dir
from kvmpy.guest.stats import read_stats
from kvmpy.guest.x86 import PAGE_2M
from kvmpy.system import Kvm
from kvmpy.testing.require import require_cap, where
from kvmpy.uapi import Cap, ExitReason, GuestMemfdFlag, Quirk, kvm_cpuid_entry2
from kvmpy.vcpu import Exit

pytestmark = pytest.mark.guest

MMAP_SHARED = GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED


@pytest.fixture
def g(kvm: Kvm) -> Iterator[GuestVm]:
    with GuestVm(kvm, "smoke", timeout=20.0) as gvm:
        yield gvm


def source_line(needle: str) -> int:
    """The line of guests/smoke.c containing ``needle`` (so the test does not hard-code it)."""
    lines = (guests_dir() / "smoke.c").read_text().splitlines()
    hits = [i + 1 for i, line in enumerate(lines) if needle in line]
    assert len(hits) == 1, f"{needle!r} found on lines {hits} of smoke.c"
    return hits[0]


# --- ucall --------------------------------------------------------------------------------
def test_sync_stages_then_done(g: GuestVm) -> None:
    """GUEST_SYNC(stage, value) reaches the host in order, then GUEST_DONE."""
    vcpu = g.vcpu("guest_sync_stages", 3)
    for stage in range(3):
        uc = g.expect_sync(vcpu, stage)
        assert uc.args == (stage, stage * stage)
    assert g.expect_done(vcpu).args == ()


def test_printf_then_return_value_is_done(g: GuestVm) -> None:
    """GUEST_PRINTF is logged without stopping the run; returning from the guest function sends
    DONE with the return value."""
    vcpu = g.vcpu("guest_say_hello", 41)
    uc = g.run_until_ucall(vcpu)
    assert uc.cmd == UcallCmd.DONE and uc.args == (42,)
    assert g.printed == ["hello from the guest: v=41 hex=0x29 str=ok"]


def test_printf_formats(g: GuestVm) -> None:
    """The guest's vsnprintf formats like C's printf for the conversions it supports."""
    vcpu = g.vcpu("guest_printf_formats", -17, 0x1234_5678_9ABC)
    g.expect_done(vcpu)
    # Python's %-formatting follows C's printf: it is the reference here.
    c_like = "[%d] [%5u] [%-4x] [%08lx] [%c] [%%] [%s] [%d] [%#X] [%u]" % (  # noqa: UP031
        -17, 42, 0xAB, 0x1234_5678_9ABC, "z", "str", -17, 0xBEEF, 7)
    assert c_like == "[-17] [   42] [ab  ] [123456789abc] [z] [%] [str] [-17] [0XBEEF] [7]"
    assert g.printed == [c_like]


def test_guest_assert_eq_shows_file_line_and_values(g: GuestVm) -> None:
    """A failing GUEST_ASSERT_EQ raises GuestAssertionError; the line pytest prints names the
    guest's file:line, the expression and both values."""
    vcpu = g.vcpu("guest_assert_eq", 7, 9)
    with pytest.raises(GuestAssertionError) as ei:
        g.run(vcpu)
    line = source_line("GUEST_ASSERT_EQ(a, b);")
    e = ei.value
    assert (e.file, e.line, e.expr, e.values) == ("guests/smoke.c", line, "a == b", (7, 9))
    shown = ExceptionInfo.from_exception(e).exconly()  # the "E   ..." line of the failure
    assert f"guests/smoke.c:{line}: guest assertion failed: a == b (0x7 vs 0x9" in shown


def test_guest_assert_msg_formats_message(g: GuestVm) -> None:
    vcpu = g.vcpu("guest_assert_msg", 12)
    with pytest.raises(GuestAssertionError, match=r"v < 10: v=12 is not below 10") as ei:
        g.run(vcpu)
    assert ei.value.line == source_line("GUEST_ASSERT_MSG(v < 10")


def test_guest_assert_passing_reaches_done(g: GuestVm) -> None:
    vcpu = g.vcpu("guest_assert_eq", 5, 5)
    g.expect_done(vcpu)


# --- exceptions ---------------------------------------------------------------------------
def test_page_fault_reported_with_vector_cr2_and_rip(g: GuestVm) -> None:
    """A read of an unmapped address is a #PF reported as UCALL_UNHANDLED: vector 14, CR2 = the
    address, error code 'not present, read, supervisor', RIP inside guest_read_addr."""
    addr = 0x7_0000_0123
    assert g.translate(addr) is None
    vcpu = g.vcpu("guest_read_addr", addr)
    with pytest.raises(GuestException, match=r"#PF \(vector 14\)") as ei:
        g.run(vcpu)
    e = ei.value
    assert (e.vector, e.cr2, e.error_code & 0x7) == (14, addr, 0)
    assert "guest_read_addr+" in g.image.symbolize(e.rip)
    assert f"CR2 {addr:#x}" in str(e)


def test_guest_installed_handler_handles_exception(g: GuestVm) -> None:
    """guest_install_handler(): the IDT stub calls the guest's handler, which may move RIP;
    iretq resumes the guest with its registers intact."""
    vcpu = g.vcpu("guest_handled_ud", 0x5EED)
    assert g.expect_sync(vcpu).args == (6, 0x5EED)
    g.expect_done(vcpu)


def test_null_page_is_unmapped(g: GuestVm) -> None:
    vcpu = g.vcpu("guest_read_addr", 8)
    with pytest.raises(GuestException) as ei:
        g.run(vcpu)
    assert (ei.value.vector, ei.value.cr2) == (14, 8)


def test_invalid_opcode_reported_with_rip(g: GuestVm) -> None:
    """ud2 raises #UD (vector 6, no error code) with RIP at the ud2 itself (a fault)."""
    vcpu = g.vcpu("guest_ud")
    with pytest.raises(GuestException, match=r"#UD \(vector 6\)") as ei:
        g.run(vcpu)
    e = ei.value
    assert (e.vector, e.error_code) == (6, 0)
    assert g.read_phys(e.rip, 2) == b"\x0f\x0b"
    assert "guest_ud+" in g.image.symbolize(e.rip)


def test_stack_overflow_is_a_triple_fault(g: GuestVm) -> None:
    """Overflowing into the stack's guard page: the #PF cannot be delivered on the same stack
    (no IST), nor the #DF, so the vCPU shuts down (KVM_EXIT_SHUTDOWN) instead of corrupting
    memory below the stack."""
    vcpu = g.vcpu("guest_stack_overflow", 1)
    r = g.run(vcpu)
    assert isinstance(r, Exit) and r.reason == ExitReason.SHUTDOWN, f"got {r}"


# --- watchdog -----------------------------------------------------------------------------
def test_watchdog_stops_spinning_guest(g: GuestVm) -> None:
    """A guest that never exits is kicked out of KVM_RUN when its budget ends and reported with
    its RIP; the run neither returns early nor retries EINTR forever."""
    vcpu = g.vcpu("guest_spin")
    budget = 0.5
    t0 = time.monotonic()
    with pytest.raises(GuestTimeout, match=r"did not exit within its 0.5 s budget") as ei:
        g.run(vcpu, timeout=budget)
    elapsed = time.monotonic() - t0
    assert elapsed >= budget
    assert elapsed < budget + 30, "the watchdog did not stop the guest near its budget"
    assert "guest_spin+" in g.image.symbolize(ei.value.rip)
    assert f"RIP {g.image.symbolize(ei.value.rip)}" in str(ei.value)
    # The vCPU is still usable: it spins on and is stopped again.
    with pytest.raises(GuestTimeout):
        g.run(vcpu, timeout=0.1)


def test_watchdog_stops_guest_in_vcpu_thread(g: GuestVm) -> None:
    """The watchdog kicks a vCPU that runs in its own thread (the kick targets that thread),
    and join re-raises the timeout."""
    vcpu = g.vcpu("guest_spin")
    t = g.start(vcpu, g.run, 0.3)
    with pytest.raises(GuestTimeout, match=r"vCPU \d+ \(smoke:guest_spin\)"):
        g.join([t], timeout=60)


# --- hypercalls ---------------------------------------------------------------------------
KVM_HC_MAP_GPA_RANGE = 12
KVM_ENOSYS = 1000


VENDORS = {"amd": (b"AuthenticAMD", b"\x0f\x01\xd9"), "intel": (b"GenuineIntel", b"\x0f\x01\xc1")}


def _cpu_is_amd(g: GuestVm) -> bool:
    leaf0 = next(e for e in g.cpuid if e.function == 0)
    return leaf0.ebx.to_bytes(4, "little") in (b"Auth", b"Hygo")


def _set_vendor(g: GuestVm, vendor: bytes) -> None:
    """Give the VM's vCPUs CPUID leaf 0 vendor ``vendor`` (12 bytes: EBX, EDX, ECX), on a copy
    of the entries (GuestVm shares KVM_GET_SUPPORTED_CPUID's list between VMs)."""
    g.cpuid = [kvm_cpuid_entry2.from_buffer_copy(e) for e in g.cpuid]
    leaf0 = next(e for e in g.cpuid if e.function == 0)
    leaf0.ebx, leaf0.edx, leaf0.ecx = (int.from_bytes(vendor[i:i + 4], "little")
                                       for i in (0, 4, 8))


@pytest.mark.parametrize("vendor", ["cpuid", "other_vendor"])
def test_hypercall_uses_vendor_instruction(g: GuestVm, vendor: str) -> None:
    """kvm_hypercall() issues vmmcall on AMD/Hygon and vmcall elsewhere (CPUID leaf 0 vendor).

    ``cpuid``: the vCPU's CPUID as KVM_GET_SUPPORTED_CPUID gives it; ``other_vendor``: the same
    with the other vendor's string in leaf 0, so the guest issues the instruction the KVM
    vendor module does not execute natively (what a guest sees under kvm_pvm on an AMD host).

    KVM_HC_MAP_GPA_RANGE without KVM_CAP_EXIT_HYPERCALL enabled returns -KVM_ENOSYS to the
    guest (arch/x86/kvm/x86.c kvm_emulate_hypercall). Where KVM's instruction
    emulator runs the guest, vmcall never completes (it is re-executed until a signal): the
    watchdog stops it and RIP must then be at the vendor's instruction.

    The instruction is checked in the guest's own code as loaded, not in guest memory after
    the run: with KVM_X86_QUIRK_FIX_HYPERCALL_INSN enabled (the default) KVM rewrites the
    other vendor's instruction to its own (x86.c emulator_fix_hypercall; see
    test_fix_hypercall.py), and reading the patched bytes made this test fail on AMD hosts
    whose KVM executes vmcall. Where KVM_CAP_DISABLE_QUIRKS2 offers it the quirk is turned off,
    so guest memory keeps the guest's instruction and KVM injects #UD for the other vendor's.
    """
    if vendor == "other_vendor":
        _set_vendor(g, VENDORS["intel" if _cpu_is_amd(g) else "amd"][0])
    want = VENDORS["amd" if _cpu_is_amd(g) else "intel"][1]
    quirks = g.vm.check_extension(Cap.DISABLE_QUIRKS2)
    if quirks & Quirk.FIX_HYPERCALL_INSN:
        g.vm.enable_cap(Cap.DISABLE_QUIRKS2, Quirk.FIX_HYPERCALL_INSN)
    base = g.image.symbol("kvm_hypercall")
    loaded = g.read_phys(base, 256)        # before the first run: nothing patched yet

    def guest_insn(rip: int) -> bytes:
        assert "kvm_hypercall+" in g.image.symbolize(rip), g.image.symbolize(rip)
        return loaded[rip - base:rip - base + 3]

    vcpu = g.vcpu("guest_hypercall", KVM_HC_MAP_GPA_RANGE, 1 << 32, 1, 0)
    try:
        uc = g.run_until_ucall(vcpu, timeout=1.0)
    except GuestTimeout as e:
        assert guest_insn(e.rip) == want, g.image.symbolize(e.rip)
        return
    except GuestException as e:
        # Quirk disabled and the vendor is not KVM's: #UD at the guest's (vendor) instruction.
        assert quirks & Quirk.FIX_HYPERCALL_INSN and e.vector == 6, str(e)
        assert guest_insn(e.rip) == want, g.image.symbolize(e.rip)
        assert g.read_phys(e.rip, 3) == want, "patched although the quirk is disabled"
        return
    assert uc.cmd == UcallCmd.SYNC and uc.args == ((-KVM_ENOSYS) & (2**64 - 1),), str(uc)


# --- memory -------------------------------------------------------------------------------
@pytest.mark.parametrize("with_gmem", [False, True], ids=["plain", "gmem"])
@pytest.mark.parametrize("backing", [b for b in BACKINGS if b != "none"])
def test_guest_reads_and_writes_test_memory(g: GuestVm, backing: str, with_gmem: bool) -> None:
    """Test memory of each backing type at >= 4 GiB: the guest sees host writes and the host
    sees guest writes through the slot's userspace_addr (shared accesses; with a guest_memfd
    bound too when ``gmem``)."""
    if with_gmem:
        require_cap(g.vm, Cap.GUEST_MEMFD)
        require_cap(g.vm, Cap.USER_MEMORY2)
    try:
        mem = g.add_memory(2 * 4096, backing=backing, gmem=with_gmem)
    except BackingUnavailable as e:
        pytest.skip(str(e))
    assert mem.gpa >= 1 << 32
    mem.fill(0x3C)
    vcpu = g.vcpu("guest_mem_rw", mem.gva, mem.size, 0x3C, 0xC3)
    assert g.expect_sync(vcpu).args == (0xC3C3C3C3C3C3C3C3,)
    g.expect_done(vcpu)
    assert mem.read(0, mem.size) == b"\xc3" * mem.size


def test_hugetlb_backing_is_whole_huge_pages(kvm: Kvm) -> None:
    """A hugetlb backing smaller than a huge page maps whole huge pages: MFD_HUGETLB files
    are truncated and mapped in multiples of the huge page size (mmap EINVAL otherwise), while
    the memslot uses the size asked for (issue 12: an 8 KiB hugetlb memfd failed to map)."""
    assert hugetlb_size(0x2000, PAGE_2M) == PAGE_2M
    assert hugetlb_size(PAGE_2M + 0x1000, PAGE_2M) == 2 * PAGE_2M
    with pytest.raises(ValueError):
        hugetlb_size(0, PAGE_2M)
    try:
        b = make_backing(kvm.backend, "hugetlb", 0x2000)
    except BackingUnavailable as e:
        pytest.skip(str(e))
    try:
        assert b.size == hugetlb_size(0x2000) and b.size % hugetlb_page_size() == 0
        b.mapping.write(0x1000, b"\x5a" * 8)
        assert b.mapping.read(0x1000, 8) == b"\x5a" * 8
    finally:
        b.close()


def test_2m_guest_page_maps_virtual_range(g: GuestVm) -> None:
    """A guest virtual range mapped with a 2 MiB page onto test memory at another address."""
    mem = g.add_memory(2 << 20, gva=0x40_0000_0000, page_size=2 << 20)
    off = 0x12348
    mem.write(off, (0x1122334455667788).to_bytes(8, "little"))
    assert g.translate(0x40_0000_0000 + off) == mem.gpa + off
    vcpu = g.vcpu("guest_read_addr", 0x40_0000_0000 + off)
    assert g.expect_sync(vcpu).args == (0x1122334455667788,)


def _require_mmap_gmem(g: GuestVm) -> None:
    require_cap(g.vm, Cap.GUEST_MEMFD)
    require_cap(g.vm, Cap.USER_MEMORY2)
    require_cap(g.vm, Cap.GUEST_MEMFD_FLAGS, MMAP_SHARED)


def test_gmem_slot_mapped_by_its_own_mmap(g: GuestVm) -> None:
    """A KVM_MEM_GUEST_MEMFD slot whose guest_memfd is MMAP|INIT_SHARED and whose
    userspace_addr is that guest_memfd's mapping: the guest reads what the host wrote through
    the mapping, and its writes land in the guest_memfd (seen through a second, independent
    mmap of the fd)."""
    _require_mmap_gmem(g)
    mem = g.add_memory(2 * 4096, backing="none", gmem=True, gmem_flags=MMAP_SHARED,
                       shared="gmem")
    assert mem.gmem is not None and mem.gmem_map is not None
    assert mem.userspace_addr == mem.gmem_map.addr
    mem.gmem_map.fill(0, mem.size, 0xAA)
    vcpu = g.vcpu("guest_mem_rw", mem.gva, mem.size, 0xAA, 0x55)
    assert g.expect_sync(vcpu).args == (0x5555555555555555,)
    g.expect_done(vcpu)
    assert mem.gmem_map.read(0, mem.size) == b"\x55" * mem.size
    other = mem.gmem.mmap(mem.size)
    assert other.addr != mem.gmem_map.addr
    assert other.read(0, mem.size) == b"\x55" * mem.size


def _guest_insns_are_emulated(g: GuestVm) -> bool:
    """Whether KVM runs this guest's instructions in its instruction emulator: the vCPU stat
    insn_emulation (KVM_GET_STATS_FD) grows by at least one per instruction of a ucall round
    trip (dozens of instructions) instead of staying near zero."""
    probe = g.vcpu("guest_sync_stages", 1)
    try:
        before = read_stats(probe).get("insn_emulation")
    except KvmError as e:
        pytest.skip(f"{e} on {where(g.vm)}: cannot tell how KVM reaches "
                    "guest memory")
    if before is None:
        pytest.skip(f"no insn_emulation vCPU stat on {where(g.vm)}")
    g.expect_sync(probe, 0)
    return read_stats(probe)["insn_emulation"] - before >= 20


def test_gmem_slot_userspace_addr_0_is_mmio_when_kvm_emulates_guest_accesses(g: GuestVm) -> None:
    """A guest_memfd-only slot (MMAP|INIT_SHARED, userspace_addr 0).

    Where the guest runs on hardware, KVM faults such a slot in from the guest_memfd (upstream
    6.18+, guest_memfd_test's test_guest_memfd_guest): the guest sees the host's writes.
    Where KVM's instruction emulator runs the guest (kvm_pvm with a guest that is not
    PVM-aware), the emulator reaches memory through the slot's userspace_addr; address 0 is
    no mapping, so the access becomes KVM_EXIT_MMIO at the exact GPA. Which case applies is
    decided from the insn_emulation vCPU stat, not from the host's name.
    """
    _require_mmap_gmem(g)
    emulated = _guest_insns_are_emulated(g)
    try:
        mem = g.add_memory(4096, backing="none", gmem=True, gmem_flags=MMAP_SHARED,
                           shared="none")
    except KvmError as e:
        pytest.skip(f"a guest_memfd slot with userspace_addr 0 is refused ({e}) on {where(g.vm)}")
    assert mem.userspace_addr == 0 and mem.gmem_map is not None
    mem.gmem_map.fill(0, mem.size, 0xAA)
    vcpu = g.vcpu("guest_mem_rw", mem.gva, mem.size, 0xAA, 0x55)
    r = g.run(vcpu)
    if emulated:
        assert isinstance(r, Exit) and r.reason == ExitReason.MMIO, f"got {r}"
        assert r.mmio is not None
        assert (r.mmio.phys_addr, r.mmio.is_write, r.mmio.len) == (mem.gpa, False, 1)
        assert mem.gmem_map.read(0, mem.size) == b"\xaa" * mem.size
    else:
        assert not isinstance(r, Exit), f"gmem-only slot not served from the guest_memfd: {r}"
        assert r.cmd == UcallCmd.SYNC and r.args == (0x5555555555555555,)
        assert mem.gmem_map.read(0, mem.size) == b"\x55" * mem.size


# --- several vCPUs ------------------------------------------------------------------------
def test_two_vcpus_run_concurrently(g: GuestVm) -> None:
    """Two vCPUs in their own threads meet at a rendezvous (each waits until both incremented
    a shared counter), so both finish only if they run at the same time."""
    mem = g.add_memory(4096)
    vcpus = [g.vcpu("guest_rendezvous", mem.gva, 2, i) for i in range(2)]
    threads = [g.start(v) for v in vcpus]
    results = g.join(threads)
    assert [[uc.args for uc in syncs] for syncs in results] == [[(0, 2)], [(1, 2)]]
    assert int.from_bytes(mem.read(0, 8), "little") == 2


def test_vcpu_thread_failure_propagates(g: GuestVm) -> None:
    """A guest assert in one vCPU thread is raised by join, while the other vCPU finishes."""
    ok = g.vcpu("guest_sync_stages", 1)
    bad = g.vcpu("guest_assert_eq", 1, 2)
    threads = [g.start(ok), g.start(bad)]
    with pytest.raises(GuestAssertionError, match=re.escape("a == b")):
        g.join(threads)
    assert threads[0].error is None and [u.args for u in threads[0].value] == [(0, 0)]

