"""NUMA placement of the guest_memfd pages KVM itself allocates, and migration refused.

Upstream's guest_memfd_test::test_numa_allocation checks pages faulted in by the host through
the mapping (kvmpy: test_guest_memfd.py::test_numa_allocation). 7.3 virt/kvm/guest_memfd.c keeps
one shared mempolicy per guest_memfd inode (kvm_gmem_set_policy() / kvm_gmem_get_policy(), set
with mbind on a mapping) and kvm_gmem_get_folio() allocates every folio by it, whoever asks:
fallocate (kvm_gmem_allocate()), a guest fault (kvm_gmem_get_pfn()) and KVM_PRE_FAULT_MEMORY
(the same path from kvm_tdp_page_prefault()). Pages are located with move_pages(nodes=NULL)
after a host read maps the existing folio.

Migration: kvm_gmem_aops.migrate_folio is kvm_gmem_migrate_folio(), which WARN_ON_ONCE()s and
returns -EINVAL, so mbind(MPOL_MF_MOVE | MPOL_MF_STRICT) and move_pages() to another node leave
the pages where they are; the host-health check (kvmpy/testing/health.py) fails the test if the
kernel logs that WARN, which is then a finding to report.

Needs two NUMA nodes (skip naming the count otherwise) and an MMAP|INIT_SHARED guest_memfd (the
host must map the pages to locate them).
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from kvmpy.backend.libc import MPOL_BIND, MPOL_MF_MOVE, MPOL_MF_STRICT
from kvmpy.guest import GuestVm
from kvmpy.system import Kvm
from kvmpy.testing.errnos import errname, expect_errno, memslot_accepts_guest_memfd
from kvmpy.testing.require import where
from kvmpy.uapi import PAGE_SIZE, Cap, GuestMemfdFlag

from .conftest import require_gmem_flags

pytestmark = pytest.mark.guest

P = PAGE_SIZE
NPAGES = 8
GPA = 1 << 32
MMAP_SHARED = int(GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED)


def _require_two_nodes() -> None:
    base = Path("/sys/devices/system/node")
    n = len(list(base.glob("node[0-9]*"))) if base.exists() else 1
    if n < 2:
        pytest.skip(f"host has {n} NUMA node(s) (/sys/devices/system/node): KVM-allocated "
                    "guest_memfd placement needs nodes 0 and 1")




def test_kvm_allocations_follow_policy(kvm: Kvm, vm_type: int,
                                       make_vm: object) -> None:
    """Pages 0-3 bound to node 1 and 4-7 to node 0 by mbind on the guest_memfd mapping: the
    pages allocated by fallocate (0, 4), by a guest write (1, 5) and by KVM_PRE_FAULT_MEMORY
    (2, 6; where offered) are on their range's node; migrating node 1's pages is refused and
    they stay."""
    with GuestVm(kvm, "smoke", vm_type=vm_type, timeout=60.0) as g:
        # The kernel's capabilities first: a kernel without guest_memfd skips naming them, not
        # the machine's node count (6.1's VM stage has one node).
        require_gmem_flags(g.vm, MMAP_SHARED)
        if not memslot_accepts_guest_memfd(g.vm):
            pytest.skip(f"KVM_MEM_GUEST_MEMFD memslots not accepted on {where(g.vm)}")
        _require_two_nodes()
        r = g.add_memory(NPAGES * P, gpa=GPA, gmem=True, gmem_flags=MMAP_SHARED, shared="gmem")
        assert r.gmem is not None and r.gmem_map is not None
        m = r.gmem_map
        expect_errno(m.try_mbind(0, 4 * P, MPOL_BIND, 0b10), 0, "pages 0-3 to node 1")
        expect_errno(m.try_mbind(4 * P, 4 * P, MPOL_BIND, 0b01), 0, "pages 4-7 to node 0")

        by: dict[int, str] = {}
        for page in (0, 4):
            r.gmem.fallocate(page * P, P)
            by[page] = "fallocate"
        for page in (1, 5):
            v = g.vcpu("guest_mem_rw", GPA + page * P, P, 0, 0x11)
            g.expect_sync(v)
            g.expect_done(v)
            by[page] = "guest write"
        if g.vm.check_extension(Cap.PRE_FAULT_MEMORY):
            v = g.vcpu("guest_nop")
            for page in (2, 6):
                v.pre_fault_memory(GPA + page * P, P)
                by[page] = "KVM_PRE_FAULT_MEMORY"
        pages = sorted(by)
        for page in pages:  # map the existing folio into this process to locate it
            m.read(page * P, 1)
        got = m.move_pages([page * P for page in pages])
        want = [1 if page < 4 else 0 for page in pages]
        wrong = [f"page {p} ({by[p]}) on node {n}, expected {w}"
                 for p, n, w in zip(pages, got, want, strict=True) if n != w]
        assert not wrong, "; ".join(wrong)

        low = [page * P for page in pages if page < 4]
        err = m.try_mbind(0, 4 * P, MPOL_BIND, 0b01, MPOL_MF_MOVE | MPOL_MF_STRICT)
        moved = m.move_pages(low, [0] * len(low))
        after = m.move_pages(low)
        print(f"mbind(MPOL_MF_MOVE|STRICT to node 0) -> {errname(err)}; move_pages to node 0 "
              f"status {moved}; nodes after {after}")
        expect_errno(err, (errno.EIO, errno.EINVAL), "a refusal: kvm_gmem_migrate_folio()")
        assert after == [1] * len(low), \
            f"guest_memfd pages moved to nodes {after}: migration must be refused"
