"""Guest benchmarks: the ucall round trip and VM+vCPU setup (pytest-benchmark).

    .venv/bin/pytest bench/bench_guest.py -m bench --benchmark-only

What one round trip is: KVM_RUN until the guest's `in` on port 0x1000, KVM_GET_REGS (RDI),
reading the 976-byte struct ucall from guest memory, KVM_RUN with immediate_exit to complete
the IN, decoding; plus the guest's own instructions between two ucalls (on hosts whose KVM
emulates guest instructions one by one, those dominate: the vCPU stat insn_emulation per
round trip is recorded in extra_info where KVM_GET_STATS_FD offers it).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvmpy.errors import KvmError
from kvmpy.guest import GuestVm, UcallCmd, build
from kvmpy.guest.elf import GuestImage
from kvmpy.guest.stats import read_stats
from kvmpy.system import Kvm

pytestmark = [pytest.mark.bench, pytest.mark.guest]


@pytest.fixture
def g(kvm: Kvm) -> Iterator[GuestVm]:
    with GuestVm(kvm, "smoke", timeout=60.0) as gvm:
        yield gvm


def test_ucall_round_trip(benchmark: pytest.FixtureRequest, g: GuestVm) -> None:
    vcpu = g.vcpu("guest_ucall_loop", 1 << 62)
    assert g.expect_sync(vcpu, 0).cmd == UcallCmd.SYNC  # warm: page tables, code faulted in
    try:
        before = read_stats(vcpu)
    except KvmError:
        before = {}
    seen = [0]

    def round_trip() -> None:
        uc = g.run(vcpu)
        seen[0] += 1
        assert getattr(uc, "cmd", None) == UcallCmd.SYNC, uc

    benchmark(round_trip)  # type: ignore[operator]
    if "insn_emulation" in before:
        after = read_stats(vcpu)
        benchmark.extra_info["insn_emulation_per_ucall"] = (  # type: ignore[attr-defined]
            (after["insn_emulation"] - before["insn_emulation"]) / seen[0])
        benchmark.extra_info["exits_per_ucall"] = (  # type: ignore[attr-defined]
            (after["exits"] - before["exits"]) / seen[0])
    benchmark.extra_info["backend"] = g.backend.describe()  # type: ignore[attr-defined]


def test_vm_and_vcpu_setup(benchmark: pytest.FixtureRequest, kvm: Kvm) -> None:
    """KVM_CREATE_VM, the 16 MiB low memslot with the image, page tables, GDT/IDT/TSS, one
    vCPU (CPUID, sregs, regs, stack), then teardown. The guest ELF is parsed once outside."""
    image = GuestImage(build("smoke"))

    def setup() -> None:
        with GuestVm(kvm, image=image) as g:
            g.vcpu("guest_nop")

    benchmark(setup)  # type: ignore[operator]
    benchmark.extra_info["backend"] = kvm.backend.describe()  # type: ignore[attr-defined]


def test_vm_setup_and_first_run(benchmark: pytest.FixtureRequest, kvm: Kvm) -> None:
    """Setup plus running the vCPU to its first ucall (guest_nop returns: DONE)."""
    image = GuestImage(build("smoke"))

    def setup_and_run() -> None:
        with GuestVm(kvm, image=image) as g:
            g.expect_done(g.vcpu("guest_nop"))

    benchmark(setup_and_run)  # type: ignore[operator]
    benchmark.extra_info["backend"] = kvm.backend.describe()  # type: ignore[attr-defined]
