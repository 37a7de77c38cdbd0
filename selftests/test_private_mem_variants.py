"""private_mem_conversions_test variants the base matrix leaves out: its -s shared_hugetlb
backing with several vCPUs and memslots, 2 MiB hugetlb pages asked for explicitly, and the
4-vCPU / 4-memslot shapes (-n 4 -m 4).

The guest, setup and host loop are test_private_mem_conversions.py's (setup_vm,
run_conversion_vcpu, expected_stats), imported; kernel paths as documented there (KVM_HC_MAP_GPA_RANGE exits,
KVM_SET_MEMORY_ATTRIBUTES, fallocate/punch-hole on the guest_memfd). hugetlb rows skip naming
the free huge pages they need (ci/vm-run --append hugepages=64 provides them).
"""

from __future__ import annotations

import threading

import pytest

from kvmpy.system import Kvm
from kvmpy.testing.private_mem import require_private_mem
from kvmpy.vcpu import Vcpu

from . import test_private_mem_conversions as conv

# Several vCPUs under TCG take tens of seconds on a busy host: the run's join budget (below)
# bounds a hang, so the per-test timeout (60 s in the CI VM) must not cut them first.
pytestmark = [pytest.mark.guest, pytest.mark.timeout(300)]

VARIANTS = [
    # (vCPUs, memslots, backing)
    (2, 2, "hugetlb"),      # shared_hugetlb: a memfd with MFD_HUGETLB mapped MAP_SHARED
    (1, 1, "hugetlb_2m"),   # MFD_HUGE_2MB: 2 MiB pages whatever the default huge page size
    (2, 1, "hugetlb_2m"),
    (4, 4, "shmem"),        # one slot per vCPU
    (1, 4, "shmem"),        # one vCPU's area over four 1 MiB slots
]


@pytest.mark.timeout(900)
@pytest.mark.parametrize(("nr_vcpus", "nr_slots", "backing"), VARIANTS,
                         ids=[f"{n}vcpu-{m}slot-{b}" for n, m, b in VARIANTS])
def test_private_mem_conversions_variant(kvm: Kvm, nr_vcpus: int, nr_slots: int,
                                         backing: str) -> None:
    """Every guest phase of private_mem_conversions_test for this shape, with the exact
    hypercall and SYNC counts per vCPU (conv.expected_stats()), as
    test_private_mem_conversions.py::test_private_mem_conversions; the join budget grows with
    the vCPU count (a nested TCG run needs ~100 s per vCPU)."""
    require_private_mem(kvm)
    g, gmem = conv.setup_vm(kvm, nr_vcpus, nr_slots, backing)
    per_cpu = conv.per_cpu_size(backing)
    try:
        vcpus = [g.vcpu("guest_conversions", conv.BASE_GPA + i * per_cpu)
                 for i in range(nr_vcpus)]
        go = threading.Barrier(nr_vcpus)

        def vcpu_main(v: Vcpu) -> conv.ConversionStats:
            go.wait(timeout=60.0)
            return conv.run_conversion_vcpu(g, v, timeout=180.0 * nr_vcpus)

        stats = g.join([g.start(v, vcpu_main) for v in vcpus], timeout=180.0 * nr_vcpus)
        for i, st in enumerate(stats):
            assert st == conv.expected_stats(), f"vCPU {i}: {st} != {conv.expected_stats()}"
        g.vm.disown(gmem)
    finally:
        g.close()
    try:  # the guest_memfd outlives its VM (the C test's final fallocate calls)
        gmem.punch_hole(0, per_cpu * nr_vcpus)
        gmem.fallocate(0, per_cpu * nr_vcpus)
    finally:
        gmem.close()
