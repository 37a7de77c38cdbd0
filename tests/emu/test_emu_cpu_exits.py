"""EmuVcpu exits on hand-assembled guests, against a small stand-in VM (x86/fakevm.py).

Each test pins a KVM behaviour named in its docstring (api.rst 5. "The kvm_run structure")."""

from __future__ import annotations

import errno
import struct

import pytest

from kvmpy.backend.emu.x86.fakevm import DATA, FakeVm
from kvmpy.uapi import ExitReason, Hypercall, KvmHcError

pytestmark = pytest.mark.guest


def test_out_exit_reports_data_and_rip_at_the_out(guests):
    """OUT exits with io.direction OUT, the data at kvm_run + io.data_offset and RIP still at
    the OUT (x86.c kvm_fast_pio_out()); the next KVM_RUN skips it (complete_fast_pio_out())."""
    g = guests("mov dx, 0x1234\nmov eax, 0xa1b2c3d4\nout dx, eax\nhlt")
    assert g.h.run() == 0
    assert g.h.exit_reason == ExitReason.IO
    io = g.h.run_struct.exit.io
    assert (io.direction, io.size, io.port, io.count, io.data_offset) == (1, 4, 0x1234, 1, 4096)
    assert g.h.io_data(4) == struct.pack("<I", 0xA1B2C3D4)
    assert g.h.get_regs().rip == 0x10000 + 4 + 5
    assert g.h.run() == 0 and g.h.exit_reason == ExitReason.HLT
    assert g.h.get_regs().rip == 0x10000 + 4 + 5 + 1 + 1


def test_in_keeps_rip_until_next_run_completes_it(guests):
    """KVM's IN completion rule: RIP stays at the IN and RAX is untouched until the next
    KVM_RUN, which merges the data left in the data page (size < 4) and moves RIP on."""
    g = guests("mov dx, 0x1000\nmov rax, 0x1122334455667788\nin ax, dx\nhlt")
    assert g.h.run() == 0 and g.h.exit_reason == ExitReason.IO
    io = g.h.run_struct.exit.io
    assert (io.direction, io.size, io.port) == (0, 2, 0x1000)
    in_rip = 0x10000 + 4 + 10
    r = g.h.get_regs()
    assert (r.rip, r.rax) == (in_rip, 0x1122334455667788)
    g.h.set_io_data(b"\xee\xff")
    assert g.h.run() == 0 and g.h.exit_reason == ExitReason.HLT
    assert g.h.get_regs().rax == 0x112233445566FFEE


def test_in_completed_by_immediate_exit_run(guests):
    """A KVM_RUN with immediate_exit completes the pending IN first, then returns EINTR
    (vcpu_run_complete_io in the selftests); a 4-byte IN zero-extends into RAX."""
    g = guests("mov dx, 0x1000\nmov rax, -1\nin eax, dx\nhlt")
    assert g.h.run() == 0 and g.h.exit_reason == ExitReason.IO
    g.h.set_io_data(struct.pack("<I", 0x01020304))
    g.h.run_struct.immediate_exit = 1
    assert g.h.run() == errno.EINTR
    g.h.run_struct.immediate_exit = 0
    r = g.h.get_regs()
    assert r.rax == 0x01020304
    assert r.rip == 0x10000 + 4 + 7 + 1
    assert g.h.run() == 0 and g.h.exit_reason == ExitReason.HLT


def test_in_completion_dropped_when_userspace_moves_rip(guests):
    """complete_fast_pio_in(): if userspace changed RIP, the IN is not completed."""
    g = guests("mov dx, 0x1000\nxor eax, eax\nin al, dx\nhlt\nhlt")
    assert g.h.run() == 0 and g.h.exit_reason == ExitReason.IO
    r = g.h.get_regs()
    r.rip += 1   # onto the first hlt
    g.h.set_regs(r)
    g.h.set_io_data(b"\x55")
    assert g.h.run() == 0 and g.h.exit_reason == ExitReason.HLT
    assert g.h.get_regs().rax == 0


def test_hlt_exit_rip_after(guests):
    g = guests("nop\nhlt\nnop")
    assert g.h.run() == 0 and g.h.exit_reason == ExitReason.HLT
    assert g.h.get_regs().rip == 0x10002


def test_mmio_read_completed_with_userspace_data(guests):
    """An access to a gpa without a memslot is KVM_EXIT_MMIO; a read keeps RIP at the
    instruction and the next KVM_RUN completes it with kvm_run.mmio.data."""
    g = guests("mov rax, 0xd0000000\nmov ebx, [rax+8]\nhlt")
    assert g.h.run() == 0 and g.h.exit_reason == ExitReason.MMIO
    m = g.h.run_struct.exit.mmio
    assert (m.phys_addr, m.len, m.is_write) == (0xD0000008, 4, 0)
    assert g.h.get_regs().rip == 0x1000A
    for i, b in enumerate(b"\x78\x56\x34\x12"):
        m.data[i] = b
    assert g.h.run() == 0 and g.h.exit_reason == ExitReason.HLT
    assert g.h.get_regs().rbx == 0x12345678


def test_mmio_write_reported_after_instruction(guests):
    """An MMIO write exits with the data and RIP after the instruction."""
    g = guests("mov rax, 0xd0000000\nmov qword ptr [rax], 0x5a5a\nmov ecx, 7\nhlt")
    assert g.h.run() == 0 and g.h.exit_reason == ExitReason.MMIO
    m = g.h.run_struct.exit.mmio
    assert (m.phys_addr, m.len, m.is_write) == (0xD0000000, 8, 1)
    assert bytes(m.data) == struct.pack("<Q", 0x5A5A)
    assert g.h.get_regs().rip == 0x1000A + 7   # 48 c7 00 imm32
    assert g.h.run() == 0 and g.h.exit_reason == ExitReason.HLT
    assert g.h.get_regs().rcx == 7


