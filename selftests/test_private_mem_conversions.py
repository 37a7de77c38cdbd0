"""private_mem_conversions_test (tools/testing/selftests/kvm/x86/private_mem_conversions_test.c),
in kvmpy.

Guest: guests/private_mem_conversions.c (guest_conversions; its SYNC stages and MAP_GPA_RANGE
request bits are guests/include/private_mem.h's). Host loop: run_conversion_vcpu below, one
thread per vCPU (test_private_mem_beyond.py reuses it for its own guests).

Pins, on a KVM_X86_SW_PROTECTED_VM:
* KVM_HC_MAP_GPA_RANGE exits to userspace once KVM_CAP_EXIT_HYPERCALL has bit 12
  (Documentation/virt/kvm/x86/hypercalls.rst "KVM_HC_MAP_GPA_RANGE"; api.rst 7.37), with
  hypercall.ret handed back to the guest's RAX;
* KVM_SET_MEMORY_ATTRIBUTES (api.rst 4.140) switches a gfn between the memslot's
  userspace_addr (shared) and its guest_memfd (private): private writes never appear in the
  shared backing, host writes to shared memory are seen by the guest, and converting a range
  leaves the rest of the area alone;
* fallocate(PUNCH_HOLE) on the guest_memfd frees private memory, which faults back in zeroed
  (api.rst 4.141 KVM_CREATE_GUEST_MEMFD);
* a guest_memfd keeps its VM alive: fallocate/punch-hole still succeed after the VM is freed.

Options of the C test as parameters: vCPUs (-n), memslots (-m), shared backing type (-s).
"""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from kvmpy.gmem import GuestMemfd
from kvmpy.guest import BackingUnavailable, GuestVm, UcallCmd
from kvmpy.guest.hypercall import MapGpaRange, complete_hypercall, enable_map_gpa_range_exit
from kvmpy.guest.ucall import UnexpectedExit, UnexpectedUcall
from kvmpy.guest.x86 import PAGE_2M
from kvmpy.system import Kvm
from kvmpy.testing.private_mem import require_private_mem
from kvmpy.uapi import PAGE_SIZE, ExitReason, MemoryAttribute, VmType
from kvmpy.vcpu import Exit, Vcpu

# Several vCPUs under TCG take tens of seconds on a busy host: the run's join budget (below)
# bounds a hang, so the per-test timeout (60 s in the CI VM) must not cut them first.
pytestmark = [pytest.mark.guest, pytest.mark.timeout(300)]

# guests/include/private_mem.h: the test's own bits in KVM_HC_MAP_GPA_RANGE's a2 (KVM passes a2
# through unread), and the SYNC stages.
MAP_GPA_SET_ATTRIBUTES = 1 << 0
MAP_GPA_SHARED = 1 << 1
MAP_GPA_DO_FALLOCATE = 1 << 2
SYNC_SHARED = 1
SYNC_PRIVATE = 2


# --- the host side (handle_exit_hypercall and the vCPU loop of the C test) ------------------
def handle_exit_hypercall(vcpu: Vcpu, ex: Exit) -> MapGpaRange:
    """fallocate (punch when converting to shared) if DO_FALLOCATE, KVM_SET_MEMORY_ATTRIBUTES
    if SET_ATTRIBUTES, then hypercall.ret = 0."""
    req = MapGpaRange.decode(ex)
    shared = bool(req.attributes & MAP_GPA_SHARED)
    if req.attributes & MAP_GPA_DO_FALLOCATE:
        vcpu.vm.guest_mem_fallocate(req.gpa, req.size, punch_hole=shared)
    if req.attributes & MAP_GPA_SET_ATTRIBUTES:
        vcpu.vm.set_memory_attributes(req.gpa, req.size, MemoryAttribute.NONE if shared
                                      else MemoryAttribute.PRIVATE)
    complete_hypercall(vcpu, 0)
    return req


def check_shared(g: GuestVm, gpa: int, size: int, byte: int, what: str = "") -> None:
    """Assert the shared backing (the memslots' userspace_addr) holds ``byte`` over the range."""
    data = g.read_phys(gpa, size)
    if data.count(byte) == size:  # C speed: a per-byte Python loop costs seconds under TCG
        return
    bad = next(k for k in range(size) if data[k] != byte)
    raise AssertionError(f"shared backing at gpa {gpa + bad:#x} holds {data[bad]:#04x}, "
                         f"expected {byte:#04x}{': ' + what if what else ''}")


