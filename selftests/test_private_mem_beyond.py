"""Private memory beyond the kernel's selftests. Guest: guests/private_mem_beyond.c.

All on a KVM_X86_SW_PROTECTED_VM (the requirement of private_mem_conversions_test):
* userspace resolves KVM_EXIT_MEMORY_FAULT (api.rst 5. "KVM_EXIT_MEMORY_FAULT": "userspace
  ... is expected to resolve the fault and re-run") - by converting the gfn
  (KVM_SET_MEMORY_ATTRIBUTES), or by re-creating the deleted guest_memfd memslot, whose private
  contents survive in the guest_memfd file;
* converting pages while other vCPUs keep writing and checking the neighbouring pages (a
  conversion zaps exactly the converted gfns: api.rst 4.140);
* a private page punched (fallocate PUNCH_HOLE on the guest_memfd) reads back as zeroes while
  its neighbour keeps its data (api.rst 4.141);
* KVM_HC_MAP_GPA_RANGE argument checks and the exit-enable bit
  (Documentation/virt/kvm/x86/hypercalls.rst; x86.c: -KVM_ENOSYS unless KVM_CAP_EXIT_HYPERCALL
  has bit 12, -KVM_EINVAL for an unaligned gpa, zero pages or a range whose gfn wraps; a2 and
  hypercall.ret pass through unchanged).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import struct
from collections.abc import Iterator

import pytest

from kvmpy.guest import BackingUnavailable, GuestVm, UcallCmd
from kvmpy.guest.hypercall import MAP_GPA_RANGE_BIT, enable_map_gpa_range_exit
from kvmpy.guest.x86 import PAGE_2M
from kvmpy.system import Kvm
from kvmpy.testing.errnos import expect_errno
from kvmpy.testing.private_mem import require_private_mem
from kvmpy.uapi import (
    PAGE_SIZE,
    ExitReason,
    Hypercall,
    HypercallExitFlag,
    KvmHcError,
    MapGpaRangeAttr,
    MemFlag,
    MemoryExitFlag,
    VmType,
)
from kvmpy.vcpu import Exit

# The conversions experiment's host loop and helpers, reused for these guests (they speak the
# same guests/include/private_mem.h protocol).
from .test_private_mem_conversions import (
    MAP_GPA_DO_FALLOCATE,
    MAP_GPA_SET_ATTRIBUTES,
    MAP_GPA_SHARED,
    check_shared,
    fill_shared,
    run_conversion_vcpu,
)

pytestmark = pytest.mark.guest

MASK64 = (1 << 64) - 1
BASE_GPA = 1 << 32


@pytest.fixture
def g(kvm: Kvm) -> Iterator[GuestVm]:
    require_private_mem(kvm)
    with GuestVm(kvm, "private_mem_beyond", vm_type=VmType.SW_PROTECTED, timeout=60.0) as gvm:
        yield gvm


# --- userspace resolves memory faults -----------------------------------------------------------
def test_userspace_converts_on_each_memory_fault(g: GuestVm) -> None:
    """Pages of a slot without guest_memfd are private; the guest writes them in a scrambled
    order. Each first touch exits with KVM_EXIT_MEMORY_FAULT (PRIVATE, that page, 4096) and the
    host converts just that page to shared and re-runs; the interrupted rep stosq resumes, and in
    the end every page holds the guest's data in the shared backing and reads back in the guest."""
    npages, stride = 16, 5
    mem = g.add_memory(npages * PAGE_SIZE, backing="shmem")
    mem.fill(0xEE)
    g.vm.set_private(mem.gpa, mem.size)
    vcpu = g.vcpu("guest_fault_loop", mem.gpa, npages, stride)
    expected = [mem.gpa + (i * stride % npages) * PAGE_SIZE for i in range(npages)]
    faults: list[int] = []
    while True:
        r = g.run(vcpu)
        if isinstance(r, Exit):
            assert r.reason == ExitReason.MEMORY_FAULT and r.memory_fault is not None, r
            mf = r.memory_fault
            assert (mf.flags, mf.size) == (MemoryExitFlag.PRIVATE, PAGE_SIZE), r
            assert len(faults) < npages, f"fault #{len(faults) + 1} at {mf.gpa:#x}: too many"
            assert mf.gpa == expected[len(faults)], \
                f"fault #{len(faults) + 1} at gpa {mf.gpa:#x}, expected the page the guest " \
                f"writes next, {expected[len(faults)]:#x}"
            faults.append(mf.gpa)
            g.vm.set_shared(mf.gpa, PAGE_SIZE)
            continue
        assert r.cmd == UcallCmd.SYNC, r
        break
    assert faults == expected
    for idx in range(npages):
        check_shared(g, mem.gpa + idx * PAGE_SIZE, PAGE_SIZE, idx + 1,
                     f"page {idx} after the host converted it on its fault")
    g.expect_done(vcpu)   # the guest re-read every page: no more faults