def test_instruction_fetch_outside_memslots_is_internal_error(guests):
    g = guests("mov rax, 0xd0000000\njmp rax")
    assert g.h.run() == 0
    assert g.h.exit_reason == ExitReason.INTERNAL_ERROR
    assert g.h.run_struct.exit.internal.suberror == 1


def _hc(nr: int, a0: int = 0, a1: int = 0, a2: int = 0, insn: str = "vmcall") -> str:
    return (f"mov rax, {nr}\nmov rbx, {a0}\nmov rcx, {a1}\nmov rdx, {a2}\n{insn}\n"
            "mov r15, rax\nhlt")


def test_map_gpa_range_without_exit_cap_returns_enosys(guests):
    """KVM_HC_MAP_GPA_RANGE with bit 12 clear in KVM_CAP_EXIT_HYPERCALL: RAX = -KVM_ENOSYS
    and the guest continues past the vmcall."""
    g = guests(_hc(Hypercall.MAP_GPA_RANGE, 0x100000000, 1, 0x10))
    assert g.h.run() == 0 and g.h.exit_reason == ExitReason.HLT
    assert g.h.get_regs().r15 == (-KvmHcError.ENOSYS) & (2**64 - 1)


@pytest.mark.parametrize("gpa,npages", [(0x100000001, 1), (0x100000000, 0),
                                        (0x1000, 2**64 - 1)],
                         ids=["unaligned", "zero-pages", "wrap"])
def test_map_gpa_range_bad_range_returns_einval(guests, gpa, npages):
    vm = FakeVm(exit_hypercall_mask=1 << 12)
    g = guests(_hc(Hypercall.MAP_GPA_RANGE, gpa, npages), vm=vm)
    assert g.h.run() == 0 and g.h.exit_reason == ExitReason.HLT
    assert g.h.get_regs().r15 == (-KvmHcError.EINVAL) & (2**64 - 1)


@pytest.mark.parametrize("insn", ["vmcall", "vmmcall"])
def test_map_gpa_range_exit_and_completion(guests, insn):
    """With the exit enabled: KVM_EXIT_HYPERCALL with nr, args[0..2] and LONG_MODE; RIP stays
    on the instruction until the next KVM_RUN writes hypercall.ret to RAX and skips it."""
    vm = FakeVm(exit_hypercall_mask=1 << 12)
    g = guests(_hc(Hypercall.MAP_GPA_RANGE, 0x100000000, 3, 0x10, insn), vm=vm)
    assert g.h.run() == 0 and g.h.exit_reason == ExitReason.HYPERCALL
    h = g.h.run_struct.exit.hypercall
    assert (h.nr, h.args[0], h.args[1], h.args[2], h.flags) == (12, 0x100000000, 3, 0x10, 1)
    vmcall_rip = 0x10000 + 7 + 10 + 7 + 7
    assert g.h.get_regs().rip == vmcall_rip
    h.ret = 0
    g.h.run_struct.immediate_exit = 1
    assert g.h.run() == errno.EINTR
    g.h.run_struct.immediate_exit = 0
    assert g.h.get_regs().rip == vmcall_rip + 3
    assert g.h.run() == 0 and g.h.exit_reason == ExitReason.HLT
    assert g.h.get_regs().r15 == 0


def test_unknown_hypercall_returns_enosys(guests):
    g = guests(_hc(0x7777))
    assert g.h.run() == 0 and g.h.exit_reason == ExitReason.HLT
    assert g.h.get_regs().r15 == (-KvmHcError.ENOSYS) & (2**64 - 1)


def test_immediate_exit_without_pending_io_is_eintr_and_keeps_state(guests):
    g = guests("mov eax, 1\nhlt")
    g.h.run_struct.immediate_exit = 1
    assert g.h.run() == errno.EINTR
    assert g.h.get_regs().rip == 0x10000
    g.h.run_struct.immediate_exit = 0
    assert g.h.run() == 0 and g.h.exit_reason == ExitReason.HLT


def test_cpuid_answers_from_set_cpuid2(guests):
    """Guest CPUID comes from KVM_SET_CPUID2 (kvm_cpuid()); unknown leaves are zero when
    leaf 0 is absent."""
    import ctypes

    from kvmpy.uapi import Ioctl, kvm_cpuid_entry2, make_cpuid2

    g = guests("mov eax, 0x40000000\ncpuid\nmov r8, rbx\nmov eax, 0x1234\ncpuid\nhlt")
    buf = make_cpuid2(1)
    buf.entries[0] = kvm_cpuid_entry2(function=0x40000000, eax=0x40000001, ebx=0x4B4D564B)
    g.h.vcpu.ioctl(Ioctl.KVM_SET_CPUID2, ctypes.addressof(buf))
    assert g.h.run() == 0 and g.h.exit_reason == ExitReason.HLT
    r = g.h.get_regs()
    assert r.r8 == 0x4B4D564B
    assert (r.rax, r.rbx, r.rcx, r.rdx) == (0, 0, 0, 0)


def test_data_write_lands_in_shared_backing(guests):
    g = guests(f"mov rax, {DATA}\nmov qword ptr [rax], 0x1234abcd\nhlt")
    assert g.h.run() == 0 and g.h.exit_reason == ExitReason.HLT
    assert g.low.read(DATA, 8) == struct.pack("<Q", 0x1234ABCD)
