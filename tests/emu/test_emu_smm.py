"""The emulated KVM's SMM edges (selftests/test_smm.py has the handler round trip on both
backends): KVM_SMI where the profile has no SMM (ENOTTY, smm.h kvm_inject_smi() without
CONFIG_KVM_SMM), an SMI kept pending across an immediate_exit run, the save area outside the
address-space-1 memslots (KVM kills the VM: EIO here), an exception in the handler (IDT limit 0:
triple fault, KVM_EXIT_SHUTDOWN) and KVM_SET_SREGS in SMM (refused: not modelled)."""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Iterator
from typing import Any

import pytest

from kvmpy import Kvm
from kvmpy.backend.emu import EmuBackend
from kvmpy.backend.emu.profiles import get_profile
from kvmpy.backend.emu.x86.fakevm import (
    CODE,
    LOW_SIZE,
    STACK_TOP,
    asm,
    build_low_memory,
    long_mode_sregs,
)
from kvmpy.errors import KvmError
from kvmpy.memory import SharedMemory
from kvmpy.uapi import Cap, ExitReason, kvm_regs

SMRAM, AS1 = 0x1000000, 1 << 16
GUEST = "mov al, 1\nin al, 0xe\nmov al, 2\nin al, 0xe\nhlt"


class Rig:
    def __init__(self, kvm: Kvm, handler: bytes | None, smram_slot: bool = True) -> None:
        self.vm = kvm.create_vm(0)
        self.low = SharedMemory(kvm.backend, LOW_SIZE)
        self.smram = SharedMemory(kvm.backend, 0x10000)
        low = self.low

        class _View:
            def write(self, off: int, data: bytes) -> None:
                low.mapping.write(off, data)

        build_low_memory(_View(), asm(GUEST, CODE))  # type: ignore[arg-type]
        self.vm.set_user_memory_region(0, 0, 0, LOW_SIZE, low.addr)
        if smram_slot:
            self.vm.set_user_memory_region(AS1 | 1, 0, SMRAM, 0x10000, self.smram.addr)
        if handler:
            self.smram.mapping.write(0x8000, handler)
        self.vcpu = self.vm.create_vcpu(0)
        self.vcpu.set_cpuid2(kvm.get_supported_cpuid())
        self.vcpu.set_msrs({0x9E: SMRAM})
        self.vcpu.set_sregs(long_mode_sregs())
        r = kvm_regs()
        r.rip, r.rsp, r.rflags = CODE, STACK_TOP, 2
        self.vcpu.set_regs(r)

    def close(self) -> None:
        self.vm.close()
        self.low.close()
        self.smram.close()


@pytest.fixture
def rig() -> Iterator[Any]:
    made: list[Rig] = []
    with Kvm(EmuBackend()) as kvm:
        def make(handler: bytes | None, **kw: Any) -> Rig:
            r = Rig(kvm, handler, **kw)
            made.append(r)
            return r
        yield make
        for r in made:
            r.close()


def test_no_smm_profile_refuses_smi_and_smbase() -> None:
    up = get_profile("upstream")
    nosmm = dataclasses.replace(
        up, system_caps={**up.system_caps, Cap.X86_SMM: 0},
        vm_caps={t: {**c, Cap.X86_SMM: 0} for t, c in up.vm_caps.items()})
    with Kvm(EmuBackend(profile=nosmm)) as kvm, kvm.create_vm(0) as vm:
        v = vm.create_vcpu(0)
        assert v.try_smi() == errno.ENOTTY
        with pytest.raises(KvmError, match="MSR 0x9e"):
            v.get_msrs([0x9E])


def test_smi_stays_pending_across_immediate_exit(rig: Any) -> None:
    r = rig(bytes([0xB0, 0xFE, 0xE4, 0x0E, 0x0F, 0xAA]))
    assert r.vcpu.run().reason == ExitReason.IO
    r.vcpu.smi()
    r.vcpu.complete_io()                      # immediate_exit: EINTR, no SMM entry yet
    assert r.vcpu.get_sregs().cs.base == 0
    assert r.vcpu.run().reason == ExitReason.IO
    assert r.vcpu.get_sregs().cs.base == SMRAM and r.vcpu.get_regs().rax & 0xFF == 0xFE


def test_save_area_outside_address_space_one_kills_the_vm(rig: Any) -> None:
    r = rig(None, smram_slot=False)
    assert r.vcpu.run().reason == ExitReason.IO
    r.vcpu.smi()
    assert r.vcpu.try_run() == errno.EIO


def test_exception_in_handler_is_a_triple_fault(rig: Any) -> None:
    r = rig(bytes([0x0F, 0x0B]))              # ud2
    assert r.vcpu.run().reason == ExitReason.IO
    r.vcpu.smi()
    assert r.vcpu.run().reason == ExitReason.SHUTDOWN


def test_set_sregs_in_smm_is_refused(rig: Any) -> None:
    r = rig(bytes([0xB0, 0xFE, 0xE4, 0x0E, 0x0F, 0xAA]))
    assert r.vcpu.run().reason == ExitReason.IO
    r.vcpu.smi()
    assert r.vcpu.run().reason == ExitReason.IO
    with pytest.raises(KvmError) as e:
        r.vcpu.set_sregs(long_mode_sregs())
    assert e.value.errno == errno.EINVAL