def test_userspace_recreates_deleted_slot_on_memory_fault(
        g: GuestVm, kvm: Kvm, request: pytest.FixtureRequest) -> None:
    """A private page of a guest_memfd slot is written; the host deletes the slot; the guest's
    re-read exits with KVM_EXIT_MEMORY_FAULT (PRIVATE: the attribute outlives the slot); the host
    re-creates the slot on the same guest_memfd range and re-runs: the guest reads its own data
    (kept in the guest_memfd), which never reached the shared backing."""
    mem = g.add_memory(PAGE_SIZE, backing="shmem", gmem=True)
    assert mem.gmem is not None
    mem.fill(0x3C)
    g.vm.set_private(mem.gpa, PAGE_SIZE)
    vcpu = g.vcpu("guest_write_sync_read", mem.gpa, 0x6B)
    g.expect_sync(vcpu, 1)
    g.vm.delete_memslot(mem.slot)
    r = g.run(vcpu)
    assert isinstance(r, Exit) and r.reason == ExitReason.MEMORY_FAULT, \
        f"a private read with the slot deleted must be KVM_EXIT_MEMORY_FAULT, got {r}"
    assert r.memory_fault is not None
    assert (r.memory_fault.flags, r.memory_fault.gpa) == (MemoryExitFlag.PRIVATE, mem.gpa), r
    g.vm.set_user_memory_region2(mem.slot, MemFlag.GUEST_MEMFD, mem.gpa, PAGE_SIZE,
                                 mem.userspace_addr, mem.gmem, 0)
    g.expect_done(vcpu)
    check_shared(g, mem.gpa, PAGE_SIZE, 0x3C, "private writes must stay in the guest_memfd")


# --- conversions next to busy vCPUs ---------------------------------------------------------------
WORKERS = [(1, "shared"), (3, "private"), (5, "shared")]


def test_conversion_while_neighbours_busy(g: GuestVm) -> None:
    """vCPU 0 converts pages 0, 2, 4 to private and back (with punch-hole) for several rounds;
    vCPUs 1-3 meanwhile rewrite and check pages 1 (shared), 3 (private) and 5 (shared) until it is
    done. No neighbour ever reads a wrong byte, the shared neighbours' last writes are in the
    backing, and the private neighbour's are not."""
    enable_map_gpa_range_exit(g.vm)
    mem = g.add_memory(8 * PAGE_SIZE, backing="shmem", gmem=True)
    mem.fill(0x5A)
    for page, kind in WORKERS:
        if kind == "private":
            g.vm.set_private(mem.gpa + page * PAGE_SIZE, PAGE_SIZE)
    conv = g.vcpu("guest_converter", mem.gpa, 3, 4, len(WORKERS))
    workers = [g.vcpu("guest_neighbour", mem.gpa + page * PAGE_SIZE) for page, _ in WORKERS]
    threads = [g.start(conv, functools.partial(run_conversion_vcpu, g))]
    threads += [g.start(w) for w in workers]
    stats, *syncs = g.join(threads, timeout=120.0)
    assert stats.to_private == 3 * 4 and stats.to_shared == 3 * 4, stats
    assert stats.sync_private == 3 * 4, stats
    for (page, kind), s in zip(WORKERS, syncs, strict=True):
        assert len(s) == 1 and s[0].args[0] == 1, s
        _, iters, last = s[0].args
        assert iters > 0, f"worker on page {page} never ran its loop"
        gpa = mem.gpa + page * PAGE_SIZE
        if kind == "shared":
            check_shared(g, gpa, PAGE_SIZE, last, f"shared neighbour page {page}")
        else:
            check_shared(g, gpa, PAGE_SIZE, 0x5A, f"private neighbour page {page}")
    # The converted pages ended shared with the host's byte (checked by the guest too).
    for k in range(3):
        check_shared(g, mem.gpa + 2 * k * PAGE_SIZE, PAGE_SIZE, 0x5A, f"converted page {2 * k}")


