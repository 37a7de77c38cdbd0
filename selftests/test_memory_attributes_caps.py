"""KVM_CAP_MEMORY_ATTRIBUTES tells the truth: exactly the bits KVM_SET_MEMORY_ATTRIBUTES accepts.

No upstream selftest checks the capability against the ioctl (private_mem_* only require the
PRIVATE bit). virt/kvm/kvm_main.c (6.12 and 7.3 alike): kvm_vm_ioctl_check_extension_generic()
answers KVM_CAP_MEMORY_ATTRIBUTES with kvm_supported_mem_attributes(kvm), which is
KVM_MEMORY_ATTRIBUTE_PRIVATE for a NULL kvm (/dev/kvm) or a VM with kvm_arch_has_private_mem(),
else 0; kvm_vm_ioctl_set_mem_attributes() refuses any attribute bit outside the same function's
value with EINVAL. Both only exist with CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES: without it the
capability is 0 and the ioctl falls through to kvm_arch_vm_ioctl(), ENOTTY.

So, per VM type offered: the VM fd's value is the set of single bits the ioctl accepts (each of
bits 0..63 tried), the /dev/kvm value contains it, and the /dev/kvm value is 0 exactly when the
ioctl does not exist on the VM.
"""

from __future__ import annotations

import errno

from kvmpy.system import Kvm
from kvmpy.testing.errnos import expect_errno, expect_errnos
from kvmpy.testing.require import where
from kvmpy.uapi import PAGE_SIZE, Cap
from kvmpy.vm import Vm

GPA = 1 << 32  # no memslot needed: attributes are per gfn (kvm->mem_attr_array)


def _accepted_bits(vm: Vm) -> int:
    """Try each attribute bit alone on one page (clearing each one accepted); every refusal must
    be EINVAL or ENOTTY. Returns the accepted mask."""
    accepted, refused = 0, []
    for bit in range(64):
        err = vm.try_set_memory_attributes(GPA, PAGE_SIZE, 1 << bit)
        if err == 0:
            accepted |= 1 << bit
            expect_errno(vm.try_set_memory_attributes(GPA, PAGE_SIZE, 0), 0, "clearing")
        else:
            refused.append(err)
    expect_errnos(((e, (errno.EINVAL, errno.ENOTTY)) for e in refused), f"on {where(vm)}")
    return accepted


def test_vm_cap_is_the_accepted_set(vm: Vm) -> None:
    """KVM_CAP_MEMORY_ATTRIBUTES on the VM fd == the attribute bits KVM_SET_MEMORY_ATTRIBUTES
    accepts on that VM, bit by bit (kvm_supported_mem_attributes(kvm) answers both)."""
    cap = vm.check_extension(Cap.MEMORY_ATTRIBUTES)
    accepted = _accepted_bits(vm)
    assert accepted == cap, (f"KVM_CAP_MEMORY_ATTRIBUTES={cap:#x} on {where(vm)}, but "
                             f"KVM_SET_MEMORY_ATTRIBUTES accepts attribute bits {accepted:#x}")


def test_dev_kvm_cap_covers_the_vm(kvm: Kvm, vm: Vm) -> None:
    """/dev/kvm's KVM_CAP_MEMORY_ATTRIBUTES contains the VM fd's (kvm_supported_mem_attributes
    (NULL) is the widest answer), and it is 0 exactly when the VM has no KVM_SET_MEMORY_ATTRIBUTES
    (CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES off: ENOTTY from kvm_arch_vm_ioctl())."""
    sys_cap = kvm.check_extension(Cap.MEMORY_ATTRIBUTES)
    vm_cap = vm.check_extension(Cap.MEMORY_ATTRIBUTES)
    assert vm_cap & ~sys_cap == 0, (f"KVM_CAP_MEMORY_ATTRIBUTES: VM fd {vm_cap:#x} on {where(vm)} "
                                    f"has bits /dev/kvm ({sys_cap:#x}) does not")
    # Attributes 0 is always valid where the ioctl exists (nothing to refuse).
    expect_errno(vm.try_set_memory_attributes(GPA, PAGE_SIZE, 0), errno.ENOTTY if sys_cap == 0
                 else 0, f"/dev/kvm KVM_CAP_MEMORY_ATTRIBUTES={sys_cap:#x} on {where(vm)}")
