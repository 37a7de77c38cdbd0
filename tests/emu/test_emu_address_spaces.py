"""Memslot address spaces on the emulated KVM (issue 12): KVM_CAP_MULTI_ADDRESS_SPACE answers
KVM_MAX_NR_ADDRESS_SPACES (2, x86 with CONFIG_KVM_SMM) on /dev/kvm and
kvm_arch_nr_memslot_as_ids() on a VM (1 with private memory, else 2), as real 6.12 and 7.3
do; __kvm_set_memory_region() takes as_id from slot bits 16+ and refuses as_id >= that count
(EINVAL); each address space has its own memslot set, so ids and GPA ranges are per address
space (kvm_check_memslot_overlap()). A vCPU outside SMM uses address space 0 only
(kvm_arch_vcpu_memslots_id()); only in SMM does it use address space 1 (selftests/test_smm.py)."""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest

from kvmpy import Kvm
from kvmpy.backend.emu import EmuBackend
from kvmpy.backend.emu.x86.fakevm import (
    CODE,
    LOW_SIZE,
    STACK_TOP,
    asm,
    build_low_memory,
    long_mode_sregs,
)
from kvmpy.memory import SharedMemory
from kvmpy.uapi import Cap, ExitReason, VmType, kvm_regs

AS1 = 1 << 16
GIB4 = 1 << 32


@pytest.fixture(params=["upstream", "7.3", "6.12"])
def ekvm(request: pytest.FixtureRequest) -> Iterator[Kvm]:
    with Kvm(EmuBackend(profile=request.param)) as k:
        yield k


def test_multi_address_space_answers(ekvm: Kvm) -> None:
    """As real 6.12 and 7.3 (kvm_amd, CONFIG_KVM_SMM) answer: selftests/test_smm.py runs there
    and on these profiles."""
    assert (ekvm.check_extension(Cap.MULTI_ADDRESS_SPACE), ekvm.check_extension(Cap.X86_SMM)) \
        == (2, 1)
    with ekvm.create_vm(VmType.DEFAULT) as d, ekvm.create_vm(VmType.SW_PROTECTED) as sw:
        assert (d.check_extension(Cap.MULTI_ADDRESS_SPACE), d.check_extension(Cap.X86_SMM)) \
            == (2, 1)
        assert (sw.check_extension(Cap.MULTI_ADDRESS_SPACE), sw.check_extension(Cap.X86_SMM)) \
            == (1, 1)


def test_address_space_one_memslots(ekvm: Kvm) -> None:
    with ekvm.create_vm(VmType.DEFAULT) as vm, SharedMemory(ekvm.backend, 1 << 20) as mem:
        h = mem.addr
        assert vm.try_set_user_memory_region(0, 0, GIB4, 0x10000, h) == 0
        # The same id and the same GPAs in address space 1: a separate memslot set.
        assert vm.try_set_user_memory_region(AS1 | 0, 0, GIB4, 0x10000, h + 0x10000) == 0
        # Overlap is checked within address space 1 ...
        assert vm.try_set_user_memory_region(AS1 | 1, 0, GIB4 + 0x1000, 0x1000, h) \
            == errno.EEXIST
        assert vm.try_set_user_memory_region(AS1 | 1, 0, 2 * GIB4, 0x1000, h) == 0
        # ... and as_id 2 does not exist.
        assert vm.try_set_user_memory_region(2 << 16, 0, 0, 0x1000, h) == errno.EINVAL
        # Deleting the address-space-1 slot leaves slot 0 of address space 0.
        assert vm.try_set_user_memory_region(AS1 | 0, 0, GIB4, 0, 0) == 0
        assert vm.try_set_user_memory_region(AS1 | 0, 0, GIB4, 0, 0) == errno.EINVAL
        assert vm.try_set_user_memory_region(5, 0, GIB4 + 0x1000, 0x1000, h) == errno.EEXIST


def test_private_memory_vm_has_one_address_space(ekvm: Kvm) -> None:
    with ekvm.create_vm(VmType.SW_PROTECTED) as vm, SharedMemory(ekvm.backend, 1 << 20) as mem:
        assert vm.try_set_user_memory_region(AS1, 0, GIB4, 0x1000, mem.addr) == errno.EINVAL


def test_vcpu_sees_only_address_space_zero() -> None:
    """Outside SMM a guest read of a GPA only an address-space-1 memslot covers is MMIO: the
    vCPU resolves GPAs in address space 0."""
    with Kvm(EmuBackend()) as kvm, kvm.create_vm(0) as vm:
        low = SharedMemory(kvm.backend, LOW_SIZE)
        smram = SharedMemory(kvm.backend, 0x10000)
        try:
            src = f"mov rax, {GIB4}\nmov rbx, [rax]\nhlt"

            class _View:
                def write(self, off: int, data: bytes) -> None:
                    low.mapping.write(off, data)

            build_low_memory(_View(), asm(src, CODE))  # type: ignore[arg-type]
            vm.set_user_memory_region(0, 0, 0, LOW_SIZE, low.addr)
            smram.mapping.write(0, b"\x11" * 8)
            vm.set_user_memory_region(AS1 | 1, 0, GIB4, 0x10000, smram.addr)
            v = vm.create_vcpu(0)
            v.set_sregs(long_mode_sregs())
            r = kvm_regs()
            r.rip, r.rsp, r.rflags = CODE, STACK_TOP, 2
            v.set_regs(r)
            ex = v.run()
            assert ex.reason == ExitReason.MMIO and ex.mmio is not None
            assert (ex.mmio.phys_addr, ex.mmio.is_write) == (GIB4, False)
        finally:
            vm.close()
            low.close()
            smram.close()