# --- punch-hole then re-read ------------------------------------------------------------------
def test_punched_private_page_rereads_zero(g: GuestVm) -> None:
    """Private pages a and b hold 0x5a and 0xa5; punching a's guest_memfd page (no attribute
    change) makes the guest read a as zeroes while b keeps 0xa5; a is writable again afterwards,
    and neither page's private data reached the shared backing."""
    enable_map_gpa_range_exit(g.vm)
    mem = g.add_memory(2 * PAGE_SIZE, backing="shmem", gmem=True)
    mem.fill(0x3C)
    vcpu = g.vcpu("guest_punch_reread", mem.gpa, mem.gpa + PAGE_SIZE)
    st = run_conversion_vcpu(g, vcpu)
    assert (st.to_private, st.punches, st.sync_private) == (2, 1, 2), st


# --- KVM_HC_MAP_GPA_RANGE edge cases -----------------------------------------------------------
EINVAL = -KvmHcError.EINVAL & MASK64
ENOSYS = -KvmHcError.ENOSYS & MASK64
ENC_4K = MapGpaRangeAttr.ENCRYPTED | MapGpaRangeAttr.PAGE_SZ_4K

#: id: (gpa, npages, a2, exit enabled, expected guest RAX or None = exits to userspace)
HC_CASES = {
    "unaligned_gpa": (BASE_GPA + 0x800, 1, ENC_4K, True, EINVAL),
    "zero_pages": (BASE_GPA, 0, ENC_4K, True, EINVAL),
    "range_wraps": (0x1000, MASK64, ENC_4K, True, EINVAL),
    "range_wraps_to_zero": (0x2000, (1 << 64) - 2, 0, True, EINVAL),
    "exit_not_enabled": (BASE_GPA, 1, ENC_4K, False, ENOSYS),
    "exit_not_enabled_bad_args": (BASE_GPA + 1, 0, 0, False, ENOSYS),
    "top_gfn_exits": (MASK64 & ~0xFFF, 1, 0, True, None),
    "outside_memslots_exits": (1 << 40, 1 << 20, MapGpaRangeAttr.PAGE_SZ_2M, True, None),
    "shared_range_exits": (BASE_GPA, 3, 0, True, None),
    "private_range_exits": (BASE_GPA + 0x3000, 2, ENC_4K, True, None),
}


