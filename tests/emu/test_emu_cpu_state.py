"""vCPU state ioctls and exception delivery of the emulated vCPU.

Exceptions: unicorn never delivers through the guest IDT; the emulator does it (SDM vol. 3,
6.14 64-bit interrupt frame, 6.15 double fault rules), so guest handlers behave as on KVM."""

from __future__ import annotations

import ctypes
import errno
import struct

import pytest

from kvmpy.backend.emu.x86.fakevm import STACK_TOP, FakeVm, VcpuHarness, long_mode_sregs
from kvmpy.uapi import ExitReason, Ioctl, MpState, kvm_sregs

pytestmark = pytest.mark.guest


HANDLERS = """
pf_handler:
    mov r8, cr2
    pop r9                   # error code
    mov r10, [rsp]           # return RIP
    mov r11, [rsp + 24]      # old RSP
    add qword ptr [rsp], 3   # skip the 3-byte faulting load
    iretq
gp_handler:
    pop r9
    mov r10, [rsp]
    add qword ptr [rsp], 2
    mov r14, 13
    iretq
ud_handler:
    mov r10, [rsp]
    add qword ptr [rsp], 2
    mov r14, 6
    iretq
bp_handler:
    mov r10, [rsp]
    mov r14, 3
    iretq
de_handler:
    mov r10, [rsp]
    add qword ptr [rsp], 2
    mov r14, 0
    iretq
"""
IDT = {"pf_handler": 14, "gp_handler": 13, "ud_handler": 6, "bp_handler": 3, "de_handler": 0}


def test_page_fault_delivered_with_frame_cr2_and_error_code(guests):
    g = guests("mov rax, 0x7f0000000000\nmov rbx, [rax]\nmov rcx, 1\nhlt\n" + HANDLERS,
               idt=IDT)
    assert g.h.run() == 0 and g.h.exit_reason == ExitReason.HLT
    r = g.h.get_regs()
    assert r.r8 == 0x7F0000000000          # CR2
    assert r.r9 == 0                       # not-present read at CPL 0
    assert r.r10 == 0x1000A                # RIP of the faulting instruction
    assert r.r11 == STACK_TOP              # old RSP in the frame
    assert r.rcx == 1 and r.rsp == STACK_TOP
    assert g.h.get_sregs().cr2 == 0x7F0000000000


def test_write_page_fault_error_code(guests):
    g = guests("mov rax, 0x7f0000000000\nmov [rax], rbx\nhlt\n" + HANDLERS, idt=IDT)
    assert g.h.run() == 0 and g.h.exit_reason == ExitReason.HLT
    assert g.h.get_regs().r9 == 2          # W, not present


def test_consecutive_exceptions_are_not_misreported(guests):
    """After one exception the next is reported with its own vector (the notes' bug in
    unicorn's old_exception bookkeeping would report #GP as #DF)."""
    src = ("mov rax, 0x7f0000000000\nmov rbx, [rax]\n"
           "mov ax, 0x1238\nmov ds, ax\n"
           "ud2\nint3\nxor ecx, ecx\ndiv ecx\nmov r15, 1\nhlt\n" + HANDLERS)
    g = guests(src, idt=IDT)
    assert g.h.run() == 0 and g.h.exit_reason == ExitReason.HLT
    r = g.h.get_regs()
    assert r.r15 == 1 and r.r14 == 0       # the last handler was #DE
    assert r.r9 == 0x1238                  # #GP's error code is the selector


def test_int3_pushes_next_rip(guests):
    g = guests("int3\nmov r15, 5\nhlt\n" + HANDLERS, idt=IDT)
    assert g.h.run() == 0 and g.h.exit_reason == ExitReason.HLT
    r = g.h.get_regs()
    assert (r.r14, r.r10, r.r15) == (3, 0x10001, 5)


def test_exception_without_idt_is_shutdown(guests):
    """No usable IDT: #PF -> #GP -> #DF -> triple fault = KVM_EXIT_SHUTDOWN."""
    g = guests("mov rax, 0x7f0000000000\nmov rbx, [rax]\nhlt", idt_limit=0)
    assert g.h.run() == 0 and g.h.exit_reason == ExitReason.SHUTDOWN


def test_not_present_gate_escalates_to_double_fault(guests):
    """#PF with a not-present #PF gate -> #NP (contributory after #PF) -> #DF handler."""
    src = "mov rax, 0x7f0000000000\nmov rbx, [rax]\nhlt\ndf_handler:\n mov r13, 8\n pop r9\n hlt\n"
    g = guests(src, idt={"df_handler": 8})
    assert g.h.run() == 0 and g.h.exit_reason == ExitReason.HLT
    r = g.h.get_regs()
    assert (r.r13, r.r9) == (8, 0)


def _cover_fetch(h):
    """A memslot at the unpaged fetch address: without one KVM_RUN is KVM's emulation failure
    (KVM_EXIT_INTERNAL_ERROR, tests/emu/test_emu_quirks.py), not the refusal these tests pin."""
    from kvmpy.backend.emu.x86.fakevm import Memfd
    backing = Memfd(4096, "fetch")
    h.vcpu.vm.set_slot(7, h.vcpu._unpaged_fetch_gpa() & ~0xFFF, 4096, backing.addr)
    return backing