def fill_shared(g: GuestVm, gpa: int, size: int, byte: int) -> None:
    """memset the shared backing behind [gpa, gpa+size) from the host."""
    g.write_phys(gpa, bytes([byte]) * size)


@dataclasses.dataclass
class ConversionStats:
    hypercalls: int = 0
    to_private: int = 0
    to_shared: int = 0
    punches: int = 0
    sync_shared: int = 0
    sync_private: int = 0


def run_conversion_vcpu(g: GuestVm, vcpu: Vcpu, timeout: float | None = None) -> ConversionStats:
    """HYPERCALL -> handle_exit_hypercall; SYNC_SHARED(gpa, size, cur, new): the shared backing
    holds ``cur``, then the host fills it with ``new``; SYNC_PRIVATE(gpa, size, p): it still
    holds ``p``; DONE ends. Anything else fails naming it."""
    st = ConversionStats()
    while True:
        r = g.run(vcpu, timeout)
        if isinstance(r, Exit):
            if r.reason != ExitReason.HYPERCALL:
                raise UnexpectedExit(r, f"{g.where(vcpu)}: expected KVM_EXIT_HYPERCALL or a "
                                        f"ucall (KVM_EXIT_IO), got {r}")
            a = handle_exit_hypercall(vcpu, r).attributes
            st.hypercalls += 1
            if a & MAP_GPA_SET_ATTRIBUTES:
                st.to_shared += bool(a & MAP_GPA_SHARED)
                st.to_private += not a & MAP_GPA_SHARED
            elif a & MAP_GPA_DO_FALLOCATE and a & MAP_GPA_SHARED:
                st.punches += 1
            continue
        if r.cmd == UcallCmd.DONE:
            return st
        who = g.where(vcpu, with_rip=False)
        if r.stage == SYNC_SHARED and len(r.args) == 5:
            _, gpa, size, cur, new = r.args
            check_shared(g, gpa, size, cur, f"SYNC_SHARED from {who}: the guest's shared writes "
                         "must reach the backing")
            fill_shared(g, gpa, size, new)
            st.sync_shared += 1
        elif r.stage == SYNC_PRIVATE and len(r.args) == 4:
            _, gpa, size, p = r.args
            check_shared(g, gpa, size, p, f"SYNC_PRIVATE from {who}: private writes must not be "
                         "visible in the shared backing")
            st.sync_private += 1
        else:
            raise UnexpectedUcall(r, f"{g.where(vcpu)}: unexpected ucall {r}")


# --- the test ---------------------------------------------------------------------------------

#: What each vCPU's guest touches (the C test's PER_CPU_DATA_SIZE).
AREA_SIZE = PAGE_2M + PAGE_SIZE
BASE_GPA = 1 << 32
FIRST_SLOT = 10

#: (vCPUs, memslots, backing): small enough for a few seconds per case on the emulator.
MATRIX = [
    (1, 1, "anonymous"),
    (1, 1, "shmem"),
    (1, 1, "thp"),
    (1, 1, "hugetlb"),
    (1, 2, "shmem"),     # 2 MiB slots: the 2 MiB + 4 KiB area spans both
    (2, 1, "shmem"),
    (2, 2, "shmem"),     # one slot per vCPU
    (2, 2, "anonymous"),
]


def per_cpu_size(backing: str) -> int:
    """align_up(AREA_SIZE, max(2 MiB, the backing's page size)): 4 MiB for every backing here
    (hugetlb uses the 2 MiB default huge page)."""
    align = PAGE_2M
    return (AREA_SIZE + align - 1) // align * align


#: guests/private_mem_conversions.c's range table: (offset, size) within the area.
RANGES = [(0, PAGE_SIZE), (0, PAGE_2M), (PAGE_SIZE, PAGE_SIZE), (PAGE_SIZE, PAGE_2M),
          (PAGE_2M, PAGE_SIZE)]


