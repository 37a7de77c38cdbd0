"""KVM ioctl request numbers, computed with ioctl-opt from (direction, type, nr, struct).

The numbers are pinned against include/uapi/linux/kvm.h values in tests/test_uapi_layout.py.
"""

from __future__ import annotations

import ctypes
import enum

from ioctl_opt import IO, IOR, IOW, IOWR

from . import structs as s
from .constants import KVMIO


def _sized(n: int) -> type[ctypes.Array[ctypes.c_uint8]]:
    """A stand-in type of ``n`` bytes for _IOW(..., u64) style definitions."""
    return ctypes.c_uint8 * n


class Ioctl(enum.IntEnum):
    """Every KVM ioctl kvmpy issues; the member name is the kernel's KVM_* name."""

    # /dev/kvm
    KVM_GET_API_VERSION = IO(KVMIO, 0x00)
    KVM_CREATE_VM = IO(KVMIO, 0x01)
    KVM_CHECK_EXTENSION = IO(KVMIO, 0x03)
    KVM_GET_VCPU_MMAP_SIZE = IO(KVMIO, 0x04)
    KVM_GET_SUPPORTED_CPUID = IOWR(KVMIO, 0x05, s.kvm_cpuid2)
    # VM fd
    KVM_CREATE_VCPU = IO(KVMIO, 0x41)
    KVM_SET_NR_MMU_PAGES = IO(KVMIO, 0x44)
    KVM_SET_USER_MEMORY_REGION = IOW(KVMIO, 0x46, s.kvm_userspace_memory_region)
    KVM_SET_TSS_ADDR = IO(KVMIO, 0x47)
    KVM_SET_IDENTITY_MAP_ADDR = IOW(KVMIO, 0x48, _sized(8))
    KVM_SET_USER_MEMORY_REGION2 = IOW(KVMIO, 0x49, s.kvm_userspace_memory_region2)
    KVM_CREATE_IRQCHIP = IO(KVMIO, 0x60)
    KVM_ENABLE_CAP = IOW(KVMIO, 0xA3, s.kvm_enable_cap)
    KVM_GET_STATS_FD = IO(KVMIO, 0xCE)
    KVM_SET_MEMORY_ATTRIBUTES = IOW(KVMIO, 0xD2, s.kvm_memory_attributes)
    KVM_CREATE_GUEST_MEMFD = IOWR(KVMIO, 0xD4, s.kvm_create_guest_memfd)
    # vCPU fd
    KVM_RUN = IO(KVMIO, 0x80)
    KVM_GET_REGS = IOR(KVMIO, 0x81, s.kvm_regs)
    KVM_SET_REGS = IOW(KVMIO, 0x82, s.kvm_regs)
    KVM_GET_SREGS = IOR(KVMIO, 0x83, s.kvm_sregs)
    KVM_SET_SREGS = IOW(KVMIO, 0x84, s.kvm_sregs)
    KVM_GET_MSRS = IOWR(KVMIO, 0x88, s.kvm_msrs)
    KVM_SET_MSRS = IOW(KVMIO, 0x89, s.kvm_msrs)
    KVM_SET_SIGNAL_MASK = IOW(KVMIO, 0x8B, s.kvm_signal_mask)
    KVM_SET_CPUID2 = IOW(KVMIO, 0x90, s.kvm_cpuid2)
    KVM_GET_CPUID2 = IOWR(KVMIO, 0x91, s.kvm_cpuid2)
    KVM_GET_MP_STATE = IOR(KVMIO, 0x98, s.kvm_mp_state)
    KVM_SET_MP_STATE = IOW(KVMIO, 0x99, s.kvm_mp_state)
    KVM_SMI = IO(KVMIO, 0xB7)
    KVM_PRE_FAULT_MEMORY = IOWR(KVMIO, 0xD5, s.kvm_pre_fault_memory)

    @classmethod
    def name_of(cls, request: int) -> str:
        try:
            return cls(request).name
        except ValueError:
            return f"ioctl({request:#x})"