def test_get_sregs_of_new_vcpu_is_reset_state_and_run_is_refused():
    """A new vCPU reports KVM's reset state; running it (real mode) is not modelled and
    KVM_RUN fails with EINVAL naming why, instead of running it wrong."""
    h = VcpuHarness(FakeVm())
    s = h.get_sregs()
    assert (s.cs.selector, s.cs.base, s.cr0, s.efer) == (0xF000, 0xFFFF0000, 0x60000010, 0)
    r = h.get_regs()
    assert (r.rip, r.rdx, r.rflags) == (0xFFF0, 0x600, 2)
    backing = _cover_fetch(h)
    with pytest.raises(OSError) as ei:
        h.vcpu.ioctl(Ioctl.KVM_RUN, 0)
    assert ei.value.errno == errno.EINVAL and "real mode" in str(ei.value)
    h.close()
    backing.close()


@pytest.mark.parametrize("field,value,why", [
    ("cr0", 0x80000001 | (1 << 29), "NW without CD"),
    ("cr0", 1 << 32, "high CR0 bits"),
    ("cr4", 0x220 | (1 << 15), "reserved CR4 bit"),
    ("efer", 0x900, "LME+PG without LMA"),
    ("cr4", 0x220 | (1 << 18), "OSXSAVE without CPUID.XSAVE"),
])
def test_set_sregs_rejects_invalid_state(field, value, why):
    h = VcpuHarness(FakeVm())
    s = long_mode_sregs()
    setattr(s, field, value)
    with pytest.raises(OSError) as ei:
        h.set_sregs(s)
    assert ei.value.errno == errno.EINVAL, why
    h.close()


def test_set_sregs_32bit_protected_mode_is_stored_but_not_run():
    h = VcpuHarness(FakeVm())
    s = long_mode_sregs()
    s.cr0, s.efer, s.cr4 = 0x11, 0, 0
    s.cs.l = 0
    s.cs.db = 1
    h.set_sregs(s)
    back = h.get_sregs()
    assert (back.cr0, back.efer, back.cs.db) == (0x11, 0, 1)
    backing = _cover_fetch(h)
    with pytest.raises(OSError) as ei:
        h.vcpu.ioctl(Ioctl.KVM_RUN, 0)
    assert ei.value.errno == errno.EINVAL
    h.close()
    backing.close()


def test_sregs_round_trip_in_long_mode(guests):
    g = guests("mov rax, 0x1234000\nmov cr3, rax\nhlt")
    s0 = g.h.get_sregs()
    assert (s0.cr0, s0.cr4, s0.efer, s0.cs.selector, s0.cs.l) == (0x80000033, 0x220, 0xD00, 8, 1)
    assert (s0.gdt.base, s0.idt.limit, s0.tr.base) == (0xB000, 0xFFF, 0xD000)
    g.vm.set_slot(1, 0x1234000, 0x1000, g.low.addr)  # any memory: only CR3's value matters
    s = kvm_sregs.from_buffer_copy(s0.to_bytes())
    s.fs.base = 0xABC000
    g.h.set_sregs(s)
    assert g.h.get_sregs().fs.base == 0xABC000


def test_mp_state_without_irqchip_only_runnable():
    h = VcpuHarness(FakeVm())
    st = ctypes.c_uint32(99)
    h.vcpu.ioctl(Ioctl.KVM_GET_MP_STATE, ctypes.addressof(st))
    assert st.value == MpState.RUNNABLE
    bad = ctypes.c_uint32(MpState.HALTED)
    with pytest.raises(OSError) as ei:
        h.vcpu.ioctl(Ioctl.KVM_SET_MP_STATE, ctypes.addressof(bad))
    assert ei.value.errno == errno.EINVAL
    h.close()


def test_unknown_vcpu_ioctl_and_enable_cap_are_einval():
    """kvm_arch_vcpu_ioctl()'s default is -EINVAL (arch/x86/kvm/x86.c), not ENOTTY."""
    h = VcpuHarness(FakeVm())
    with pytest.raises(OSError) as ei:
        h.vcpu.ioctl(0xAEFF, 0)
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(OSError) as ei:
        h.vcpu.ioctl(Ioctl.KVM_ENABLE_CAP, 0)
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(OSError) as ei:
        h.vcpu.ioctl(Ioctl.KVM_GET_REGS, 8)    # a bad pointer: EFAULT, no crash
    assert ei.value.errno == errno.EFAULT
    h.close()


def test_get_cpuid2_e2big_and_round_trip():
    from kvmpy.uapi import kvm_cpuid_entry2, make_cpuid2

    h = VcpuHarness(FakeVm())
    buf = make_cpuid2(2)
    buf.entries[0] = kvm_cpuid_entry2(function=0, eax=0xD)
    buf.entries[1] = kvm_cpuid_entry2(function=1, eax=0x806F8)
    h.vcpu.ioctl(Ioctl.KVM_SET_CPUID2, ctypes.addressof(buf))
    small = make_cpuid2(1)
    with pytest.raises(OSError) as ei:
        h.vcpu.ioctl(Ioctl.KVM_GET_CPUID2, ctypes.addressof(small))
    assert ei.value.errno == errno.E2BIG and small.nent == 2
    out = make_cpuid2(4)
    h.vcpu.ioctl(Ioctl.KVM_GET_CPUID2, ctypes.addressof(out))
    assert out.nent == 2 and out.entries[1].eax == 0x806F8
    assert struct.unpack("<I", bytes(out.entries[0])[12:16])[0] == 0xD
    h.close()
