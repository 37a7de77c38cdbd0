"""KVM_PRE_FAULT_MEMORY: progress, ENOENT past a memslot, validation, the private variant, and a
memslot deleted while pre-faulting.

Mirrors tools/testing/selftests/kvm/pre_fault_memory_test.c (6.12 and the newest upstream copy,
3d5e4894, with its racing delete_slot_worker): a 2 MiB + 4 KiB slot 10, pre-faulted as (0, 2M) ->
complete, (2M, 8K) -> one page then ENOENT with 4K left, (2M+4K, 4K) -> ENOENT at once, then the
guest reads every page and must reach UCALL_DONE. Variants as upstream: "shared" (per VM type
offered) and "private" (guest_memfd slot, range set PRIVATE: VM types whose
KVM_CAP_MEMORY_ATTRIBUTES has PRIVATE). Placements: 4 GiB and upstream's top of the GPA space.
Beyond upstream (the per-call contract without the race, the EINVAL table):
selftests/test_pre_fault_beyond.py, which imports Setup and _one from here.

Requires KVM_CAP_PRE_FAULT_MEMORY on the VM fd (x86: the TDP MMU). Behaviour sources:
Documentation/virt/kvm/api.rst 4.143 "KVM_PRE_FAULT_MEMORY" (gpa/size updated in place; returns 0
when at least one page was mapped, EINTR/EAGAIN to retry, ENOENT for a GPA without a memslot,
EINVAL for flags and invalid ranges); virt/kvm/kvm_main.c kvm_vcpu_pre_fault_memory();
arch/x86/kvm/mmu/mmu.c kvm_arch_vcpu_pre_fault_memory() / kvm_tdp_map_page() (RET_PF_EMULATE ->
-ENOENT).
"""

from __future__ import annotations

import errno
import struct
import threading
import time

import pytest

from kvmpy.guest import GuestVm, MemRegion
from kvmpy.guest.watchdog import WATCHDOG
from kvmpy.system import Kvm
from kvmpy.testing.errnos import (
    errname,
    expect_errno,
    memslot_accepts_guest_memfd,
    supported_attributes,
)
from kvmpy.testing.known_issues import hang_budget
from kvmpy.testing.require import require_cap, skip_missing, where
from kvmpy.uapi import PAGE_SIZE, Cap, MemoryAttribute, kvm_pre_fault_memory
from kvmpy.vcpu import Vcpu
from kvmpy.vm import Vm

P = PAGE_SIZE
M2 = 2 << 20
TEST_SIZE = M2 + P
TEST_NPAGES = TEST_SIZE // P
SLOT = 10
FILL = 0x5A
U64 = 2**64
# A pre-fault call racing a memslot deletion must return (api.rst 4.143: EAGAIN while the slot is
# going away); past this budget the watchdog interrupts it with a signal and the test fails.
RACE_CALL_BUDGET = 10.0


def _max_gpa_bits(kvm: Kvm) -> int:
    """Guest-physical address width from KVM_GET_SUPPORTED_CPUID 0x80000008: GuestPhysBits
    (EAX[23:16], when KVM reports a TDP limit) else MAXPHYADDR (EAX[7:0]); 36 if absent."""
    for e in kvm.get_supported_cpuid():
        if e.function == 0x8000_0008:
            return ((e.eax >> 16) & 0xFF) or (e.eax & 0xFF)
    return 36


def _base_gpa(kvm: Kvm, placement: str) -> int:
    if placement == "at_4g":
        return 1 << 32
    max_gfn = (1 << (_max_gpa_bits(kvm) - 12)) - 1
    return ((max_gfn - TEST_NPAGES) * P) & ~(M2 - 1)


class Setup:
    """A GuestVm with slot 10 at ``gpa`` (plus guest_memfd and PRIVATE for the private
    variant), and the vCPU that will read it."""

    def __init__(self, kvm: Kvm, vm_type: int, variant: str, placement: str) -> None:
        self.private = variant == "private"
        self.gpa = _base_gpa(kvm, placement)
        self.gva = self.gpa & ((1 << 47) - 1)
        self.g = GuestVm(kvm, "smoke", vm_type=vm_type, timeout=60.0)
        try:
            vm = self.g.vm
            require_cap(vm, Cap.PRE_FAULT_MEMORY)
            if self.private:
                attrs = supported_attributes(vm)
                if not attrs & MemoryAttribute.PRIVATE:
                    skip_missing(vm, "private_attributes",
                                 f"KVM_CAP_MEMORY_ATTRIBUTES={attrs:#x} (private variant needs "
                                 f"KVM_MEMORY_ATTRIBUTE_PRIVATE) on {where(vm)}")
                if not memslot_accepts_guest_memfd(vm):
                    pytest.skip(f"KVM_CAP_GUEST_MEMFD={vm.check_extension(Cap.GUEST_MEMFD):#x} "
                                f"(KVM_MEM_GUEST_MEMFD memslots) on {where(vm)}")
            self.region: MemRegion = self.g.add_memory(TEST_SIZE, gpa=self.gpa, slot=SLOT,
                                                       gmem=self.private, gva=self.gva)
            if self.private:
                vm.set_private(self.gpa, TEST_SIZE)
            self.vcpu = self.g.vcpu("guest_mem_rw", self.gva, TEST_SIZE, 0, FILL)
        except BaseException:
            self.g.close()
            raise

    @property
    def vm(self) -> Vm:
        return self.g.vm

    def delete_slot(self) -> None:
        self.vm.delete_memslot(SLOT)

    def recreate_slot(self) -> None:
        r = self.region
        self.vm.set_user_memory_region2(SLOT, r.flags, r.gpa, r.size, r.userspace_addr,
                                        r.gmem, r.gmem_offset)

    def guest_reads_every_page(self) -> None:
        """The upstream epilogue: the guest reads every page (first and last byte == 0), fills
        the range and reports a qword of the fill, then UCALL_DONE."""
        uc = self.g.expect_sync(self.vcpu)
        want = struct.unpack("<Q", bytes([FILL]) * 8)[0]
        assert uc.args[0] == want, f"guest read back {uc.args[0]:#x}, expected {want:#x}"
        self.g.expect_done(self.vcpu)


