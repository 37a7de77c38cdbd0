"""The emulated /dev/kvm: API version, vCPU mmap size, supported CPUID, VM creation.

KVM_GET_SUPPORTED_CPUID (api.rst 4.46) describes the CPU the emulator runs guests on: an x86-64
CPU with long mode, NX, SSE2 and the KVM paravirt signature, and nothing the vCPU side does not
model (no XSAVE/AVX, no x2APIC, no APIC: the in-kernel irqchip is not emulated).
"""

from __future__ import annotations

import errno

from ...uapi import KVM_API_VERSION
from ...uapi.structs import KVM_CPUID_FLAG_SIGNIFCANT_INDEX
from .profiles import KVM_MAX_CPUID_ENTRIES, Profile

#: MAXPHYADDR of the emulated CPU: QEMU TCG (unicorn) treats higher PTE address bits as reserved.
CPU_PHYS_BITS = 40

CpuidEntry = tuple[int, int, int, int, int, int, int]  # function, index, flags, eax..edx

_GENU, _INEI, _NTEL = 0x756E6547, 0x49656E69, 0x6C65746E


def supported_cpuid(profile: Profile) -> list[CpuidEntry]:
    """The CPUID leaves KVM_GET_SUPPORTED_CPUID returns (function, index, flags, eax..edx)."""
    phys_bits = min(profile.max_gpa_bits, CPU_PHYS_BITS)
    leaf1_ecx = (1 << 0) | (1 << 9) | (1 << 13) | (1 << 19) | (1 << 20) | (1 << 23) | (1 << 31)
    leaf1_edx = sum(1 << b for b in (0, 2, 3, 4, 5, 6, 7, 8, 11, 12, 13, 14, 15, 16, 17, 19,
                                     23, 24, 25, 26))
    ext_edx = (1 << 11) | (1 << 20) | (1 << 29)   # SYSCALL, NX, LM (long mode)
    return [
        (0x0, 0, 0, 0x7, _GENU, _NTEL, _INEI),
        (0x1, 0, 0, 0x000306C3, 0, leaf1_ecx, leaf1_edx),
        (0x7, 0, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, 0, 0, 0, 0),
        # KVM's paravirt leaves: signature "KVMKVMKVM\0\0\0", no PV features offered.
        (0x40000000, 0, 0, 0x40000001, 0x4B4D564B, 0x564B4D56, 0x4D),
        (0x40000001, 0, 0, 0, 0, 0, 0),
        (0x80000000, 0, 0, 0x80000008, 0, 0, 0),
        (0x80000001, 0, 0, 0, 0, 1, ext_edx),                 # ECX: LAHF/SAHF in long mode
        (0x80000008, 0, 0, phys_bits | (48 << 8), 0, 0, 0),
    ]


def get_supported_cpuid(profile: Profile, nent: int) -> list[CpuidEntry]:
    """kvm_dev_ioctl_get_cpuid(): E2BIG when nent is 0 or too small; nent is capped at
    KVM_MAX_CPUID_ENTRIES first."""
    entries = supported_cpuid(profile)
    if nent < 1:
        raise OSError(errno.E2BIG, "kvm_cpuid2.nent must be >= 1")
    if min(nent, KVM_MAX_CPUID_ENTRIES) < len(entries):
        raise OSError(errno.E2BIG, f"kvm_cpuid2.nent {nent} < {len(entries)} entries")
    return entries


class EmuSystem:
    """An open emulated /dev/kvm."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile

    def api_version(self) -> int:
        return KVM_API_VERSION
