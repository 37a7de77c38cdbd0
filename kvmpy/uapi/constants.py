"""Named KVM constants (x86_64), mirroring include/uapi/linux/kvm.h,
arch/x86/include/uapi/asm/kvm.h and include/uapi/linux/kvm_para.h.

Everything is an IntEnum/IntFlag so that values print by name in test output.
"""

from __future__ import annotations

import enum

PAGE_SIZE = 4096
PAGE_SHIFT = 12
KVM_API_VERSION = 12
KVMIO = 0xAE


class ExitReason(enum.IntEnum):
    """kvm_run.exit_reason (include/uapi/linux/kvm.h, KVM_EXIT_*)."""

    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    NMI = 16
    INTERNAL_ERROR = 17
    SYSTEM_EVENT = 24
    IOAPIC_EOI = 26
    HYPERV = 27
    X86_RDMSR = 29
    X86_WRMSR = 30
    DIRTY_RING_FULL = 31
    X86_BUS_LOCK = 33
    XEN = 34
    NOTIFY = 37
    MEMORY_FAULT = 39
    TDX = 40
    ARM_SEA = 41

    @classmethod
    def name_of(cls, value: int) -> str:
        try:
            return cls(value).name
        except ValueError:
            return f"UNKNOWN_EXIT_{value}"


class IoDirection(enum.IntEnum):
    IN = 0
    OUT = 1


class InternalSuberror(enum.IntEnum):
    EMULATION = 1
    SIMUL_EX = 2
    DELIVERY_EV = 3
    UNEXPECTED_EXIT_REASON = 4


class Cap(enum.IntEnum):
    """KVM_CAP_* numbers for KVM_CHECK_EXTENSION."""

    IRQCHIP = 0
    HLT = 1
    USER_MEMORY = 3
    SET_TSS_ADDR = 4
    EXT_CPUID = 7
    NR_VCPUS = 9
    NR_MEMSLOTS = 10
    SYNC_MMU = 16
    GET_TSC_KHZ = 61
    MAX_VCPUS = 66
    SYNC_REGS = 74
    READONLY_MEM = 81
    CHECK_EXTENSION_VM = 105
    X86_SMM = 117
    MULTI_ADDRESS_SPACE = 118
    IMMEDIATE_EXIT = 136
    EXIT_HYPERCALL = 201
    DISABLE_QUIRKS2 = 213
    USER_MEMORY2 = 231
    MEMORY_FAULT_INFO = 232
    MEMORY_ATTRIBUTES = 233
    GUEST_MEMFD = 234
    VM_TYPES = 235
    PRE_FAULT_MEMORY = 236
    X86_APIC_BUS_CYCLES_NS = 237
    X86_GUEST_MODE = 238
    # 6.18+: not present in 6.12 headers.
    GUEST_MEMFD_FLAGS = 244


class VmType(enum.IntEnum):
    """KVM_CREATE_VM type argument on x86 (KVM_X86_*_VM); KVM_CAP_VM_TYPES bit = 1 << type."""

    DEFAULT = 0
    SW_PROTECTED = 1
    SEV = 2
    SEV_ES = 3
    SNP = 4
    TDX = 5

    @classmethod
    def from_mask(cls, mask: int) -> list[VmType]:
        return [t for t in cls if mask & (1 << t)]


class MemFlag(enum.IntFlag):
    """kvm_userspace_memory_region{,2}.flags (KVM_MEM_*)."""

    NONE = 0
    LOG_DIRTY_PAGES = 1 << 0
    READONLY = 1 << 1
    GUEST_MEMFD = 1 << 2


class MemoryAttribute(enum.IntFlag):
    """kvm_memory_attributes.attributes (KVM_MEMORY_ATTRIBUTE_*)."""

    NONE = 0
    PRIVATE = 1 << 3


class MemoryExitFlag(enum.IntFlag):
    """kvm_run.memory_fault.flags (KVM_MEMORY_EXIT_FLAG_*)."""

    NONE = 0
    PRIVATE = 1 << 3


class GuestMemfdFlag(enum.IntFlag):
    """kvm_create_guest_memfd.flags (GUEST_MEMFD_FLAG_*, 6.18+)."""

    NONE = 0
    MMAP = 1 << 0
    INIT_SHARED = 1 << 1


class HypercallExitFlag(enum.IntFlag):
    NONE = 0
    LONG_MODE = 1 << 0


class Hypercall(enum.IntEnum):
    """KVM_HC_* numbers (include/uapi/linux/kvm_para.h)."""

    VAPIC_POLL_IRQ = 1
    MMU_OP = 2
    FEATURES = 3
    PPC_MAP_MAGIC_PAGE = 4
    KICK_CPU = 5
    MIPS_GET_CLOCK_FREQ = 6
    MIPS_EXIT_VM = 7
    MIPS_CONSOLE_OUTPUT = 8
    CLOCK_PAIRING = 9
    SEND_IPI = 10
    SCHED_YIELD = 11
    MAP_GPA_RANGE = 12


class KvmHcError(enum.IntEnum):
    """Hypercall error values returned to the guest negated (kvm_para.h)."""

    EPERM = 1
    E2BIG = 7
    EFAULT = 14
    EINVAL = 22
    EOPNOTSUPP = 95
    ENOSYS = 1000


class MapGpaRangeAttr(enum.IntFlag):
    """KVM_MAP_GPA_RANGE_* bits of a2 (kvm_para.h)."""

    PAGE_SZ_4K = 0
    PAGE_SZ_2M = 1
    PAGE_SZ_1G = 2
    ENCRYPTED = 1 << 4


class MpState(enum.IntEnum):
    RUNNABLE = 0
    UNINITIALIZED = 1
    INIT_RECEIVED = 2
    HALTED = 3
    SIPI_RECEIVED = 4


class Quirk(enum.IntFlag):
    """KVM_X86_QUIRK_* for KVM_CAP_DISABLE_QUIRKS2."""

    LINT0_REENABLED = 1 << 0
    CD_NW_CLEARED = 1 << 1
    LAPIC_MMIO_HOLE = 1 << 2
    OUT_7E_INC_RIP = 1 << 3
    MISC_ENABLE_NO_MWAIT = 1 << 4
    FIX_HYPERCALL_INSN = 1 << 5
    MWAIT_NEVER_UD_FAULTS = 1 << 6
    SLOT_ZAP_ALL = 1 << 7


class SyncReg(enum.IntFlag):
    REGS = 1
    SREGS = 2
    EVENTS = 4


# fallocate(2) modes (include/uapi/linux/falloc.h).
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

# The selftests' ucall port (tools/testing/selftests/kvm/lib/x86/ucall.c).
UCALL_PIO_PORT = 0x1000