@pytest.mark.parametrize("case", list(HC_CASES))
def test_map_gpa_range_hypercall(g: GuestVm, case: str) -> None:
    """One KVM_HC_MAP_GPA_RANGE from the guest. Invalid arguments and a disabled exit are
    answered by KVM itself (no exit; RAX = -KVM_EINVAL / -KVM_ENOSYS, the enable bit checked
    first). A valid call exits with nr 12, args (gpa, npages, a2) verbatim - KVM checks no
    memslot - and flags KVM_EXIT_HYPERCALL_LONG_MODE; hypercall.ret becomes the guest's RAX."""
    gpa, npages, attrs, enabled, want = HC_CASES[case]
    if enabled:
        enable_map_gpa_range_exit(g.vm)
    vcpu = g.vcpu("guest_map_gpa_range_raw", gpa, npages, int(attrs))
    r = g.run(vcpu)
    if want is not None:
        assert not isinstance(r, Exit), \
            f"KVM must answer this hypercall itself (RAX {want:#x}), got {r}"
        assert r.cmd == UcallCmd.DONE and r.args == (want,), \
            f"guest RAX {r.args[0]:#x}, expected {want:#x}" if r.args else str(r)
        return
    assert isinstance(r, Exit) and r.reason == ExitReason.HYPERCALL, \
        f"expected KVM_EXIT_HYPERCALL, got {r}"
    h = r.hypercall
    assert h is not None
    assert h.nr == Hypercall.MAP_GPA_RANGE
    assert h.args[:3] == (gpa, npages, attrs), [hex(a) for a in h.args]
    assert h.flags == HypercallExitFlag.LONG_MODE, f"hypercall.flags {h.flags:#x}"
    ret = 0x1234_5678_9ABC_DEF0
    vcpu.run_struct.exit.hypercall.ret = ret
    uc = g.run_until_ucall(vcpu)
    assert uc.cmd == UcallCmd.DONE and uc.args == (ret,), \
        f"hypercall.ret {ret:#x} must become the guest's RAX, got {uc}"


def test_map_gpa_range_exit_enable_cap(g: GuestVm) -> None:
    """KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL) accepts bit 12 and can clear it again (then the
    guest gets -KVM_ENOSYS); bits outside KVM_CAP_EXIT_HYPERCALL's value are EINVAL."""
    from kvmpy.uapi import Cap

    valid = g.vm.check_extension(Cap.EXIT_HYPERCALL)
    bad = ~valid & (1 << 63 | 1 << 11 | 1 << 0)
    # x86.c kvm_vm_ioctl_enable_cap: args[0] & ~KVM_EXIT_HYPERCALL_VALID_MASK -> -EINVAL
    expect_errno(g.vm.try_enable_cap(Cap.EXIT_HYPERCALL, bad), errno.EINVAL)
    g.vm.enable_cap(Cap.EXIT_HYPERCALL, MAP_GPA_RANGE_BIT)
    g.vm.enable_cap(Cap.EXIT_HYPERCALL, 0)
    vcpu = g.vcpu("guest_map_gpa_range_raw", BASE_GPA, 1, 0)
    uc = g.run_until_ucall(vcpu)
    assert uc.args == (ENOSYS,), f"exit disabled again: guest RAX must be -KVM_ENOSYS, got {uc}"


def test_host_writes_to_shared_visible_after_round_trip(g: GuestVm) -> None:
    """fill_shared/check_shared are the host's view: a shared page written by the host is what
    the guest reads back after a private round trip that punched the private copy."""
    enable_map_gpa_range_exit(g.vm)
    mem = g.add_memory(4 * PAGE_SIZE, backing="shmem", gmem=True)
    fill_shared(g, mem.gpa, mem.size, 0x5A)
    vcpu = g.vcpu("guest_converter", mem.gpa, 2, 2, 0)
    st = run_conversion_vcpu(g, vcpu)
    assert (st.to_private, st.to_shared, st.sync_private) == (4, 4, 4), st


# --- scripted conversion sequences ------------------------------------------------------------
OP_FILL, OP_CHECK, OP_MAP, OP_SYNC = 1, 2, 3, 4   # guests/private_mem_beyond.c guest_script


@dataclasses.dataclass(frozen=True)
class Op:
    """One step of guest_script: FILL/CHECK (gpa, size, byte), MAP (gpa, size, a2 bits: a
    KVM_HC_MAP_GPA_RANGE), SYNC (arg). ``gpa`` is relative to the script's base."""

    kind: int
    gpa: int
    size: int
    arg: int


