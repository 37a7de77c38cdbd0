"""Pin every struct size, field offset and ioctl number against include/uapi (x86_64)."""

import ctypes

import pytest

from kvmpy.uapi import Ioctl
from kvmpy.uapi import structs as s

SIZES = {
    "kvm_userspace_memory_region": 32,
    "kvm_userspace_memory_region2": 160,
    "kvm_create_guest_memfd": 64,
    "kvm_memory_attributes": 32,
    "kvm_pre_fault_memory": 64,
    "kvm_enable_cap": 104,
    "kvm_regs": 144,
    "kvm_segment": 24,
    "kvm_dtable": 16,
    "kvm_sregs": 312,
    "kvm_cpuid2": 8,
    "kvm_cpuid_entry2": 40,
    "kvm_mp_state": 4,
    "kvm_msrs": 8,
    "kvm_msr_entry": 16,
    "kvm_run": 2352,
}


@pytest.mark.parametrize("name,size", SIZES.items(), ids=list(SIZES))
def test_struct_size(name: str, size: int) -> None:
    assert ctypes.sizeof(getattr(s, name)) == size


OFFSETS = [
    ("kvm_userspace_memory_region2", "slot", 0), ("kvm_userspace_memory_region2", "flags", 4),
    ("kvm_userspace_memory_region2", "guest_phys_addr", 8),
    ("kvm_userspace_memory_region2", "memory_size", 16),
    ("kvm_userspace_memory_region2", "userspace_addr", 24),
    ("kvm_userspace_memory_region2", "guest_memfd_offset", 32),
    ("kvm_userspace_memory_region2", "guest_memfd", 40),
    ("kvm_userspace_memory_region2", "pad1", 44), ("kvm_userspace_memory_region2", "pad2", 48),
    ("kvm_userspace_memory_region", "userspace_addr", 24),
    ("kvm_create_guest_memfd", "size", 0), ("kvm_create_guest_memfd", "flags", 8),
    ("kvm_create_guest_memfd", "reserved", 16),
    ("kvm_memory_attributes", "address", 0), ("kvm_memory_attributes", "size", 8),
    ("kvm_memory_attributes", "attributes", 16), ("kvm_memory_attributes", "flags", 24),
    ("kvm_pre_fault_memory", "gpa", 0), ("kvm_pre_fault_memory", "size", 8),
    ("kvm_pre_fault_memory", "flags", 16), ("kvm_pre_fault_memory", "padding", 24),
    ("kvm_enable_cap", "cap", 0), ("kvm_enable_cap", "flags", 4), ("kvm_enable_cap", "args", 8),
    ("kvm_enable_cap", "pad", 40),
    ("kvm_regs", "rax", 0), ("kvm_regs", "rdi", 40), ("kvm_regs", "r8", 64),
    ("kvm_regs", "rip", 128), ("kvm_regs", "rflags", 136),
    ("kvm_segment", "base", 0), ("kvm_segment", "limit", 8), ("kvm_segment", "selector", 12),
    ("kvm_segment", "type", 14), ("kvm_segment", "present", 15), ("kvm_segment", "l", 19),
    ("kvm_segment", "unusable", 22),
    ("kvm_dtable", "limit", 8),
    ("kvm_sregs", "ds", 24), ("kvm_sregs", "tr", 144), ("kvm_sregs", "ldt", 168),
    ("kvm_sregs", "gdt", 192), ("kvm_sregs", "idt", 208), ("kvm_sregs", "cr0", 224),
    ("kvm_sregs", "cr3", 240), ("kvm_sregs", "efer", 264), ("kvm_sregs", "apic_base", 272),
    ("kvm_sregs", "interrupt_bitmap", 280),
    ("kvm_cpuid_entry2", "eax", 12), ("kvm_cpuid_entry2", "edx", 24),
    ("kvm_run", "immediate_exit", 1), ("kvm_run", "exit_reason", 8), ("kvm_run", "if_flag", 13),
    ("kvm_run", "cr8", 16), ("kvm_run", "apic_base", 24), ("kvm_run", "exit", 32),
    ("kvm_run", "kvm_valid_regs", 288), ("kvm_run", "kvm_dirty_regs", 296), ("kvm_run", "s", 304),
]


@pytest.mark.parametrize("struct,field,off", OFFSETS, ids=[f"{a}.{b}" for a, b, _ in OFFSETS])
def test_field_offset(struct: str, field: str, off: int) -> None:
    assert getattr(getattr(s, struct), field).offset == off


