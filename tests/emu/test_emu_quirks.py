"""KVM_CAP_DISABLE_QUIRKS2 on the emulated KVM: the profile's quirk mask (x86.c
kvm_vm_ioctl_check_extension(): kvm_caps.supported_quirks) and KVM_ENABLE_CAP's validation
(x86.c kvm_vm_ioctl_enable_cap(): EINVAL for a bit outside the mask, bits accumulate)."""

from __future__ import annotations

import errno

import pytest

from kvmpy.backend.emu import EmuBackend
from kvmpy.errors import KvmError
from kvmpy.system import Kvm
from kvmpy.uapi import Cap, Quirk, VmType

VALID = 0xFFF   # 7.3.4 as measured in the CI VM; 6.12.117: bits 0-10 (KVM_X86_VALID_QUIRKS)
MASKS = {"upstream": VALID, "7.3": VALID, "6.12": 0x7FF}


@pytest.mark.parametrize("profile", sorted(MASKS))
def test_quirk_mask_per_profile(profile: str) -> None:
    kvm = Kvm(EmuBackend(profile=profile))
    assert kvm.check_extension(Cap.DISABLE_QUIRKS2) == MASKS[profile]
    for t in (VmType.DEFAULT, VmType.SW_PROTECTED):
        with kvm.create_vm(t) as vm:
            assert vm.check_extension(Cap.DISABLE_QUIRKS2) == MASKS[profile]


def test_enable_cap_validates_and_accumulates() -> None:
    kvm = Kvm(EmuBackend(profile="7.3"))
    with kvm.create_vm(VmType.DEFAULT) as vm:
        for bad in (1 << 12, 1 << 63, VALID | 1 << 20):
            with pytest.raises(KvmError) as e:
                vm.enable_cap(Cap.DISABLE_QUIRKS2, bad)
            assert e.value.errno == errno.EINVAL, bad
        vm.enable_cap(Cap.DISABLE_QUIRKS2, int(Quirk.SLOT_ZAP_ALL))
        vm.enable_cap(Cap.DISABLE_QUIRKS2, int(Quirk.FIX_HYPERCALL_INSN))
        emu_vm = kvm.backend.object_of(vm.fd)  # type: ignore[attr-defined]
        assert emu_vm.disabled_quirks == int(Quirk.SLOT_ZAP_ALL | Quirk.FIX_HYPERCALL_INSN)


# --- KVM_EXIT_INTERNAL_ERROR layouts (x86.c prepare_emulation_failure_exit()) ------------------

def test_reset_vector_without_memslot_is_emulation_failure() -> None:
    """A fresh vCPU (real mode, CS.base 0xffff0000 + RIP 0xfff0) with nothing at 0xfffffff0:
    INTERNAL_ERROR/EMULATION with flags 0 and the five exit-info words (ndata 6); with a
    memslot at the reset vector real mode is refused (EINVAL), as before."""
    from kvmpy.memory import anonymous
    from kvmpy.uapi import ExitReason, InternalSuberror
    kvm = Kvm(EmuBackend(profile="7.3"))
    with kvm.create_vm(VmType.DEFAULT) as vm:
        ex = vm.create_vcpu(0).run()
        assert ex.reason == ExitReason.INTERNAL_ERROR
        assert ex.internal is not None
        assert ex.internal.suberror == InternalSuberror.EMULATION
        assert tuple(ex.internal.data) == (0, 48, 0x184, 0, 0, 0)
    with kvm.create_vm(VmType.DEFAULT) as vm, anonymous(kvm.backend, 0x1000) as mem:
        vm.set_user_memory_region(0, 0, 0xFFFFF000, 0x1000, mem.addr)
        with pytest.raises(KvmError) as e:
            vm.create_vcpu(0).run()
        assert e.value.errno == errno.EINVAL
