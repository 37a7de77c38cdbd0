"""set_memory_region_test's vCPU cases (tools/testing/selftests/kvm/set_memory_region_test.c):
KVM_RUN with no memslots, MMIO during event vectoring, and moving / deleting a memslot the
running guest is using, with KVM_X86_QUIRK_SLOT_ZAP_ALL on and (where KVM_CAP_DISABLE_QUIRKS2
offers it) off.

Guest: guests/memslots_vcpu.c. Kernel paths: virt/kvm/kvm_main.c kvm_set_memslot() (a moved or
deleted slot is first marked KVM_MEMSLOT_INVALID, so a racing guest access is emulated MMIO, then
kvm_arch_flush_shadow_memslot(): arch/x86/kvm/mmu/mmu.c kvm_mmu_zap_all_fast() with the quirk,
kvm_mmu_zap_memslot() without it); an access with no memslot is KVM_EXIT_MMIO
(handle_mmio_page_fault / kvm_handle_noslot_fault); arch/x86/kvm/x86.c handle_emulation_failure()
-> KVM_EXIT_INTERNAL_ERROR when nothing can be fetched; kvm_prepare_event_vectoring_exit() (7.3)
-> KVM_INTERNAL_ERROR_DELIVERY_EV with the GPA in data[3] when vectoring an event hits MMIO
(svm.c / vmx.c check_emulate_instruction() return X86EMUL_UNHANDLEABLE_VECTORING).
"""

from __future__ import annotations

import struct
import threading
import time

import pytest

from kvmpy.guest import GuestVm, MemRegion, UcallCmd
from kvmpy.guest.threads import VcpuThread
from kvmpy.guest.ucall import Ucall, UnexpectedExit
from kvmpy.system import Kvm
from kvmpy.testing.known_issues import hang_budget
from kvmpy.testing.private_mem import guest_accesses_emulated
from kvmpy.testing.require import where
from kvmpy.uapi import Cap, ExitReason, Quirk
from kvmpy.vcpu import Exit, Vcpu
from kvmpy.vm import Vm

pytestmark = pytest.mark.guest

MEM_REGION_SIZE = 0x200000
MEM_REGION_GPA = 0xC0000000
MEM_REGION_SLOT = 10
MMIO_VAL = 0xBEEF
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
GP_VECTOR = 13
IDT_ENTRY_SIZE = 16
SYNC_TIMEOUT = 20.0  # upstream waits 2 s; the emulated KVM and nested TCG runs are slower


# --- zero memory regions -----------------------------------------------------------------------

def test_zero_memory_regions(vm: Vm) -> None:
    """KVM_RUN on a vCPU of a VM without any memslot: the reset vector cannot be fetched, so
    KVM_EXIT_INTERNAL_ERROR (test_zero_memory_regions; x86.c handle_emulation_failure()).
    As upstream, KVM_SET_NR_MMU_PAGES(64) first: with no memslots the default MMU page budget
    (kvm_mmu_calculate_default_mmu_pages()) is 0 and shadow paging's root allocation fails with
    ENOSPC (make_mmu_pages_available())."""
    vm.set_nr_mmu_pages(64)
    vcpu = vm.create_vcpu(0)
    ex = vcpu.run()
    assert ex.reason == ExitReason.INTERNAL_ERROR, (
        f"KVM_RUN with zero memslots on {where(vm)}: {ex}, expected KVM_EXIT_INTERNAL_ERROR")
    print(f"zero memslots: {ex}, data {ex.internal.data if ex.internal else ()}")


# --- MMIO during vectoring ---------------------------------------------------------------------