def write_script(g: GuestVm, base: int, ops: list[Op]) -> tuple[int, int]:
    """Put ``ops`` in low guest memory; returns guest_script's (table gpa, count) arguments."""
    table = g.alloc_low((len(ops) * 32 + PAGE_SIZE - 1) // PAGE_SIZE)
    g.write_phys(table, b"".join(struct.pack("<4Q", o.kind, base + o.gpa, o.size, o.arg)
                                 for o in ops))
    return table, len(ops)


def _fill(off: int, size: int, b: int) -> Op:
    return Op(OP_FILL, off, size, b)


def _check(off: int, size: int, b: int) -> Op:
    return Op(OP_CHECK, off, size, b)


def _map(off: int, size: int, shared: bool, fallocate: bool = False) -> Op:
    return Op(OP_MAP, off, size, MAP_GPA_SET_ATTRIBUTES | (MAP_GPA_SHARED if shared else 0)
              | (MAP_GPA_DO_FALLOCATE if fallocate else 0))


AREA = PAGE_2M + PAGE_SIZE

#: Short conversion sequences over a 4 MiB guest_memfd slot of which the guest maps 2 MiB + 4 KiB
#: (the conversions test's layout). Each is valid on any kernel and ends with its data checks.
SCRIPTS: dict[str, list[Op]] = {
    # Found by shrinking the conversions test's guest: the emulator once lost a vmcall here.
    "overlapping_2m_then_free_all": [
        _fill(PAGE_SIZE, PAGE_SIZE, 0x22),
        _map(PAGE_SIZE, PAGE_2M, shared=False), _map(PAGE_SIZE, PAGE_2M, shared=True),
        _map(PAGE_2M, PAGE_SIZE, shared=False), _map(PAGE_2M, PAGE_SIZE, shared=True),
        _map(0, AREA, shared=True, fallocate=True),
        _check(PAGE_SIZE, PAGE_SIZE, 0x22), _check(0, PAGE_SIZE, 0),
    ],
    # Private data survives a conversion of its neighbours and goes when the page is freed.
    "private_page_between_conversions": [
        _map(0, 3 * PAGE_SIZE, shared=False), _fill(0, 3 * PAGE_SIZE, 0x61),
        _map(0, PAGE_SIZE, shared=True), _map(2 * PAGE_SIZE, PAGE_SIZE, shared=True, fallocate=True),
        _check(0, PAGE_SIZE, 0), _check(PAGE_SIZE, PAGE_SIZE, 0x61), _check(2 * PAGE_SIZE, PAGE_SIZE, 0),
        _map(PAGE_SIZE, PAGE_SIZE, shared=True, fallocate=True),
        _map(PAGE_SIZE, PAGE_SIZE, shared=False), _check(PAGE_SIZE, PAGE_SIZE, 0),
    ],
}
SCRIPT_BACKINGS = ["shmem", "anonymous", "thp"]


@pytest.mark.parametrize("backing", SCRIPT_BACKINGS)
@pytest.mark.parametrize("script", list(SCRIPTS))
def test_scripted_conversions(g: GuestVm, kvm: Kvm, request: pytest.FixtureRequest,
                              script: str, backing: str) -> None:
    """A conversion sequence (guest_script) runs to its end with every data check passing, for
    each shared backing type; the host answers the KVM_HC_MAP_GPA_RANGE exits."""
    enable_map_gpa_range_exit(g.vm)
    gmem = g.vm.create_guest_memfd(4 << 20)
    try:
        mem = g.add_memory(4 << 20, backing=backing, gmem=gmem, map=False)
    except BackingUnavailable as e:
        pytest.skip(str(e))
    g.map(mem.gpa, mem.gpa, AREA)
    table, n = write_script(g, mem.gpa, SCRIPTS[script])
    vcpu = g.vcpu("guest_script", table, n)
    st = run_conversion_vcpu(g, vcpu)
    maps = sum(1 for o in SCRIPTS[script] if o.kind == OP_MAP)
    assert st.hypercalls == maps, st
