"""The profile field out_exit_rip_at_insn (profiles.py): mainline profiles report a plain OUT's
KVM_EXIT_IO with RIP at the OUT (x86.c kvm_fast_pio_out() -> complete_fast_pio_out()); a profile
mirroring kvm_pvm reports RIP after it. The field is behaviour, not a capability: it is not in
profile_answers(), so ci/compare-profiles never compares it. selftests/test_pio_out_rip.py has
the full cases on both backends."""

from __future__ import annotations

import dataclasses

import pytest

from kvmpy.backend.emu import EmuBackend
from kvmpy.backend.emu.profiles import Profile, get_profile, profile_answers
from kvmpy.backend.emu.x86.fakevm import (
    CODE,
    LOW_SIZE,
    STACK_TOP,
    asm,
    build_low_memory,
    code_offset,
    long_mode_sregs,
)
from kvmpy.memory import SharedMemory
from kvmpy.system import Kvm
from kvmpy.uapi import Cap, ExitReason, IoDirection, Quirk, kvm_regs

pytestmark = pytest.mark.guest

SRC = """
    mov eax, 0x5a
    out_80:
    out 0x80, al
    out_7e:
    out 0x7e, al
    in al, 0x81
    hlt
"""
OUT_80 = CODE + code_offset(SRC, "out_80")
OUT_7E = CODE + code_offset(SRC, "out_7e")


class _Low:
    def __init__(self, mem: SharedMemory) -> None:
        self.mem = mem

    def write(self, off: int, data: bytes) -> None:
        self.mem.mapping.write(off, data)


def exit_rips(profile: Profile, quirk_off: bool = False) -> list[tuple[str, int, int]]:
    """(direction, port, RIP) at each IO exit of SRC until its IN."""
    kvm = Kvm(EmuBackend(profile=profile))
    out = []
    with SharedMemory(kvm.backend, LOW_SIZE) as low, kvm.create_vm(0) as vm:
        if quirk_off:
            vm.enable_cap(Cap.DISABLE_QUIRKS2, int(Quirk.OUT_7E_INC_RIP))
        build_low_memory(_Low(low), asm(SRC, CODE))  # type: ignore[arg-type]
        vm.set_user_memory_region(0, 0, 0, LOW_SIZE, low.addr)
        vcpu = vm.create_vcpu(0)
        vcpu.set_sregs(long_mode_sregs())
        r = kvm_regs()
        r.rip, r.rsp, r.rflags = CODE, STACK_TOP, 2
        vcpu.set_regs(r)
        while True:
            ex = vcpu.run()
            assert ex.reason == ExitReason.IO and ex.io is not None, ex
            out.append((ex.io.direction.name, ex.io.port, int(vcpu.get_regs().rip)))
            if ex.io.direction == IoDirection.IN:
                return out


def pvm_like(name: str) -> Profile:
    return dataclasses.replace(get_profile(name), name="host", out_exit_rip_at_insn=False,
                               extra={"module": "kvm_pvm"})


@pytest.mark.parametrize("name", ["6.12", "7.3", "upstream"])
def test_mainline_profiles_report_rip_at_the_out(name: str) -> None:
    p = get_profile(name)
    assert p.out_exit_rip_at_insn
    # Port 0x80 at the OUT; 0x7e skipped before the exit (quirk on by default); the IN right
    # after the second OUT shows each OUT was completed once.
    assert exit_rips(p) == [("OUT", 0x80, OUT_80), ("OUT", 0x7E, OUT_7E + 2),
                            ("IN", 0x81, OUT_7E + 2)]
    assert exit_rips(p, quirk_off=True) == [("OUT", 0x80, OUT_80), ("OUT", 0x7E, OUT_7E),
                                            ("IN", 0x81, OUT_7E + 2)]


@pytest.mark.parametrize("quirk_off", [False, True], ids=["quirk_on", "quirk_off"])
def test_kvm_pvm_like_profile_reports_rip_after_every_out(quirk_off: bool) -> None:
    assert exit_rips(pvm_like("7.3"), quirk_off) == [
        ("OUT", 0x80, OUT_7E), ("OUT", 0x7E, OUT_7E + 2), ("IN", 0x81, OUT_7E + 2)]


def test_field_is_not_a_compared_answer() -> None:
    """ci/compare-profiles compares profile_answers(): a kvm_pvm-like host profile and its
    mainline twin answer the same."""
    assert profile_answers(pvm_like("7.3")) == {**profile_answers(get_profile("7.3")),
                                                "name": "host"}


def test_host_probe_measures_this_kvm() -> None:
    """probe_profile() runs a real-mode OUT on real KVM: False on kvm_pvm, True on
    kvm_amd/kvm_intel."""
    from kvmpy.backend.host import kvm_module
    from kvmpy.backend.select import kvm_available
    from kvmpy.caps import probe_profile

    ok, why = kvm_available()
    if not ok:
        pytest.skip(f"probing the host profile needs real KVM: {why}")
    module = kvm_module().split(",")
    if not {"kvm_pvm", "kvm_amd", "kvm_intel"} & set(module):
        pytest.skip(f"no known vendor module loaded ({module})")
    assert probe_profile().out_exit_rip_at_insn == ("kvm_pvm" not in module)
