"""The emulated guest_memfd refuses migration like 7.3's kvm_gmem_migrate_folio() (issue 14).

selftests/test_gmem_numa.py needs two NUMA nodes; these checks run on one: the emulator passes
mbind's policy through but not MPOL_MF_MOVE for a guest_memfd range, and move_pages() to another
node leaves a guest_memfd page where it is (status untouched: 0), while a page of an ordinary
mapping is moved (or refused) by the host kernel as usual.
"""

from __future__ import annotations

import pytest

from kvmpy.backend import Backend
from kvmpy.backend.emu import EmuBackend
from kvmpy.backend.libc import MPOL_BIND, MPOL_MF_MOVE, MPOL_MF_STRICT
from kvmpy.memory import anonymous
from kvmpy.system import Kvm
from kvmpy.uapi import PAGE_SIZE, GuestMemfdFlag, VmType

P = PAGE_SIZE
SHARED = int(GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED)


def test_mbind_move_of_guest_memfd_keeps_policy_drops_move(
        monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, int]] = []
    monkeypatch.setattr(Backend, "mbind",
                        lambda self, a, n, mode, mask, flags=0: seen.append((a, flags)))
    kvm = Kvm(EmuBackend(profile="7.3"))
    with kvm.create_vm(VmType.DEFAULT) as vm, vm.create_guest_memfd(4 * P, SHARED) as g, \
            g.mmap() as m, anonymous(kvm.backend, P) as anon:
        assert m.try_mbind(0, 2 * P, MPOL_BIND, 1, MPOL_MF_MOVE | MPOL_MF_STRICT) == 0
        assert anon.try_mbind(0, P, MPOL_BIND, 1, MPOL_MF_MOVE) == 0
    assert seen == [(m.addr, MPOL_MF_STRICT), (anon.addr, MPOL_MF_MOVE)]


def test_move_pages_leaves_guest_memfd_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    moves: list[tuple[list[int], list[int] | None]] = []

    def fake(self: Backend, addrs: list[int], nodes: list[int] | None = None,
             flags: int = 0) -> list[int]:
        moves.append((addrs, nodes))
        return [0] * len(addrs) if nodes is None else list(nodes)   # "everything on node 0"

    monkeypatch.setattr(Backend, "move_pages", fake)
    kvm = Kvm(EmuBackend(profile="7.3"))
    with kvm.create_vm(VmType.DEFAULT) as vm, vm.create_guest_memfd(2 * P, SHARED) as g, \
            g.mmap() as m, anonymous(kvm.backend, P) as anon:
        m.write(0, b"x" * 2 * P)
        assert m.move_pages([0, P], [1, 0]) == [0, 0]   # to node 1: not moved; node 0: there
        assert m.move_pages([0, P]) == [0, 0]            # a query passes through
        assert anon.move_pages([0], [1]) == [1]         # not a guest_memfd: the kernel moves it
    gmem_pages = {m.addr, m.addr + P}
    assert not [a for addrs, nodes in moves if nodes is not None for a in addrs
                if a in gmem_pages], f"guest_memfd pages passed to a real move: {moves}"