# Offsets of exit members from the start of kvm_run (the union sits at 32).
EXIT_OFFSETS = [
    ("io", "direction", 32), ("io", "size", 33), ("io", "port", 34), ("io", "count", 36),
    ("io", "data_offset", 40),
    ("mmio", "phys_addr", 32), ("mmio", "data", 40), ("mmio", "len", 48), ("mmio", "is_write", 52),
    ("hypercall", "nr", 32), ("hypercall", "args", 40), ("hypercall", "ret", 88),
    ("hypercall", "flags", 96),
    ("internal", "suberror", 32), ("internal", "ndata", 36), ("internal", "data", 40),
    ("memory_fault", "flags", 32), ("memory_fault", "gpa", 40), ("memory_fault", "size", 48),
    ("fail_entry", "hardware_entry_failure_reason", 32), ("fail_entry", "cpu", 40),
    ("ex", "exception", 32), ("ex", "error_code", 36),
]


@pytest.mark.parametrize("member,field,off", EXIT_OFFSETS,
                         ids=[f"{a}.{b}" for a, b, _ in EXIT_OFFSETS])
def test_exit_union_offset(member: str, field: str, off: int) -> None:
    mtype = dict(s.kvm_run_exit._fields_)[member]
    assert s.kvm_run.exit.offset + getattr(mtype, field).offset == off


IOCTLS = {
    "KVM_GET_API_VERSION": 0xAE00, "KVM_CREATE_VM": 0xAE01, "KVM_CHECK_EXTENSION": 0xAE03,
    "KVM_GET_VCPU_MMAP_SIZE": 0xAE04, "KVM_GET_SUPPORTED_CPUID": 0xC008AE05,
    "KVM_CREATE_VCPU": 0xAE41, "KVM_SET_NR_MMU_PAGES": 0xAE44,
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46, "KVM_SET_TSS_ADDR": 0xAE47,
    "KVM_SET_IDENTITY_MAP_ADDR": 0x4008AE48, "KVM_SET_USER_MEMORY_REGION2": 0x40A0AE49,
    "KVM_CREATE_IRQCHIP": 0xAE60, "KVM_RUN": 0xAE80, "KVM_SET_SIGNAL_MASK": 0x4004AE8B, "KVM_GET_REGS": 0x8090AE81,
    "KVM_SET_REGS": 0x4090AE82, "KVM_GET_SREGS": 0x8138AE83, "KVM_SET_SREGS": 0x4138AE84,
    "KVM_SET_CPUID2": 0x4008AE90, "KVM_GET_MP_STATE": 0x8004AE98,
    "KVM_SET_MP_STATE": 0x4004AE99, "KVM_ENABLE_CAP": 0x4068AEA3, "KVM_GET_STATS_FD": 0xAECE,
    "KVM_SET_MEMORY_ATTRIBUTES": 0x4020AED2, "KVM_CREATE_GUEST_MEMFD": 0xC040AED4,
    "KVM_PRE_FAULT_MEMORY": 0xC040AED5, "KVM_GET_MSRS": 0xC008AE88, "KVM_SET_MSRS": 0x4008AE89,
    "KVM_SMI": 0xAEB7,
}


@pytest.mark.parametrize("name,number", IOCTLS.items(), ids=list(IOCTLS))
def test_ioctl_number(name: str, number: int) -> None:
    assert Ioctl[name] == number, f"{name} = {Ioctl[name]:#x}, kernel has {number:#x}"


def test_every_ioctl_is_pinned() -> None:
    missing = set(Ioctl.__members__) - set(IOCTLS) - {"KVM_GET_CPUID2"}
    assert not missing, f"ioctls without a pinned number: {sorted(missing)}"


def test_names_print() -> None:
    from kvmpy.uapi import Cap, ExitReason, MemFlag

    assert ExitReason(39).name == "MEMORY_FAULT"
    assert ExitReason.name_of(999) == "UNKNOWN_EXIT_999"
    assert Cap(244).name == "GUEST_MEMFD_FLAGS"
    assert (MemFlag.GUEST_MEMFD | MemFlag.READONLY).name == "READONLY|GUEST_MEMFD"
    assert Ioctl.name_of(0xC040AED4) == "KVM_CREATE_GUEST_MEMFD"
    assert Ioctl.name_of(0x1234) == "ioctl(0x1234)"