def test_mmio_during_vectoring(kvm: Kvm, request: pytest.FixtureRequest) -> None:
    """IDT base at a GPA without a memslot, then a #GP: delivering it reads the IDT from MMIO,
    which KVM cannot emulate, so KVM_EXIT_INTERNAL_ERROR with KVM_INTERNAL_ERROR_DELIVERY_EV
    and data[3] = IDT base + 13 * 16 (test_mmio_during_vectoring;
    kvm_prepare_event_vectoring_exit() fills info2, exit reason, info1, gpa, last_vmentry_cpu).

    Where KVM's instruction emulator runs the guest (insn_emulation grows with every guest
    instruction: kvm_pvm, which delivers guest events in software rather than through
    VMX/SVM event injection, so check_emulate_instruction() never sees a vectoring exit) the
    failed delivery is a triple fault: KVM_EXIT_SHUTDOWN, pinned as observed."""
    with GuestVm(kvm, "memslots_vcpu", timeout=30.0) as g:
        emulated, fact = guest_accesses_emulated(g, "guest_sync_once")
        g.map(MEM_REGION_GPA, MEM_REGION_GPA, 4096)
        vcpu = g.vcpu("guest_mmio_during_vectoring", MEM_REGION_GPA)
        # Before 6.14 the delivery loops forever (known_issues): the wait only confirms that.
        r = g.run(vcpu, hang_budget(request, kvm, 30.0))
        if emulated and isinstance(r, Exit) and r.reason == ExitReason.SHUTDOWN:
            print(f"{fact}: KVM_EXIT_SHUTDOWN")
            return
        assert isinstance(r, Exit) and r.reason == ExitReason.INTERNAL_ERROR, \
            f"#GP with the IDT in MMIO on {where(g.vm)} ({fact}): {r}, expected " \
            "KVM_EXIT_INTERNAL_ERROR"
        assert r.internal is not None
        assert r.internal.suberror == KVM_INTERNAL_ERROR_DELIVERY_EV, \
            f"suberror {r.internal.suberror}, expected KVM_INTERNAL_ERROR_DELIVERY_EV"
        want = MEM_REGION_GPA + GP_VECTOR * IDT_ENTRY_SIZE
        assert len(r.internal.data) >= 4 and r.internal.data[3] == want, \
            f"internal.data {[hex(d) for d in r.internal.data]}: data[3] should be {want:#x}"


# --- move / delete a region in use -------------------------------------------------------------

class Worker:
    """set_memory_region_test's vcpu_worker: re-enter the guest on every MMIO read of the
    region (answering MMIO_VAL) and post ``ready`` on every SYNC; stop on anything else."""

    def __init__(self, g: GuestVm) -> None:
        self.g = g
        self.ready = threading.Semaphore(0)
        # MMIO reads answered since the last SYNC (wait_mmio()).
        self._mmio = threading.Condition()
        self._mmio_since_sync = 0

    def __call__(self, vcpu: Vcpu) -> Ucall | Exit:
        while True:
            r = self.g.run(vcpu, 120.0)
            if isinstance(r, Exit):
                if r.reason != ExitReason.MMIO or r.mmio is None:
                    return r
                m = r.mmio
                if m.is_write or m.len != 8 or m.phys_addr != MEM_REGION_GPA:
                    raise UnexpectedExit(r, f"unexpected MMIO exit {r}: expected an 8-byte read "
                                            f"of {MEM_REGION_GPA:#x}")
                vcpu.run_struct.exit.mmio.data[:8] = list(struct.pack("<Q", MMIO_VAL))
                with self._mmio:
                    self._mmio_since_sync += 1
                    self._mmio.notify_all()
                continue
            if r.cmd != UcallCmd.SYNC:
                return r
            with self._mmio:
                self._mmio_since_sync = 0
            self.ready.release()

    def wait(self) -> None:
        """wait_for_vcpu(): a SYNC within the budget, then let the vCPU re-enter the guest."""
        assert self.ready.acquire(timeout=SYNC_TIMEOUT), \
            f"the guest did not SYNC within {SYNC_TIMEOUT:.0f} s"
        time.sleep(0.1)

    def wait_mmio(self) -> None:
        """An MMIO read of the region since the last SYNC: the guest is past it, spinning on
        the deleted region (the 0.1 s of wait() is not always enough in a loaded TCG VM)."""
        with self._mmio:
            assert self._mmio.wait_for(lambda: self._mmio_since_sync > 0, SYNC_TIMEOUT), \
                f"no MMIO read of the region within {SYNC_TIMEOUT:.0f} s after the SYNC"


def _quirk(vm: Vm, zap_all: bool) -> None:
    if zap_all:
        return
    quirks = vm.check_extension(Cap.DISABLE_QUIRKS2)
    if not quirks & Quirk.SLOT_ZAP_ALL:
        pytest.skip(f"KVM_X86_QUIRK_SLOT_ZAP_ALL not in KVM_CAP_DISABLE_QUIRKS2={quirks:#x} on "
                    f"{where(vm)}")
    vm.enable_cap(Cap.DISABLE_QUIRKS2, int(Quirk.SLOT_ZAP_ALL))


