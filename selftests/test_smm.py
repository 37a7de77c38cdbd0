"""SMM: an SMI taken on the next KVM_RUN, the handler at SMBASE + 0x8000 in address space 1, RSM
back to the interrupted guest (tools/testing/selftests/kvm/x86/smm_test.c, without the nested
part and with KVM_SMI instead of a self-IPI).

arch/x86/kvm/smm.c enter_smm(): the state is saved at SMBASE + 0xFE00 in struct
kvm_smram_state_64 (smm.h; the guest CPUID has long mode), then the vCPU runs in big real mode:
CS base SMBASE, RIP 0x8000, CR0 without PE/PG, CR4 and EFER 0; its memory is the address-space-1
memslots (kvm_arch_vcpu_memslots_id()). RSM (em_rsm() -> emulator_leave_smm()) restores the
saved state, so registers the handler changed come back. MSR_IA32_SMBASE is written by
userspace only (KVM_SET_MSRS). Skips where KVM_CAP_X86_SMM is 0 (this host's kvm_pvm).
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator

import pytest

from kvmpy.backend.emu.x86.fakevm import (
    CODE,
    LOW_SIZE,
    STACK_TOP,
    asm,
    build_low_memory,
    long_mode_sregs,
)
from kvmpy.memory import SharedMemory
from kvmpy.system import Kvm
from kvmpy.testing.require import require_cap
from kvmpy.uapi import Cap, ExitReason, IoDirection, kvm_regs
from kvmpy.vcpu import Vcpu

pytestmark = pytest.mark.guest

SMRAM_GPA, SMRAM_SIZE = 0x1000000, 0x10000
SMRAM_MEMSLOT = (1 << 16) | 1          # address space 1, slot 1 (as smm_test.c)
MSR_IA32_SMBASE = 0x9E
SYNC_PORT, SMRAM_STAGE, DONE = 0xE, 0xFE, 0xFF

# Real-mode handler (mode-independent bytes, as smm_test.c's, plus a change to BL that RSM must
# undo): mov al, SMRAM_STAGE; mov bl, 0x55; in al, SYNC_PORT; rsm
SMI_HANDLER = bytes([0xB0, SMRAM_STAGE, 0xB3, 0x55, 0xE4, SYNC_PORT, 0x0F, 0xAA])

GUEST = f"""
    mov rbx, 0x1122334455667788
    mov r12, 0xC0FFEE
    mov al, 1
    in al, {SYNC_PORT}
    mov al, 2
    in al, {SYNC_PORT}
    mov al, {DONE}
    in al, {SYNC_PORT}
    hlt
