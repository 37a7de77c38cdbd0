"""Memslot address spaces (virt/kvm/kvm_main.c __kvm_set_memory_region()): as_id is slot bits
16+, refused (EINVAL) at or above KVM_CAP_MULTI_ADDRESS_SPACE of the VM (x86 with
CONFIG_KVM_SMM: 2, or 1 for a VM with private memory; a kernel without the capability has one
address space); every address space has its own memslot set, so slot ids and GPA overlap
(EEXIST, kvm_check_memslot_overlap()) are per address space."""

from __future__ import annotations

import errno

from kvmpy.memory import SharedMemory
from kvmpy.uapi import Cap
from kvmpy.vm import Vm

GPA = 1 << 32


def test_as_id_limit_and_per_address_space_slots(vm: Vm) -> None:
    n = max(1, vm.check_extension(Cap.MULTI_ADDRESS_SPACE))
    with SharedMemory(vm.backend, 0x20000) as mem:
        h = mem.addr
        assert vm.try_set_user_memory_region(0, 0, GPA, 0x10000, h) == 0
        assert vm.try_set_user_memory_region(n << 16, 0, 2 * GPA, 0x1000, h) == errno.EINVAL
        if n < 2:
            return
        # The same id and GPA range in address space 1 is another memslot.
        assert vm.try_set_user_memory_region(1 << 16, 0, GPA, 0x10000, h + 0x10000) == 0
        assert vm.try_set_user_memory_region((1 << 16) | 2, 0, GPA + 0x8000, 0x1000, h) \
            == errno.EEXIST
        assert vm.try_set_user_memory_region(3, 0, GPA + 0x8000, 0x1000, h) == errno.EEXIST
        assert vm.try_set_user_memory_region(1 << 16, 0, GPA, 0, 0) == 0
        assert vm.try_set_user_memory_region((1 << 16) | 2, 0, GPA + 0x8000, 0x1000, h) == 0
