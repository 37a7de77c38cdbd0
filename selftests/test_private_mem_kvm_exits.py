"""private_mem_kvm_exits_test (tools/testing/selftests/kvm/x86/private_mem_kvm_exits_test.c), in kvmpy.

Guest: guests/private_mem_kvm_exits.c. Pins KVM_EXIT_MEMORY_FAULT (Documentation/virt/kvm/
api.rst 5. "KVM_EXIT_MEMORY_FAULT", KVM_CAP_MEMORY_FAULT_INFO): a private access KVM cannot
serve makes KVM_RUN return -1 with errno EFAULT and kvm_run filled with exit_reason
KVM_EXIT_MEMORY_FAULT, memory_fault.flags = KVM_MEMORY_EXIT_FLAG_PRIVATE, the faulting page's
gpa and size 4096 - both when the gfn's memslot has no guest_memfd and when the memslot is
deleted while the vCPU is reading it (the gfn stays private: attributes belong to the VM, not
to the slot; api.rst 4.140 KVM_SET_MEMORY_ATTRIBUTES).
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Iterator

import pytest

from kvmpy.guest import GuestVm, UcallCmd
from kvmpy.system import Kvm
from kvmpy.testing.errnos import expect_errno
from kvmpy.testing.private_mem import require_private_mem
from kvmpy.uapi import PAGE_SIZE, ExitReason, MemoryExitFlag, VmType
from kvmpy.vcpu import Exit, Vcpu

pytestmark = pytest.mark.guest

EXITS_TEST_GPA = 0xC000_0000     # GVA == GPA
EXITS_TEST_SLOT = 10


def assert_private_fault(ex: Exit | object, gpa: int = EXITS_TEST_GPA) -> None:
    """The C test's run_vcpu_get_exit_reason + its asserts on kvm_run.memory_fault."""
    assert isinstance(ex, Exit), f"expected KVM_EXIT_MEMORY_FAULT, got ucall {ex}"
    assert ex.reason == ExitReason.MEMORY_FAULT, f"expected KVM_EXIT_MEMORY_FAULT, got {ex}"
    assert ex.errno == errno.EFAULT, \
        f"KVM_RUN must fail with EFAULT on a memory fault, got errno {ex.errno}"
    mf = ex.memory_fault
    assert mf is not None
    assert mf.flags == MemoryExitFlag.PRIVATE, \
        f"memory_fault.flags {mf.flags:#x}, expected KVM_MEMORY_EXIT_FLAG_PRIVATE (0x8)"
    assert mf.gpa == gpa, f"memory_fault.gpa {mf.gpa:#x}, expected {gpa:#x}"
    assert mf.size == PAGE_SIZE, f"memory_fault.size {mf.size:#x}, expected {PAGE_SIZE:#x}"


@pytest.fixture
def g(kvm: Kvm) -> Iterator[GuestVm]:
    require_private_mem(kvm, hypercall_exit=False)
    with GuestVm(kvm, "private_mem_kvm_exits", vm_type=VmType.SW_PROTECTED,
                 timeout=20.0) as gvm:
        yield gvm


@pytest.mark.parametrize("when", ["at_once", "while_spinning"])
def test_private_access_memslot_deleted(g: GuestVm, when: str, kvm: Kvm,
                                        request: pytest.FixtureRequest) -> None:
    """A vCPU thread reads a private page of a guest_memfd slot; the main thread deletes the
    slot. ``at_once``: deleted right after the thread starts, as the C test does (the vCPU may
    or may not have read the page yet: the outcome is the same). ``while_spinning``: deleted
    once the guest has SYNCed and is spinning on the (then mapped) private page, so KVM must
    zap the live mapping."""
    mem = g.add_memory(PAGE_SIZE, gpa=EXITS_TEST_GPA, slot=EXITS_TEST_SLOT,
                       backing="anonymous", gmem=True)
    g.vm.set_private(mem.gpa, PAGE_SIZE)
    entry = "guest_repeatedly_read" if when == "at_once" else "guest_sync_then_read"
    vcpu = g.vcpu(entry, mem.gpa)
    running = threading.Event()

    def run(v: Vcpu) -> object:
        if when == "while_spinning":
            uc = g.run(v)
            assert not isinstance(uc, Exit) and uc.cmd == UcallCmd.SYNC, uc
            running.set()
        return g.run(v)

    t = g.start(vcpu, run)
    if when == "while_spinning":
        assert running.wait(20.0), "the guest never reached its SYNC"
        time.sleep(0.05)         # the guest is now looping over its private read
    g.vm.delete_memslot(EXITS_TEST_SLOT)
    (ex,) = g.join([t])
    assert_private_fault(ex)


def test_private_access_memslot_not_private(g: GuestVm) -> None:
    """A private gfn in a memslot without KVM_MEM_GUEST_MEMFD: KVM has nowhere to take private
    memory from, so the access exits to userspace (KVM_RUN -1/EFAULT, MEMORY_FAULT PRIVATE)."""
    mem = g.add_memory(PAGE_SIZE, gpa=EXITS_TEST_GPA, slot=EXITS_TEST_SLOT,
                       backing="anonymous")
    assert mem.gmem is None
    g.vm.set_private(mem.gpa, PAGE_SIZE)
    vcpu = g.vcpu("guest_repeatedly_read", mem.gpa)
    ex = g.run(vcpu)
    assert_private_fault(ex)
    # Raw KVM_RUN view of the same fault: -1 with errno EFAULT, the exit still described.
    expect_errno(vcpu.try_run(), errno.EFAULT)
    assert vcpu.run_struct.exit_reason == ExitReason.MEMORY_FAULT
    assert vcpu.run_struct.exit.memory_fault.gpa == EXITS_TEST_GPA
