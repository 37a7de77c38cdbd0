"""Stress: several vCPUs read and write while the host converts and punches ranges under them.

Guest: guests/stress_conv.c (guest_stress). The host publishes each page's state (epoch,
shared/private) and moves a page only after a grace period in which every vCPU starts two
more iterations, so every guest access that saw a stable state can be checked strictly. The
data invariants (checked by the guest on every access, and by the host on the shared memory
at every transition):

* no stale private data visible as shared: the shared view never holds private writes
  (api.rst 4.141 KVM_SET_MEMORY_ATTRIBUTES: private gfns are served from the guest_memfd);
* no lost host writes: a shared read returns the host's latest write of the page;
* private memory starts zeroed after a punch-hole (api.rst 4.141 KVM_CREATE_GUEST_MEMFD) and
  never shows the host's shared data or private data from before the punch.

Modes: ``convert`` (KVM_X86_SW_PROTECTED_VM with KVM_SET_MEMORY_ATTRIBUTES: private <-> shared
conversions of multi-page ranges, punch-holes while private and when converting to shared) and
``punch`` (a GUEST_MEMFD_FLAG_MMAP|INIT_SHARED guest_memfd as the slot's memory: the host
punches ranges and rewrites them through the mapping; what real KVM offers without attributes).

Bounded: KVMPY_STRESS_OPS host operations (default 200) and KVMPY_STRESS_SECONDS (default 6 s)
per case, KVMPY_STRESS_VCPUS vCPUs (default 2).
"""

from __future__ import annotations

import ctypes
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from kvmpy.guest import GuestVm
from kvmpy.guest.backing import MemRegion
from kvmpy.guest.threads import VcpuThread
from kvmpy.memory import Mapping
from kvmpy.system import Kvm
from kvmpy.testing.errnos import valid_gmem_flags
from kvmpy.testing.private_mem import require_private_mem
from kvmpy.testing.require import where
from kvmpy.uapi import PAGE_SIZE, GuestMemfdFlag, VmType
from kvmpy.vcpu import Vcpu

pytestmark = pytest.mark.guest

OPS = int(os.environ.get("KVMPY_STRESS_OPS", "200"))
SECONDS = float(os.environ.get("KVMPY_STRESS_SECONDS", "6"))
VCPUS = int(os.environ.get("KVMPY_STRESS_VCPUS", "2"))
NPAGES = 16
GRACE_TIMEOUT = 30.0

# struct stress_ctl (guests/stress_conv.c)
MAX_PAGES, MAX_VCPUS = 64, 8
OFF_STOP, OFF_NPAGES, OFF_BASE, OFF_MAX_ITERS = 0, 8, 16, 24
OFF_STATE = 32
OFF_HOSTSEQ = OFF_STATE + 8 * MAX_PAGES
OFF_ACK = OFF_HOSTSEQ + 8 * MAX_PAGES
ACK_DONE = 1 << 63
TRANSITION, SHARED, PRIVATE = 0, 1, 2
TAG_HOST, TAG_PRIV, TAG_SG = 0x48, 0x50, 0x53


def value(tag: int, epoch: int, low: int) -> int:
    return tag << 56 | (epoch & 0xFFFFFF) << 24 | (low & 0xFFFFFF)


def tag_epoch(v: int) -> tuple[int, int]:
    return v >> 56, (v >> 24) & 0xFFFFFF


@dataclass
class Stats:
    ops: int = 0
    to_private: int = 0
    to_shared: int = 0
    punches: int = 0
    host_writes: int = 0
    accesses: list[tuple[int, int]] = field(default_factory=list)


