"""Conversion throughput: KVM_SET_MEMORY_ATTRIBUTES and guest_memfd punch-hole/allocate.

    .venv/bin/pytest bench/bench_conversion.py -m bench --backend both

Per benchmark, one round converts (or punches) ``size`` bytes; extra_info has MiB/s and
pages/s. Attribute conversions need KVM_X86_SW_PROTECTED_VM with KVM_CAP_MEMORY_ATTRIBUTES
(skipped, naming it, where absent); punch-hole needs only KVM_CAP_GUEST_MEMFD. The guest_memfd
is bound to a memslot, so every call also pays KVM's invalidation of the bound range. Single
conversions with a running vCPU are in bench/bench_emu.py (emulator) and bench_guest.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from kvmpy.gmem import GuestMemfd
from kvmpy.memory import SharedMemory
from kvmpy.system import Kvm
from kvmpy.testing.private_mem import require_private_mem
from kvmpy.testing.require import require_cap
from kvmpy.uapi import Cap, MemFlag, VmType
from kvmpy.vm import Vm

pytestmark = pytest.mark.bench

GPA = 1 << 32
SIZES = [4096, 64 * 4096, 2 << 20]
IDS = ["4K", "256K", "2M"]


def _rates(benchmark: Any, size: int) -> None:
    st = benchmark.stats.stats
    benchmark.extra_info["MiB_per_s"] = round(size / st.median / (1 << 20), 1)
    benchmark.extra_info["pages_per_s"] = round(size / 4096 / st.median)


@pytest.fixture
def bound(kvm: Kvm, request: pytest.FixtureRequest) -> Iterator[tuple[Vm, GuestMemfd]]:
    """A VM (SW_PROTECTED when it has private memory, else DEFAULT) with a 2 MiB guest_memfd
    bound to a shmem-backed slot."""
    vm_type = request.param
    if vm_type == VmType.SW_PROTECTED:
        require_private_mem(kvm, hypercall_exit=False)
    with kvm.create_vm(vm_type) as vm, SharedMemory(kvm.backend, 2 << 20) as mem:
        require_cap(vm, Cap.GUEST_MEMFD)
        g = vm.create_guest_memfd(2 << 20)
        vm.set_user_memory_region2(1, MemFlag.GUEST_MEMFD, GPA, 2 << 20, mem.addr, g, 0)
        yield vm, g


@pytest.mark.parametrize("bound", [VmType.SW_PROTECTED], indirect=True, ids=["sw_protected"])
@pytest.mark.parametrize("size", SIZES, ids=IDS)
def test_convert_private_shared(benchmark: Any, bound: tuple[Vm, GuestMemfd], size: int) -> None:
    """One round: the range to private, then back to shared (two ioctls)."""
    vm, _ = bound

    def convert() -> None:
        vm.set_private(GPA, size)
        vm.set_shared(GPA, size)

    benchmark(convert)
    _rates(benchmark, 2 * size)


@pytest.mark.parametrize("bound", [VmType.SW_PROTECTED], indirect=True, ids=["sw_protected"])
@pytest.mark.parametrize("size", SIZES, ids=IDS)
def test_convert_with_punch(benchmark: Any, bound: tuple[Vm, GuestMemfd], size: int) -> None:
    """private_mem_conversions' DO_FALLOCATE round: allocate + private, shared + punch."""
    vm, g = bound

    def convert() -> None:
        g.fallocate(0, size)
        vm.set_private(GPA, size)
        vm.set_shared(GPA, size)
        g.punch_hole(0, size)

    benchmark(convert)
    _rates(benchmark, 2 * size)


@pytest.mark.parametrize("bound", [VmType.DEFAULT], indirect=True, ids=["default"])
@pytest.mark.parametrize("size", SIZES, ids=IDS)
def test_allocate_and_punch(benchmark: Any, bound: tuple[Vm, GuestMemfd], size: int) -> None:
    """fallocate(KEEP_SIZE) then fallocate(PUNCH_HOLE) of a bound guest_memfd range."""
    _, g = bound

    def cycle() -> None:
        g.fallocate(0, size)
        g.punch_hole(0, size)

    benchmark(cycle)
    _rates(benchmark, size)