VARIANTS = ["shared", "private"]


@pytest.fixture(params=VARIANTS)
def variant(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _call(r: kvm_pre_fault_memory) -> str:
    return f"KVM_PRE_FAULT_MEMORY(gpa={r.gpa:#x}, size={r.size:#x}, flags={r.flags:#x})"


def _one(vcpu: Vcpu, r: kvm_pre_fault_memory) -> int:
    """One call, checking upstream's per-call invariant: size shrinks exactly on success, and
    gpa advances by what size lost."""
    prev_size, prev_gpa, what = r.size, r.gpa, _call(r)
    err = vcpu.try_pre_fault_memory(r)
    assert (r.size < prev_size) != (err != 0), (
        f"{what} -> {errname(err)} with size {prev_size:#x} -> {r.size:#x}: size must shrink "
        "exactly when the call succeeds")
    assert r.gpa - prev_gpa == prev_size - r.size, (
        f"{what}: gpa advanced by {r.gpa - prev_gpa:#x} but size shrank by {prev_size - r.size:#x}")
    return err


# --- upstream's flow: racing slot deletion, then the guest ---------------------------------------

def _pre_fault_racing(s: Setup, offset: int, size: int, left: int, budget: float) -> None:
    """pre_fault_memory() of the newest upstream test: a worker deletes slot 10 while this
    thread pre-faults, and recreates it when told; the first result (whatever the race gave:
    success, ENOENT or EAGAIN while the slot was gone) is followed by exactly one retry after
    recreation unless everything was already done; EINTR is always retried."""
    r = kvm_pre_fault_memory(gpa=s.gpa + offset, size=size)
    worker_ready, prefault_ready, recreate = (threading.Event() for _ in range(3))
    failure: list[BaseException] = []

    def worker() -> None:
        try:
            worker_ready.set()
            prefault_ready.wait()
            s.delete_slot()
            recreate.wait()
            s.recreate_slot()
        except BaseException as e:  # reported by the main thread
            failure.append(e)

    t = threading.Thread(target=worker, name="delete_slot_worker", daemon=True)
    t.start()
    worker_ready.wait()
    prefault_ready.set()
    recreated = False
    errs = []
    stuck = []
    try:
        while True:
            with WATCHDOG.watch(s.vcpu, time.monotonic() + budget) as w:
                call = _call(r)
                err = _one(s.vcpu, r)
            if w.fired:
                stuck.append(f"{call} -> {errname(err)} after {w.kicks} signal(s)")
            errs.append(err)
            if err == errno.EINTR:
                continue
            if not recreated:
                recreate.set()
                t.join(30)
                assert not t.is_alive(), "delete_slot_worker did not finish"
                recreated = True
                if failure:
                    raise failure[0]
                if r.size:
                    continue
            if not r.size or err:
                break
    finally:
        recreate.set()
        t.join(30)
    # Kernels before 6.18 spin in kvm_tdp_map_page() on the invalid slot while the deleting thread
    # waits for SRCU readers: a deadlock only a signal breaks (fixed by "KVM: x86/mmu: Return
    # -EAGAIN if userspace deletes/moves memslot during prefault", KVM x86 MMU changes for 6.18).
    assert not stuck, (f"KVM_PRE_FAULT_MEMORY did not return within {budget:.0f} s while "
                       f"delete_slot_worker deleted slot {SLOT} (pre-fault vs memslot-deletion "
                       f"deadlock): {'; '.join(stuck)}")
    assert r.size == left, (f"racing pre-fault of (+{offset:#x}, {size:#x}): "
                            f"{r.size:#x} bytes left, expected {left:#x}; "
                            f"calls gave {[errname(e) for e in errs]}")
    expect_errno(err, errno.ENOENT if left else 0,
                 f"racing pre-fault of (+{offset:#x}, {size:#x}): calls gave {[errname(e) for e in errs]}")


@pytest.mark.parametrize("placement", ["at_4g", "top_of_gpa_space"])
def test_pre_fault_memory(kvm: Kvm, vm_type: int, variant: str, placement: str,
                          make_vm: object, request: pytest.FixtureRequest) -> None:
    """pre_fault_memory_test end to end: (0, 2M) completes, (2M, 8K) leaves 4K after ENOENT,
    (2M+4K, 4K) leaves 4K after ENOENT, each with the slot deleted and recreated concurrently;
    then the guest reads every page of the slot and reaches UCALL_DONE (pre_fault_memory_test.c,
    newest upstream)."""
    s = Setup(kvm, vm_type, variant, placement)
    budget = hang_budget(request, kvm, RACE_CALL_BUDGET)  # before 6.18: the known deadlock
    try:
        _pre_fault_racing(s, 0, M2, 0, budget)
        _pre_fault_racing(s, M2, 2 * P, P, budget)
        _pre_fault_racing(s, TEST_SIZE, P, P, budget)
        s.guest_reads_every_page()
    finally:
        s.g.close()