class Stress:
    """The host side: the control block, page states and the operations."""

    def __init__(self, g: GuestVm, region: MemRegion, host: Mapping, mode: str,
                 seed: int, kick: bool = False) -> None:
        self.g, self.region, self.host, self.mode = g, region, host, mode
        self.kick = kick
        self.vcpus: list[Vcpu] = []
        self.rnd = random.Random(seed)
        self.ctl = g.alloc_low(1)
        assert g.low is not None
        self._ctl_addr = g.low.addr + self.ctl
        self.kind = [SHARED] * NPAGES
        self.epoch = [1] * NPAGES
        self.next_epoch = 2
        self.hostval = [0] * NPAGES
        self.stats = Stats()
        self.set(OFF_NPAGES, NPAGES)
        self.set(OFF_BASE, region.gpa)
        self.set(OFF_MAX_ITERS, 1 << 40)
        for p in range(NPAGES):
            self.host_write_q0(p, value(TAG_HOST, 1, 0))
            self.publish(p)

    # --- control block and host view --------------------------------------------------------
    def set(self, off: int, v: int) -> None:
        ctypes.c_uint64.from_address(self._ctl_addr + off).value = v

    def get(self, off: int) -> int:
        return int(ctypes.c_uint64.from_address(self._ctl_addr + off).value)

    def q(self, p: int, i: int) -> int:
        return int(ctypes.c_uint64.from_address(self.host.addr + p * PAGE_SIZE + 8 * i).value)

    def set_q(self, p: int, i: int, v: int) -> None:
        ctypes.c_uint64.from_address(self.host.addr + p * PAGE_SIZE + 8 * i).value = v

    def host_write_q0(self, p: int, v: int) -> None:
        """Write the page's host value, then publish it (the guest reads hostseq first)."""
        self.set_q(p, 0, v)
        self.hostval[p] = v
        self.set(OFF_HOSTSEQ + 8 * p, v)

    def publish(self, p: int) -> None:
        self.set(OFF_STATE + 8 * p, self.epoch[p] << 2 | self.kind[p])

    # --- grace period ---------------------------------------------------------------------------
    def grace(self, threads: list[VcpuThread]) -> None:
        """Wait until every vCPU still looping has started two more iterations."""
        snap = [self.get(OFF_ACK + 8 * i) for i in range(len(threads))]
        deadline = time.monotonic() + GRACE_TIMEOUT
        while True:
            pending = [i for i, s in enumerate(snap)
                       if s != ACK_DONE and self.get(OFF_ACK + 8 * i) not in
                       (ACK_DONE,) and self.get(OFF_ACK + 8 * i) < s + 2]
            if not pending:
                return
            dead = [i for i in pending if not threads[i].is_alive()]
            if dead:
                raise StopIteration   # a vCPU ended (a guest assertion): join reports it
            if time.monotonic() > deadline:
                raise AssertionError(f"vCPUs {pending} made no progress for {GRACE_TIMEOUT} s "
                                     f"(grace period) on {where(self.g.vm)}")
            time.sleep(0.0002)

    def sync_vcpus(self, threads: list[VcpuThread]) -> None:
        """Kick every looping vCPU out of KVM_RUN and wait until its run returned (the next
        KVM_RUN starts with the invalidations applied): what KVM's synchronous remote TLB
        flush guarantees by itself before KVM_SET_MEMORY_ATTRIBUTES returns."""
        deadline = time.monotonic() + GRACE_TIMEOUT
        for v, t in zip(self.vcpus, threads, strict=True):
            v.last_exit = None
            while t.is_alive() and v.last_exit is None and self.get(OFF_ACK + 8 * v.id) != ACK_DONE:
                if time.monotonic() > deadline:
                    raise AssertionError(f"vCPU {v.id} did not leave KVM_RUN after a kick")
                v.kick()
                time.sleep(0.0005)

    # --- checks of the shared view ------------------------------------------------------------
    def check_shared_view(self, p: int) -> None:
        """At a transition (after the grace period): what the host's shared view must hold."""
        q0, q1, q2 = self.q(p, 0), self.q(p, 1), self.q(p, 2)
        where_ = f"page {p} ({'shared' if self.kind[p] == SHARED else 'private'} epoch " \
                 f"{self.epoch[p]})"
        assert q0 == self.hostval[p], (f"{where_}: the host's write {self.hostval[p]:#x} was "
                                       f"lost: the shared view holds {q0:#x}")
        assert q1 == 0, f"{where_}: private data {q1:#x} is visible in the shared view"
        if q2:
            t, e = tag_epoch(q2)
            assert t == TAG_SG, f"{where_}: q2 holds {q2:#x}, not a guest shared write"
            assert (self.kind[p] == SHARED and e == self.epoch[p]) or \
                (self.mode == "convert" and e < self.epoch[p]), \
                f"{where_}: q2 holds a guest write of epoch {e} (stale after a punch-hole?)"

    # --- one host operation -------------------------------------------------------------------
    def operate(self, threads: list[VcpuThread]) -> None:
        rnd, st = self.rnd, self.stats
        p0 = rnd.randrange(NPAGES)
        pages = [p0]
        for p in range(p0 + 1, min(NPAGES, p0 + rnd.randint(1, 4))):
            if self.kind[p] != self.kind[p0]:
                break
            pages.append(p)
        kind = self.kind[p0]
        for p in pages:
            self.set(OFF_STATE + 8 * p, self.epoch[p] << 2 | TRANSITION)
        self.grace(threads)
        for p in pages:
            self.check_shared_view(p)
        gpa = self.region.gpa + p0 * PAGE_SIZE
        size = len(pages) * PAGE_SIZE
        gmem = self.region.gmem
        assert gmem is not None
        off = self.region.gmem_offset + p0 * PAGE_SIZE
        vm = self.g.vm
        if self.mode == "punch":
            gmem.punch_hole(off, size)
            st.punches += 1
            for p in pages:
                got = (self.q(p, 0), self.q(p, 1), self.q(p, 2))
                assert got == (0, 0, 0), (f"page {p} reads {[hex(x) for x in got]} right "
                                          "after a punch-hole, not zeroes (api.rst 4.141)")
            new = SHARED
        elif kind == SHARED:
            vm.set_private(gpa, size)
            st.to_private += 1
            new = PRIVATE
        elif rnd.random() < 0.5:
            vm.set_shared(gpa, size)
            gmem.punch_hole(off, size)       # private_mem_conversions' DO_FALLOCATE
            st.to_shared += 1
            st.punches += 1
            new = SHARED
        else:
            gmem.punch_hole(off, size)       # private stays private, contents freed
            st.punches += 1
            new = PRIVATE
        if self.kick:
            self.sync_vcpus(threads)
        for p in pages:
            self.kind[p] = new
            self.epoch[p] = self.next_epoch
            self.next_epoch += 1
            if new == SHARED:
                if self.mode == "convert":
                    self.set_q(p, 2, 0)      # the shared backing is not punched: reset
                self.host_write_q0(p, value(TAG_HOST, self.epoch[p], 0))
            self.publish(p)
        st.ops += 1
        # Plus a host write to a stable shared page (no transition: the guest must see it).
        shared = [p for p in range(NPAGES) if self.kind[p] == SHARED]
        if shared:
            p = rnd.choice(shared)
            seq = (self.hostval[p] & 0xFFFFFF) + 1
            self.host_write_q0(p, value(TAG_HOST, self.epoch[p], seq))
            st.host_writes += 1


