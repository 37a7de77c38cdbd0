"""Tests written to kill the kernel mutants of ci/mutants that the rest of the suite let survive
(docs/beyond.md, "Seeded kernel mutants"). Each test names its mutant; each also holds on an
unmutated kernel and on the emulated KVM.
"""

from __future__ import annotations

import mmap

import pytest

from kvmpy.guest import GuestVm
from kvmpy.guest.hypercall import enable_map_gpa_range_exit

# The scripted guest and its fixture, and the conversions host loop, from the experiments they
# belong to.
from .test_private_mem_beyond import (
    OP_CHECK,
    OP_MAP,
    Op,
    write_script,
)
from .test_private_mem_beyond import g as beyond_guest
from .test_private_mem_conversions import (
    MAP_GPA_DO_FALLOCATE,
    MAP_GPA_SET_ATTRIBUTES,
    run_conversion_vcpu,
)

pytestmark = pytest.mark.guest

CHURN = 64 << 20
g = beyond_guest  # fixture ``g``: a KVM_X86_SW_PROTECTED_VM GuestVm of guests/private_mem_beyond.c


def _dirty_and_free_host_memory(size: int = CHURN) -> None:
    """Fill ``size`` bytes of anonymous memory with 0xa5 and unmap it: the page allocator's next
    pages (the ones a guest_memfd gets) then hold stale bytes rather than boot-time zeroes."""
    m = mmap.mmap(-1, size)
    chunk = b"\xa5" * (4 << 20)
    for _ in range(size // len(chunk)):
        m.write(chunk)
    m.close()


def test_fresh_private_pages_read_zero_after_host_churn(g: GuestVm) -> None:
    """Kills 007-gmem-prepare-no-clear. Private guest_memfd pages the guest has never written
    read as zeroes (kvm_gmem_prepare_folio clears each folio before its first mapping: no host
    data leaks into the guest), also when the pages come straight from memory the host just
    dirtied and freed."""
    enable_map_gpa_range_exit(g.vm)
    size = 2 << 20
    gmem = g.vm.create_guest_memfd(size)
    mem = g.add_memory(size, backing="shmem", gmem=gmem)
    _dirty_and_free_host_memory()
    ops = [Op(OP_MAP, 0, size, MAP_GPA_SET_ATTRIBUTES | MAP_GPA_DO_FALLOCATE),
           Op(OP_CHECK, 0, size, 0)]
    table, n = write_script(g, mem.gpa, ops)
    st = run_conversion_vcpu(g, g.vcpu("guest_script", table, n))
    assert (st.hypercalls, st.to_private) == (1, 1), st
