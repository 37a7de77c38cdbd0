"""Compare kvmpy's structs with the machine's installed kernel headers (<linux/kvm.h>).

The installed headers may be older than the ABI kvmpy mirrors (Debian 12 ships 6.1 headers, with
no guest_memfd); structs they lack are skipped by name, the rest must agree byte for byte.
"""

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from kvmpy.uapi import Ioctl
from kvmpy.uapi import structs as s

# (struct, guard macro that must be defined for the struct to exist, fields to compare)
CHECKS = [
    ("kvm_userspace_memory_region", None, ["slot", "flags", "guest_phys_addr", "memory_size",
                                          "userspace_addr"]),
    ("kvm_userspace_memory_region2", "KVM_SET_USER_MEMORY_REGION2",
     ["slot", "flags", "guest_phys_addr", "memory_size", "userspace_addr", "guest_memfd_offset",
      "guest_memfd", "pad1", "pad2"]),
    ("kvm_create_guest_memfd", "KVM_CREATE_GUEST_MEMFD", ["size", "flags", "reserved"]),
    ("kvm_memory_attributes", "KVM_SET_MEMORY_ATTRIBUTES",
     ["address", "size", "attributes", "flags"]),
    ("kvm_pre_fault_memory", "KVM_PRE_FAULT_MEMORY", ["gpa", "size", "flags", "padding"]),
    ("kvm_enable_cap", None, ["cap", "flags", "args", "pad"]),
    ("kvm_regs", None, ["rax", "rdi", "r15", "rip", "rflags"]),
    ("kvm_segment", None, ["base", "limit", "selector", "type", "present", "unusable"]),
    ("kvm_dtable", None, ["base", "limit", "padding"]),
    ("kvm_sregs", None, ["cs", "tr", "ldt", "gdt", "idt", "cr0", "cr3", "efer", "apic_base",
                         "interrupt_bitmap"]),
    ("kvm_cpuid_entry2", None, ["function", "index", "flags", "eax", "edx", "padding"]),
    ("kvm_run", None, ["immediate_exit", "exit_reason", "cr8", "apic_base", "kvm_valid_regs",
                       "kvm_dirty_regs", "s"]),
]

IOCTL_GUARDS = {
    "KVM_SET_USER_MEMORY_REGION2": "KVM_SET_USER_MEMORY_REGION2",
    "KVM_SET_MEMORY_ATTRIBUTES": "KVM_SET_MEMORY_ATTRIBUTES",
    "KVM_CREATE_GUEST_MEMFD": "KVM_CREATE_GUEST_MEMFD",
    "KVM_PRE_FAULT_MEMORY": "KVM_PRE_FAULT_MEMORY",
}


def _program() -> str:
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>",
             "int main(void) {"]
    for name, guard, fields in CHECKS:
        body = [f'printf("{name} sizeof %zu\\n", sizeof(struct {name}));']
        body += [f'printf("{name} {f} %zu\\n", offsetof(struct {name}, {f}));' for f in fields]
        if guard:
            lines.append(f"#ifdef {guard}")
        lines += body
        if guard:
            lines.append("#endif")
    for ioctl in Ioctl.__members__:
        guard = IOCTL_GUARDS.get(ioctl, ioctl)
        lines.append(f"#ifdef {guard}")
        lines.append(f'printf("ioctl {ioctl} %lu\\n", (unsigned long){ioctl});')
        lines.append("#endif")
    lines.append("return 0; }")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def header_facts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler (install gcc) for the header drift check")
    if not Path("/usr/include/linux/kvm.h").exists():
        pytest.skip("no installed <linux/kvm.h> (install linux-libc-dev)")
    d = tmp_path_factory.mktemp("drift")
    src = d / "drift.c"
    src.write_text(_program())
    exe = d / "drift"
    subprocess.run([cc, "-o", str(exe), str(src)], check=True, capture_output=True, text=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    facts = {}
    for line in out.splitlines():
        a, b, v = line.split()
        facts[f"{a} {b}"] = int(v)
    return facts


@pytest.mark.parametrize("name,guard,fields", CHECKS, ids=[c[0] for c in CHECKS])
def test_struct_matches_headers(header_facts: dict[str, int], name: str, guard: str | None,
                                fields: list[str]) -> None:
    if f"{name} sizeof" not in header_facts:
        pytest.skip(f"installed <linux/kvm.h> predates struct {name} ({guard} undefined)")
    ours = getattr(s, name)
    assert ctypes.sizeof(ours) == header_facts[f"{name} sizeof"], f"sizeof(struct {name})"
    for f in fields:
        assert getattr(ours, f).offset == header_facts[f"{name} {f}"], f"offsetof({name}, {f})"


def test_ioctl_numbers_match_headers(header_facts: dict[str, int]) -> None:
    seen = {k.split()[1]: v for k, v in header_facts.items() if k.startswith("ioctl ")}
    assert len(seen) >= 15, f"too few ioctls found in the headers: {sorted(seen)}"
    wrong = {n: (hex(Ioctl[n]), hex(v)) for n, v in seen.items() if Ioctl[n] != v}
    assert not wrong, f"ioctl numbers differ from <linux/kvm.h> (ours, headers): {wrong}"