def run_stress(g: GuestVm, region: MemRegion, host: Mapping, mode: str,
               kick: bool = False) -> Stats:
    s = Stress(g, region, host, mode, seed=int(os.environ.get("KVMPY_STRESS_SEED", "1")),
               kick=kick)
    vcpus = [g.vcpu("guest_stress", s.ctl, i, vcpu_id=i) for i in range(VCPUS)]
    s.vcpus = vcpus
    budget = SECONDS + GRACE_TIMEOUT + 30

    def vcpu_main(vcpu: object) -> int:
        return int(g.expect_done(vcpu, timeout=budget).args[0])  # type: ignore[arg-type]

    threads = [g.start(v, vcpu_main) for v in vcpus]
    deadline = time.monotonic() + SECONDS
    try:
        while s.stats.ops < OPS and time.monotonic() < deadline:
            s.operate(threads)
    except StopIteration:
        pass
    finally:
        s.set(OFF_STOP, 1)
        results = g.join(threads, timeout=budget)
    s.stats.accesses = [(r >> 32, r & 0xFFFF_FFFF) for r in results]
    return s.stats


@pytest.fixture
def budget_note() -> Iterator[None]:
    t0 = time.monotonic()
    yield
    print(f"elapsed {time.monotonic() - t0:.1f} s")


#: "strict": nothing but the conversions, relying on KVM zapping the SPTEs and flushing every
#: vCPU's TLB before KVM_SET_MEMORY_ATTRIBUTES returns (kvm_vm_set_mem_attributes ->
#: kvm_unmap_gfn_range + kvm_flush_remote_tlbs); this case found that the emulated KVM applied
#: invalidations only at the end of a running vCPU's time slice (fixed in emu vCPU 6b1026a).
#: "kick": the host also forces the vCPUs out of KVM_RUN after each conversion.
@pytest.mark.parametrize("sync", ["strict", "kick"])
def test_stress_convert(kvm: Kvm, sync: str, budget_note: None) -> None:
    """Convert multi-page ranges private <-> shared and punch them while vCPUs access them:
    no private data visible as shared, no lost host writes, private memory zeroed after
    every punch (SW_PROTECTED VM, one guest_memfd behind a shmem-backed slot)."""
    require_private_mem(kvm, hypercall_exit=False)
    with GuestVm(kvm, "stress_conv", vm_type=VmType.SW_PROTECTED, timeout=60.0) as g:
        region = g.add_memory(NPAGES * PAGE_SIZE, gmem=True)
        assert region.host is not None
        st = run_stress(g, region, region.host, "convert", kick=sync == "kick")
    print(st)
    assert st.ops > 0 and st.to_private > 0, st
    # Each vCPU must have made both kinds of checked accesses, or the test checked nothing.
    assert sum(a for a, _ in st.accesses) > 0 and sum(b for _, b in st.accesses) > 0, st


def test_stress_punch(kvm: Kvm, budget_note: None) -> None:
    """Punch ranges of a MMAP|INIT_SHARED guest_memfd (the slot's own memory) and rewrite them
    through the mapping while vCPUs access them: punched ranges read back zeroed on both
    sides, no lost host writes."""
    with kvm.create_vm(VmType.DEFAULT) as probe:
        valid = valid_gmem_flags(probe)
    want = GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED
    if valid & want != want:
        pytest.skip(f"GUEST_MEMFD_FLAG_MMAP|INIT_SHARED not in KVM_CAP_GUEST_MEMFD_FLAGS="
                    f"{valid:#x} on {where(kvm)}")
    with GuestVm(kvm, "stress_conv", timeout=60.0) as g:
        region = g.add_memory(NPAGES * PAGE_SIZE, gmem=True, gmem_flags=int(want),
                              backing="none", shared="gmem")
        assert region.gmem_map is not None
        st = run_stress(g, region, region.gmem_map, "punch")
    print(st)
    assert st.ops > 0 and st.punches > 0, st
    assert sum(a for a, _ in st.accesses) > 0, st
