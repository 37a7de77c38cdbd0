"""private_mem_conversions_test variants the base matrix leaves out: its -s shared_hugetlb
backing with several vCPUs and memslots, 2 MiB hugetlb pages asked for explicitly, and the
4-vCPU / 4-memslot shapes (-n 4 -m 4).

The test body, guest and host loop are test_private_mem_conversions.py's
(test_private_mem_conversions: setup_vm, run_conversion_vcpu, expected_stats), called with
these parameters; kernel paths as documented there (KVM_HC_MAP_GPA_RANGE exits,
KVM_SET_MEMORY_ATTRIBUTES, fallocate/punch-hole on the guest_memfd). hugetlb rows skip naming
the free huge pages they need (ci/vm-run --append hugepages=64 provides them).
"""

from __future__ import annotations

import pytest
import test_private_mem_conversions as conv

from kvmpy.system import Kvm

pytestmark = pytest.mark.guest

VARIANTS = [
    # (vCPUs, memslots, backing)
    (2, 2, "hugetlb"),      # shared_hugetlb: a memfd with MFD_HUGETLB mapped MAP_SHARED
    (1, 1, "hugetlb_2m"),   # MFD_HUGE_2MB: 2 MiB pages whatever the default huge page size
    (2, 1, "hugetlb_2m"),
    (4, 4, "shmem"),        # one slot per vCPU
    (1, 4, "shmem"),        # one vCPU's area over four 1 MiB slots
]


@pytest.mark.parametrize(("nr_vcpus", "nr_slots", "backing"), VARIANTS,
                         ids=[f"{n}vcpu-{m}slot-{b}" for n, m, b in VARIANTS])
def test_private_mem_conversions_variant(kvm: Kvm, nr_vcpus: int, nr_slots: int, backing: str,
                                         request: pytest.FixtureRequest) -> None:
    """Every guest phase of private_mem_conversions_test, as
    test_private_mem_conversions.py::test_private_mem_conversions, for this shape."""
    conv.test_private_mem_conversions(kvm, nr_vcpus, nr_slots, backing, request)
