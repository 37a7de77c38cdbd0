"""Kernels before 6.8 have no KVM_SET_USER_MEMORY_REGION2 (KVM_CAP_USER_MEMORY2 = 0; the
ioctl is ENOTTY from kvm_vm_ioctl()'s default case): deleting a memslot and the model
harness's slot steps must use the v1 ioctl there (found on Debian's 6.1 in the VM stage)."""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest

from kvmpy.backend import IoctlArg
from kvmpy.backend.select import make_backend
from kvmpy.memory import SharedMemory
from kvmpy.model.harness import GPA_BASE, ModelHarness
from kvmpy.system import Kvm
from kvmpy.uapi import Cap, Ioctl, VmType


@pytest.fixture
def old_kvm() -> Iterator[Kvm]:
    """The emulated KVM answering like a pre-6.8 kernel for REGION2."""
    b = make_backend("emu")
    inner = b.ioctl

    def ioctl(fd: int, request: int, arg: IoctlArg = None) -> int:
        req = request & 0xFFFF_FFFF
        if req == Ioctl.KVM_SET_USER_MEMORY_REGION2:
            raise OSError(errno.ENOTTY, "no KVM_SET_USER_MEMORY_REGION2 before 6.8")
        if req == Ioctl.KVM_CHECK_EXTENSION and arg == Cap.USER_MEMORY2:
            return 0
        return inner(fd, request, arg)

    b.ioctl = ioctl  # type: ignore[method-assign]
    with Kvm(b) as k:
        yield k


def test_delete_memslot_uses_v1_without_region2(old_kvm: Kvm) -> None:
    with old_kvm.create_vm() as vm, SharedMemory(old_kvm.backend, 0x2000) as mem:
        assert not vm.has_region2()
        vm.set_user_memory_region(1, 0, GPA_BASE, 0x2000, mem.addr)
        vm.delete_memslot(1)
        # Gone: the same slot id takes another size (a live slot would refuse: EINVAL).
        vm.set_user_memory_region(1, 0, GPA_BASE, 0x1000, mem.addr)


def test_model_harness_slot_steps_without_region2(old_kvm: Kvm) -> None:
    with ModelHarness(old_kvm, VmType.DEFAULT) as h:
        h.set_slot(0, GPA_BASE, 0x2000)
        h.delete_slot(0)
        h.set_slot(0, GPA_BASE, 0x1000)