"""
# Assembled at import (host collection fills asm()'s cache: a VM run assembles nothing).
GUEST_CODE = asm(GUEST, CODE)
RDMSR_SMBASE_CODE = asm(f"mov ecx, {MSR_IA32_SMBASE}\nrdmsr\nhlt", CODE)


class _Low:
    def __init__(self, mem: SharedMemory) -> None:
        self.mem = mem

    def write(self, off: int, data: bytes) -> None:
        self.mem.mapping.write(off, data)


@contextlib.contextmanager
def _smm_vcpu(kvm: Kvm, handler: bytes) -> Iterator[tuple[Vcpu, SharedMemory]]:
    """smm_test.c's setup: guest code in address space 0, SMRAM (address space 1) with the
    handler at +0x8000, SMBASE moved there, the vCPU in long mode at the guest code; yields
    (the vCPU, SMRAM) and closes the VM before its memory."""
    require_cap(kvm, Cap.X86_SMM)
    with kvm.create_vm(0) as vm:
        require_cap(vm, Cap.MULTI_ADDRESS_SPACE, 2)
        low = SharedMemory(kvm.backend, LOW_SIZE)
        smram = SharedMemory(kvm.backend, SMRAM_SIZE)
        try:
            build_low_memory(_Low(low), GUEST_CODE)  # type: ignore[arg-type]
            vm.set_user_memory_region(0, 0, 0, LOW_SIZE, low.addr)
            vm.set_user_memory_region(SMRAM_MEMSLOT, 0, SMRAM_GPA, SMRAM_SIZE, smram.addr)
            smram.mapping.write(0x8000, handler)
            vcpu = vm.create_vcpu(0)
            vcpu.set_cpuid2(kvm.get_supported_cpuid())
            assert vcpu.get_msrs([MSR_IA32_SMBASE]) == [0x30000]      # kvm_vcpu_reset()
            vcpu.set_msrs({MSR_IA32_SMBASE: SMRAM_GPA})
            vcpu.set_sregs(long_mode_sregs())
            r = kvm_regs()
            r.rip, r.rsp, r.rflags = CODE, STACK_TOP, 2
            vcpu.set_regs(r)
            yield vcpu, smram
        finally:
            vm.close()
            low.close()
            smram.close()


def _stage(kvm: Kvm, vcpu: Vcpu) -> int:
    ex = vcpu.run()
    assert ex.reason == ExitReason.IO and ex.io is not None, ex
    assert ex.io.direction == IoDirection.IN and ex.io.port == SYNC_PORT, ex
    return int(vcpu.get_regs().rax) & 0xFF


def test_smi_handler_runs_in_smram_and_rsm_resumes(kvm: Kvm) -> None:
    with _smm_vcpu(kvm, SMI_HANDLER) as (vcpu, smram):
        assert _stage(kvm, vcpu) == 1
        vcpu.smi()
        # The IN completes first, then the SMI is taken: the handler's IN exits in SMM.
        assert _stage(kvm, vcpu) == SMRAM_STAGE
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        assert (regs.rip, regs.rbx & 0xFF, regs.r12) == (0x8004, 0x55, 0xC0FFEE)
        assert (sregs.cs.base, sregs.cs.selector) == (SMRAM_GPA, (SMRAM_GPA >> 4) & 0xFFFF)
        assert (sregs.cr0 & 0x80000001, sregs.cr4, sregs.efer) == (0, 0, 0)
        save = smram.mapping.read(0xFE00, 512)
        revision, smbase = struct.unpack_from("<II", save, 0xFC)
        saved_rip, = struct.unpack_from("<Q", save, 0x178)
        saved_rbx, = struct.unpack_from("<Q", save, 0x180 + 8 * (15 - 3))
        saved_efer, = struct.unpack_from("<Q", save, 0xD0)
        assert (revision, smbase) == (0x00020064, SMRAM_GPA)
        assert saved_rbx == 0x1122334455667788 and saved_efer & 0xD00 == 0xD00
        # RSM resumes after the stage-1 IN with the saved registers.
        assert _stage(kvm, vcpu) == 2
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        assert regs.rip == saved_rip + 2          # the stage-2 IN follows "mov al, 2"
        assert (regs.rbx, regs.r12) == (0x1122334455667788, 0xC0FFEE)
        assert (sregs.cs.base, sregs.cs.selector, sregs.efer & 0x500) == (0, 8, 0x500)
        assert _stage(kvm, vcpu) == DONE


# Handler that edits the save area: the low dword of the saved RBX (gprs[15 - VCPU_REGS_RBX])
# through DS base 0 with a 32-bit address (big real mode: 4 GiB limits), then RSM.
SAVED_RBX = SMRAM_GPA + 0xFE00 + 0x180 + 8 * 12
EDIT_HANDLER = (bytes([0x66, 0xB8]) + struct.pack("<I", 0x600DF00D)        # mov eax, imm32
                + bytes([0x67, 0x66, 0xA3]) + struct.pack("<I", SAVED_RBX)  # mov [addr32], eax
                + bytes([0x0F, 0xAA]))                                      # rsm


def test_rsm_loads_the_state_save_area(kvm: Kvm) -> None:
    """rsm_load_state_64() reads the registers back from SMRAM: a handler's change to the saved
    RBX is what the guest sees after RSM (the handler's own EAX is not)."""
    with _smm_vcpu(kvm, EDIT_HANDLER) as (vcpu, _):
        assert _stage(kvm, vcpu) == 1
        vcpu.smi()
        assert _stage(kvm, vcpu) == 2
        regs = vcpu.get_regs()
        assert (regs.rbx, regs.r12) == (0x11223344600DF00D, 0xC0FFEE)


def test_smbase_is_userspace_only(kvm: Kvm) -> None:
    """kvm_get/set_msr_common(): MSR_IA32_SMBASE only with host_initiated: the guest's RDMSR
    is #GP; here the guest has no IDT, so the #GP shuts the vCPU down."""
    require_cap(kvm, Cap.X86_SMM)
    with kvm.create_vm(0) as vm:
        low = SharedMemory(kvm.backend, LOW_SIZE)
        try:
            build_low_memory(_Low(low), RDMSR_SMBASE_CODE)  # type: ignore[arg-type]
            vm.set_user_memory_region(0, 0, 0, LOW_SIZE, low.addr)
            vcpu = vm.create_vcpu(0)
            vcpu.set_cpuid2(kvm.get_supported_cpuid())
            vcpu.set_sregs(long_mode_sregs(idt_limit=0))
            r = kvm_regs()
            r.rip, r.rsp, r.rflags = CODE, STACK_TOP, 2
            vcpu.set_regs(r)
            assert vcpu.run().reason == ExitReason.SHUTDOWN
        finally:
            vm.close()
            low.close()
