"""Issue 11 item 12: the emulated CPU faults where KVM faults. Each guest runs one instruction
that KVM refuses and reports which exception its handler saw (vector in r9, error code in r10,
the frame's RIP in r11, CR0/CR4/EFER after in r12-r14) with an OUT; the same guest runs on real
KVM (HostBackend; this kind of host emulates every guest instruction in KVM's emulator, so
the checks are x86.c's) and on the emulator, and the transcripts must match."""

from __future__ import annotations

from typing import Any

import pytest

from .test_differential_guest import Probe, Transcript, assert_same, differential, run_rec

_REPORT = """
    mov r12, cr0
    mov r13, cr4
    push rcx
    push rdx
    push rax
    mov ecx, 0xC0000080
    rdmsr
    shl rdx, 32
    or rax, rdx
    mov r14, rax
    pop rax
    pop rdx
    pop rcx
    mov dx, 1
    out dx, al
    hlt
    h_gp:
    mov r9, 13
    pop r10
    mov r11, [rsp]
    jmp report
    h_ud:
    mov r9, 6
    mov r11, [rsp]
    jmp report
    h_pf:
    mov r9, 14
    pop r10
    mov r11, [rsp]
    report:
    mov r12, cr0
    mov r13, cr4
    mov dx, 2
    out dx, al
    hlt
"""
_IDT = {"h_gp": 13, "h_ud": 6, "h_pf": 14}


def _body(p: Probe, t: Transcript) -> None:
    run_rec(p, t, "first-exit")


CASES: dict[str, str] = {
    # kvm_set_cr0(): clearing CR0.PG in 64-bit mode is #GP (SDM Vol. 3A 2.5, MOV CR0).
    "mov_cr0_zero": "xor eax, eax\nmov cr0, rax",
    # kvm_set_cr4(): "if (is_long_mode(vcpu)) { if (!(cr4 & X86_CR4_PAE)) return 1;"
    "clear_cr4_pae": "mov rax, cr4\nand rax, ~0x20\nmov cr4, rax",
    # kvm_set_cr4(): reserved CR4 bit (kvm_is_valid_cr4()).
    "cr4_reserved": "mov rax, cr4\nbts rax, 15\nmov cr4, rax",
    # A valid CR0/CR4 write goes through (CR0.MP, CR4.TSD toggled).
    "cr_valid": "mov rax, cr0\nor rax, 2\nmov cr0, rax\nmov rax, cr4\nor rax, 4\nmov cr4, rax",
    # SYSCALL with EFER.SCE clear is #UD (SDM Vol. 2B SYSCALL; em_syscall()).
    "syscall_no_sce": "syscall",
    # A branch to a non-canonical address faults on the branch: #GP(0), RIP = the jump.
    "jmp_noncanonical": "mov rax, 0x800000000000\njmp rax",
    "ret_noncanonical": "mov rax, 0x800000000000\npush rax\nret",
    "ret_imm_noncanonical": "push 0\nmov rax, 0xFFFF7FFFFFFFF000\npush rax\nret 8",
    "call_noncanonical": "mov r8, 0x800000000000\ncall r8",
    "jmp_mem_noncanonical": ("mov rax, 0xFFFF000000000000\npush rax\nnop\nnop\n"
                             "jmp qword ptr [rsp]"),
    # Unknown MSRs: kvm_get_msr_common()/kvm_set_msr_common() default -> #GP(0).
    "rdmsr_unknown": "mov ecx, 0x12345\nrdmsr",
    "wrmsr_unknown": "mov ecx, 0x12345\nxor eax, eax\nxor edx, edx\nwrmsr",
    # EFER reserved bit (kvm_valid_efer()/__kvm_valid_efer()).
    "wrmsr_efer_reserved": "mov ecx, 0xC0000080\nrdmsr\nbts eax, 2\nwrmsr",
    # APIC_BASE reads as the vCPU's (kvm_get_msr_common()), TSC_AUX with RDTSCP in CPUID.
    "rdmsr_apic_base_tsc_aux": ("mov ecx, 0x1B\nrdmsr\nmov rbx, rax\nmov ecx, 0xC0000103\n"
                                "mov eax, 7\nxor edx, edx\nwrmsr\nrdmsr\nmov rsi, rax"),
    # kvm_apic_set_base(): EXTD without EN is an invalid mode -> #GP.
    "wrmsr_apic_base_invalid": "mov ecx, 0x1B\nmov eax, 0xFEE00500\nxor edx, edx\nwrmsr",
    # Modelled MSRs read and write without a fault.
    "msr_known": ("mov ecx, 0xC0000081\nmov eax, 0x1234\nmov edx, 0x00230010\nwrmsr\n"
                  "mov ecx, 0xC0000082\nmov eax, 0x5000\nxor edx, edx\nwrmsr\n"
                  "mov ecx, 0xC0000084\nmov eax, 0x700\nwrmsr\n"
                  "mov ecx, 0xC0000102\nmov eax, 0x9000\nwrmsr\n"
                  "mov ecx, 0xC0000081\nrdmsr\nmov rbx, rdx\nmov ecx, 0x277\nrdmsr\n"
                  "mov rsi, rax\nmov rdi, rdx\nmov ecx, 0xC0000102\nrdmsr\nmov rbp, rax"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_fault_matches_real_kvm(name: str) -> None:
    src = CASES[name] + "\n" + _REPORT
    kvm_t, emu_t = differential(src, _body, idt=_IDT)
    assert_same(kvm_t, emu_t)


def _port(t: Transcript) -> Any:
    return t[0][5]


def test_cr0_high_bits_gp_divergence_pinned() -> None:
    """MOV CR0 with a bit of 63:32 set is #GP(0) (SDM Vol. 2B MOV to/from CR; kvm_is_valid_cr0()
    on the VM-exit path). The emulator faults; this host's KVM runs the guest through its
    instruction emulator, whose emulator_set_cr() builds the value with mk_cr_64(), keeping
    only the low 32 bits, so it writes CR0 without a fault."""
    src = "mov rax, cr0\nbts rax, 32\nmov cr0, rax\n" + _REPORT
    kvm_t, emu_t = differential(src, _body, idt=_IDT)
    assert (_port(kvm_t), _port(emu_t)) == (1, 2)