def _spawn(kvm: Kvm, entry: str,
           zap_all: bool) -> tuple[GuestVm, Vcpu, Worker, MemRegion, VcpuThread]:
    g = GuestVm(kvm, "memslots_vcpu", timeout=60.0)
    try:
        _quirk(g.vm, zap_all)
        region = g.add_memory(MEM_REGION_SIZE, gpa=MEM_REGION_GPA, slot=MEM_REGION_SLOT,
                              backing="thp")
        vcpu = g.vcpu(entry, MEM_REGION_GPA)
        w = Worker(g)
        t = g.start(vcpu, w)
        w.wait()
    except BaseException:
        g.close()
        raise
    return g, vcpu, w, region, t


QUIRK = pytest.mark.parametrize("zap_all", [True, False], ids=["slot_zap_quirk", "no_slot_zap"])


@QUIRK
@pytest.mark.parametrize("loop", range(2), ids=["first", "second"])
def test_move_memory_region(kvm: Kvm, zap_all: bool, loop: int) -> None:
    """Move the region to gpa - 4K while the guest spins on it (it must never see the "2"
    written at the misaligned hva), write "1", move it back: the guest sees 1
    (test_move_memory_region)."""
    g, _, w, region, t = _spawn(kvm, "guest_move_region", zap_all)
    try:
        assert region.backing is not None
        hva = region.backing.mapping
        flags, addr = region.flags, region.userspace_addr
        g.vm.set_user_memory_region(MEM_REGION_SLOT, flags, MEM_REGION_GPA - 4096,
                                    MEM_REGION_SIZE, addr)
        hva.write(0, struct.pack("<Q", 2))
        time.sleep(0.1)
        hva.write(0, struct.pack("<Q", 1))
        g.vm.set_user_memory_region(MEM_REGION_SLOT, flags, MEM_REGION_GPA, MEM_REGION_SIZE,
                                    addr)
        w.wait()
        w.wait()
        [end] = g.join([t], timeout=60.0)
        assert getattr(end, "cmd", None) == UcallCmd.DONE, f"guest ended with {end}"
    finally:
        g.close()


@QUIRK
@pytest.mark.parametrize("loop", range(2), ids=["first", "second"])
def test_delete_memory_region(kvm: Kvm, zap_all: bool, loop: int) -> None:
    """Delete the region (guest reads MMIO), recreate it (reads 0), delete it again, then delete
    slot 0 under the spinning guest: KVM_EXIT_SHUTDOWN or KVM_EXIT_INTERNAL_ERROR, the latter
    with RIP inside the final spin loop (test_delete_memory_region)."""
    g, vcpu, w, region, t = _spawn(kvm, "guest_delete_region", zap_all)
    try:
        flags, addr = region.flags, region.userspace_addr
        g.vm.delete_memslot(MEM_REGION_SLOT)
        w.wait()
        g.vm.set_user_memory_region(MEM_REGION_SLOT, flags, MEM_REGION_GPA, MEM_REGION_SIZE,
                                    addr)
        w.wait()
        g.vm.delete_memslot(MEM_REGION_SLOT)
        w.wait()
        # Upstream deletes slot 0 right after this SYNC and relies on the vCPU having reached
        # the final loop; wait until its first MMIO read there (a loaded TCG VM is slow to
        # re-enter the guest).
        w.wait_mmio()
        start = struct.unpack("<Q", g.read_phys(g.symbol("final_rip_start"), 8))[0]
        end_rip = struct.unpack("<Q", g.read_phys(g.symbol("final_rip_end"), 8))[0]
        g.vm.delete_memslot(0)
        [ex] = g.join([t], timeout=60.0)
        assert isinstance(ex, Exit) and ex.reason in (ExitReason.SHUTDOWN,
                                                      ExitReason.INTERNAL_ERROR), \
            f"deleting slot 0 under the guest: {ex}, expected KVM_EXIT_SHUTDOWN or " \
            "KVM_EXIT_INTERNAL_ERROR"
        if ex.reason == ExitReason.INTERNAL_ERROR:
            rip = vcpu.get_regs().rip
            assert start <= rip < end_rip, \
                f"RIP {rip:#x} outside the final spin loop [{start:#x}, {end_rip:#x})"
    finally:
        g.close()