def expected_stats() -> ConversionStats:
    """The hypercalls and SYNCs of one vCPU's guest_conversions, counted from the phases."""
    st = ConversionStats()
    for _ in range(2):                       # explicit conversion, without/with fallocate
        st.sync_shared += 1                  # the initial 0xaa -> 0xcc handshake
        for _off, size in RANGES:
            st.to_private += 1
            if size == PAGE_SIZE:            # larger ranges skip the per-page part
                st.sync_private += 2         # the whole range, then its only (even) page
            st.to_shared += 2                # the range, then the whole area (freeing it)
            st.sync_shared += 1
    for _ in range(2):                       # punch-hole, imprecise/precise
        st.to_private += 1
        st.punches += 2 * len(RANGES)        # the whole area, then the range
    st.hypercalls = st.to_private + st.to_shared + st.punches
    return st


def setup_vm(kvm: Kvm, nr_vcpus: int, nr_slots: int, backing: str) -> tuple[GuestVm, GuestMemfd]:
    per_cpu = per_cpu_size(backing)
    total = per_cpu * nr_vcpus
    assert total % nr_slots == 0, f"{total:#x} bytes do not split into {nr_slots} memslots"
    slot_size = total // nr_slots
    g = GuestVm(kvm, "private_mem_conversions", vm_type=VmType.SW_PROTECTED, timeout=60.0)
    try:
        enable_map_gpa_range_exit(g.vm)
        # One guest_memfd behind every memslot, each slot at its own offset.
        gmem = g.vm.create_guest_memfd(total)
        for i in range(nr_slots):
            g.add_memory(slot_size, gpa=BASE_GPA + i * slot_size, slot=FIRST_SLOT + i,
                         backing=backing, gmem=gmem, gmem_offset=i * slot_size, map=False)
        for i in range(nr_vcpus):
            # Only the area is mapped: an overrun is a #PF, reported as a guest exception.
            g.map(BASE_GPA + i * per_cpu, BASE_GPA + i * per_cpu, AREA_SIZE)
    except BackingUnavailable as e:
        g.close()
        pytest.skip(str(e))
    except BaseException:
        g.close()
        raise
    return g, gmem


@pytest.mark.parametrize(("nr_vcpus", "nr_slots", "backing"), MATRIX,
                         ids=[f"{n}vcpu-{m}slot-{b}" for n, m, b in MATRIX])
def test_private_mem_conversions(kvm: Kvm, nr_vcpus: int, nr_slots: int, backing: str,
                                 request: pytest.FixtureRequest) -> None:
    """Every guest phase of private_mem_conversions_test: explicit conversion without and with
    fallocate over the range table {(0,4K),(0,2M),(4K,4K),(4K,2M),(2M,4K)} with per-page
    alternation, then punch-hole imprecise and precise; data checked on both sides."""
    require_private_mem(kvm)
    g, gmem = setup_vm(kvm, nr_vcpus, nr_slots, backing)
    per_cpu = per_cpu_size(backing)
    try:
        vcpus = [g.vcpu("guest_conversions", BASE_GPA + i * per_cpu) for i in range(nr_vcpus)]
        t0 = time.monotonic()
        # As the C test: every vCPU thread is created first, then all are released together.
        go = threading.Barrier(nr_vcpus)

        def vcpu_main(v: Vcpu) -> ConversionStats:
            go.wait(timeout=30.0)
            return run_conversion_vcpu(g, v)

        threads = [g.start(v, vcpu_main) for v in vcpus]
        stats: list[ConversionStats] = g.join(threads, timeout=120.0)
        elapsed = time.monotonic() - t0
        for st in stats:
            # Exactly the hypercalls and SYNCs the guest's phases make (nothing dropped or
            # repeated): see expected_stats().
            assert st == expected_stats(), f"{st} != {expected_stats()}"
        print(f"{nr_vcpus} vCPU(s), {nr_slots} slot(s), {backing}: {elapsed:.2f} s, {stats[0]}")
        g.vm.disown(gmem)
    finally:
        g.close()
    # The guest_memfd holds a reference on the VM: after the VM and its memslots are gone, the
    # file still works (the C test's final fallocate calls).
    try:
        gmem.punch_hole(0, per_cpu * nr_vcpus)
        gmem.fallocate(0, per_cpu * nr_vcpus)
    finally:
        gmem.close()
