"""Memslots: KVM_SET_USER_MEMORY_REGION / KVM_SET_USER_MEMORY_REGION2 validation and guest_memfd
bindings.

Mirrors the memslot rows of tools/testing/selftests/kvm/set_memory_region_test.c (6.12 and the newest
kvm-x86 copy 36a06256): test_invalid_memory_region_flags, test_add_max_memory_regions,
test_add_private_memory_region, test_add_overlapping_private_memory_regions. The C test needs a
KVM_X86_SW_PROTECTED_VM for its guest_memfd cases; here every case runs per VM type offered and
the guest_memfd cases run wherever KVM_CAP_GUEST_MEMFD on the VM fd says memslots may bind one.
Beyond upstream: exact errnos for every row, modifying guest_memfd slots, one guest_memfd bound to
several slots, unbind and rebind, the closed-fd case.

Behaviour sources: Documentation/virt/kvm/api.rst 4.35 "KVM_SET_USER_MEMORY_REGION" and 4.140
"KVM_SET_USER_MEMORY_REGION2"; virt/kvm/kvm_main.c check_memory_region_flags() and
__kvm_set_memory_region(); virt/kvm/guest_memfd.c kvm_gmem_bind().
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator

import pytest

from kvmpy.errors import Errno
from kvmpy.memory import SharedMemory, anonymous
from kvmpy.system import Kvm
from kvmpy.testing.errnos import (
    Behaviour,
    errname,
    expect_errno,
    expect_errnos,
    expected_errnos,
    memslot_accepts_guest_memfd,
    valid_memslot_flags,
)
from kvmpy.testing.require import require_cap, where
from kvmpy.uapi import PAGE_SIZE, Cap, MemFlag
from kvmpy.vm import Vm

P = PAGE_SIZE
M2 = 2 << 20
GPA_A = 0xC000_0000
GPA_B = 0x1_8000_0000
GMEM = int(MemFlag.GUEST_MEMFD)
LOG = int(MemFlag.LOG_DIRTY_PAGES)
RO = int(MemFlag.READONLY)


@pytest.fixture
def host_mem(kvm: Kvm) -> Iterator[SharedMemory]:
    """16 MiB of memfd-backed host memory for userspace_addr (not populated)."""
    with SharedMemory(kvm.backend, 16 << 20, "memslot-backing") as m:
        yield m


@pytest.fixture
def region2(vm: Vm) -> None:
    """KVM_SET_USER_MEMORY_REGION2 exists (KVM_CAP_USER_MEMORY2; absent before 6.8: ENOTTY)."""
    require_cap(vm, Cap.USER_MEMORY2)


@pytest.fixture
def bind_vm(gmem_vm: Vm) -> Vm:
    """A VM whose memslots accept KVM_MEM_GUEST_MEMFD."""
    if not memslot_accepts_guest_memfd(gmem_vm):
        val = gmem_vm.check_extension(Cap.GUEST_MEMFD)
        pytest.skip(f"KVM_CAP_GUEST_MEMFD={val:#x} (KVM_MEM_GUEST_MEMFD memslots) on "
                    f"{where(gmem_vm)}")
    return gmem_vm


# --- flags -----------------------------------------------------------------------------------

@pytest.mark.parametrize("ioctl", ["region_v1", "region2"])
def test_invalid_flags(kvm: Kvm, vm: Vm, host_mem: SharedMemory, ioctl: str) -> None:
    """Flag bits 0..31: exactly the VM's valid flags are accepted, every other bit is EINVAL.
    Valid: LOG_DIRTY_PAGES; READONLY with KVM_CAP_READONLY_MEM; GUEST_MEMFD only through REGION2
    and only where the VM binds guest_memfd (set_memory_region_test::
    test_invalid_memory_region_flags; kvm_main.c check_memory_region_flags(), v1 accepts only
    KVM_SET_USER_MEMORY_REGION_V1_FLAGS)."""
    v2 = ioctl == "region2"
    if v2:
        require_cap(vm, Cap.USER_MEMORY2)
    valid = valid_memslot_flags(vm, v2=v2)
    gmem = vm.create_guest_memfd(M2) if v2 and memslot_accepts_guest_memfd(vm) else None

    def add(flag: int) -> Errno:
        err = (vm.try_set_user_memory_region2(1, flag, GPA_A, M2, host_mem.addr, gmem, 0) if v2
               else vm.try_set_user_memory_region(1, flag, GPA_A, M2, host_mem.addr))
        if not err:
            vm.delete_memslot(1)
        return err

    flags = [1 << b for b in range(32)]
    expect_errnos(((add(f), 0 if f & valid else errno.EINVAL) for f in flags),
                  f"valid flags {valid:#x}", limit=32)


GMEM_FLAG_COMBOS = [
    # (id, flags, expected errno)
    ("guest_memfd", GMEM, 0),
    ("guest_memfd_log_dirty", GMEM | LOG, errno.EINVAL),
    ("guest_memfd_readonly", GMEM | RO, errno.EINVAL),
    ("guest_memfd_log_dirty_readonly", GMEM | LOG | RO, errno.EINVAL),
]


@pytest.mark.parametrize("flags,want", [c[1:] for c in GMEM_FLAG_COMBOS],
                         ids=[c[0] for c in GMEM_FLAG_COMBOS])
def test_guest_memfd_flag_combinations(bind_vm: Vm, host_mem: SharedMemory, flags: int,
                                       want: int) -> None:
    """A guest_memfd slot accepts neither dirty logging nor READONLY: EINVAL
    (set_memory_region_test::test_invalid_memory_region_flags; check_memory_region_flags():
    no dirty logging of private memory, read-only slots have MMIO semantics)."""
    g = bind_vm.create_guest_memfd(M2)
    expect_errno(bind_vm.try_set_user_memory_region2(10, flags, GPA_A, M2, host_mem.addr, g, 0),
                 want)


def test_v1_refuses_guest_memfd(bind_vm: Vm, host_mem: SharedMemory) -> None:
    """KVM_SET_USER_MEMORY_REGION (v1) cannot carry a guest_memfd: KVM_MEM_GUEST_MEMFD is EINVAL
    there even on a VM whose REGION2 accepts it (api.rst 4.140; kvm_main.c
    KVM_SET_USER_MEMORY_REGION_V1_FLAGS)."""
    expect_errno(bind_vm.try_set_user_memory_region(10, GMEM, GPA_A, M2, host_mem.addr),
                 errno.EINVAL)


# --- which fd may be bound ---------------------------------------------------------------------

BAD_FDS = ["dev_kvm", "vm_fd", "plain_memfd", "other_vm_guest_memfd", "closed_fd"]


@pytest.mark.parametrize("what", BAD_FDS)
def test_bind_bad_fd(kvm: Kvm, bind_vm: Vm, make_vm: Callable[[], Vm], host_mem: SharedMemory,
                     what: str) -> None:
    """The guest_memfd field must be a guest_memfd of this VM: /dev/kvm, a VM fd, a plain memfd
    and another VM's guest_memfd are EINVAL, and that other VM can bind its own guest_memfd;
    a closed fd is EBADF (set_memory_region_test::test_add_private_memory_region;
    kvm_gmem_bind(): fget() then the f_op and owning-VM checks)."""
    want = errno.EINVAL
    closers: list[Callable[[], None]] = []
    other: Vm | None = None
    if what == "dev_kvm":
        fd = kvm.fd
    elif what == "vm_fd":
        fd = bind_vm.fd
    elif what == "plain_memfd":
        fd = os.memfd_create("not-guest-memfd", os.MFD_CLOEXEC)
        os.ftruncate(fd, M2)
        closers.append(lambda: os.close(fd))
    elif what == "other_vm_guest_memfd":
        other = make_vm()
        fd = other.create_guest_memfd(M2).fd
    else:
        fd = os.memfd_create("closed", os.MFD_CLOEXEC)
        os.close(fd)
        want = errno.EBADF
    try:
        expect_errno(bind_vm.try_set_user_memory_region2(10, GMEM, GPA_A, M2, host_mem.addr,
                                                         fd, 0), want, what)
        if other is not None:
            expect_errno(other.try_set_user_memory_region2(10, GMEM, GPA_A, M2, host_mem.addr,
                                                           fd, 0), 0, "the owning VM")
    finally:
        for c in closers:
            c()


# --- offsets and sizes -------------------------------------------------------------------------

def test_offset_alignment(bind_vm: Vm, host_mem: SharedMemory) -> None:
    """guest_memfd_offset 1..4095 is EINVAL, offset 0 binds (set_memory_region_test::
    test_add_private_memory_region; __kvm_set_memory_region() requires a page-aligned offset)."""
    g = bind_vm.create_guest_memfd(2 * M2)
    expect_errnos((bind_vm.try_set_user_memory_region2(10, GMEM, GPA_A, M2, host_mem.addr, g,
                                                        off), errno.EINVAL) for off in range(1, P))
    expect_errno(bind_vm.try_set_user_memory_region2(10, GMEM, GPA_A, M2, host_mem.addr, g, 0), 0)


FILE_RANGES = [
    # (id, offset, size, expected) against a 4 MiB guest_memfd
    ("exact_fit_upper_half", M2, M2, 0),
    ("whole_file", 0, 2 * M2, 0),
    ("offset_at_end", 2 * M2, M2, errno.EINVAL),
    ("crossing_end", M2 + P, M2, errno.EINVAL),
    ("one_page_past_end", 0, 2 * M2 + P, errno.EINVAL),
    ("bigger_than_file", 0, 4 * M2, errno.EINVAL),
    ("offset_far_past_end", 1 << 40, M2, errno.EINVAL),
    ("offset_plus_size_wraps", 2**64 - P, 2 * P, errno.EINVAL),
]


@pytest.mark.parametrize("off,size,want", [r[1:] for r in FILE_RANGES],
                         ids=[r[0] for r in FILE_RANGES])
def test_file_range_past_end(bind_vm: Vm, host_mem: SharedMemory, off: int, size: int,
                             want: int) -> None:
    """offset + size must stay inside the guest_memfd and must not wrap: EINVAL
    (kvm_gmem_bind(): offset + size > i_size; __kvm_set_memory_region(): overflow check)."""
    g = bind_vm.create_guest_memfd(2 * M2)
    expect_errno(bind_vm.try_set_user_memory_region2(10, GMEM, GPA_A, size, host_mem.addr, g,
                                                     off), want, f"{2 * M2:#x}-byte guest_memfd")


# --- overlaps --------------------------------------------------------------------------------

GPA_OVERLAPS = [
    # (id, gpa, size, expected) against slot 10 at [GPA_B, GPA_B + 4 MiB)
    ("below_overlapping", GPA_B - M2, 2 * M2, errno.EEXIST),
    ("above_overlapping", GPA_B + M2, 2 * M2, errno.EEXIST),
    ("identical", GPA_B, 2 * M2, errno.EEXIST),
    ("inside", GPA_B + P, P, errno.EEXIST),
    ("covering", GPA_B - M2, 4 * M2, errno.EEXIST),
    ("last_page", GPA_B + 2 * M2 - P, 2 * P, errno.EEXIST),
    ("adjacent_below", GPA_B - 2 * M2, 2 * M2, 0),
    ("adjacent_above", GPA_B + 2 * M2, 2 * M2, 0),
]


@pytest.mark.parametrize("kind", ["plain", "guest_memfd"])
@pytest.mark.parametrize("gpa,size,want", [r[1:] for r in GPA_OVERLAPS],
                         ids=[r[0] for r in GPA_OVERLAPS])
@pytest.mark.usefixtures("region2")
def test_overlapping_gpa(vm: Vm, host_mem: SharedMemory, kind: str, gpa: int, size: int,
                         want: int) -> None:
    """A new slot whose GPA range overlaps an existing slot is EEXIST; adjacent ranges are fine.
    For guest_memfd slots each slot binds its own file, so only the GPAs overlap
    (set_memory_region_test::test_add_overlapping_private_memory_regions; api.rst 4.35 "It is
    not allowed to have overlapping slots"; __kvm_set_memory_region() kvm_check_memslot_overlap)."""
    if kind == "guest_memfd" and not memslot_accepts_guest_memfd(vm):
        pytest.skip(f"KVM_CAP_GUEST_MEMFD={vm.check_extension(Cap.GUEST_MEMFD):#x} "
                    f"(KVM_MEM_GUEST_MEMFD memslots) on {where(vm)}")
    flags = GMEM if kind == "guest_memfd" else 0
    g1 = vm.create_guest_memfd(2 * M2) if flags else None
    g2 = vm.create_guest_memfd(4 * M2) if flags else None
    vm.set_user_memory_region2(10, flags, GPA_B, 2 * M2, host_mem.addr, g1, 0)
    expect_errno(vm.try_set_user_memory_region2(11, flags, gpa, size, host_mem.addr, g2, 0), want,
                 f"slot 10 at [{GPA_B:#x}, {GPA_B + 2 * M2:#x})")


def test_overlapping_file_ranges(bind_vm: Vm, host_mem: SharedMemory) -> None:
    """Two slots may not bind overlapping ranges of one guest_memfd; the errno is version
    dependent (EINVAL up to 6.18, EEXIST later: kvmpy.testing.errnos GMEM_BIND_OVERLAP), and a
    kernel must answer the same for both overlaps. GPA overlaps stay EEXIST, and a
    non-overlapping range binds (set_memory_region_test::
    test_add_overlapping_private_memory_regions, newest: gmem of 5 x 2 MiB)."""
    g = bind_vm.create_guest_memfd(5 * M2)
    vm = bind_vm
    vm.set_user_memory_region2(10, GMEM, GPA_A, 2 * M2, host_mem.addr, g, 0)
    vm.set_user_memory_region2(11, GMEM, GPA_B, 2 * M2, host_mem.addr, g, 2 * M2)
    vm.delete_memslot(10)
    allowed, why = expected_errnos(vm, Behaviour.GMEM_BIND_OVERLAP)
    seen = {}
    for off in (M2, 3 * M2):  # [2M, 6M) and [6M, 10M) against slot 11's [4M, 8M)
        seen[off] = err = vm.try_set_user_memory_region2(10, GMEM, GPA_A, 2 * M2, host_mem.addr,
                                                         g, off)
        expect_errno(err, allowed, f"slot 11's file range [{2 * M2:#x}, {4 * M2:#x}); {why}")
    assert len(set(seen.values())) == 1, (
        f"inconsistent errnos for overlapping guest_memfd ranges: "
        f"{ {hex(o): errname(e) for o, e in seen.items()} }")
    for gpa in (GPA_B - M2, GPA_B + M2):
        expect_errno(vm.try_set_user_memory_region2(10, GMEM, gpa, 2 * M2, host_mem.addr, g, 0),
                     errno.EEXIST, "slot 11's GPAs")
    expect_errno(vm.try_set_user_memory_region2(10, GMEM, GPA_A, 2 * M2, host_mem.addr, g, 0), 0,
                 "rebinding the free range [0, 4M)")


# --- lifetime of a slot ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["plain", "guest_memfd"])
@pytest.mark.usefixtures("region2")
def test_delete_and_recreate(vm: Vm, host_mem: SharedMemory, kind: str) -> None:
    """A deleted slot can be recreated identically, and deleting frees its GPA range (and its
    guest_memfd range) for another slot; deleting a slot that does not exist is EINVAL
    (api.rst 4.35: memory_size 0 deletes; __kvm_set_memory_region())."""
    if kind == "guest_memfd" and not memslot_accepts_guest_memfd(vm):
        pytest.skip(f"KVM_CAP_GUEST_MEMFD={vm.check_extension(Cap.GUEST_MEMFD):#x} "
                    f"(KVM_MEM_GUEST_MEMFD memslots) on {where(vm)}")
    flags = GMEM if kind == "guest_memfd" else 0
    g = vm.create_guest_memfd(2 * M2) if flags else None
    for _ in range(3):
        vm.set_user_memory_region2(10, flags, GPA_A, 2 * M2, host_mem.addr, g, 0)
        vm.delete_memslot(10)
    vm.set_user_memory_region2(11, flags, GPA_A, 2 * M2, host_mem.addr, g, 0)
    vm.delete_memslot(11)
    expect_errno(vm.try_set_user_memory_region2(12, 0, 0, 0, 0), errno.EINVAL, "no slot 12")


MODIFY = [
    # (id, flags, gpa, hva offset, file offset)
    ("move", GMEM, GPA_A + 4 * M2, 0, 0),
    ("identical", GMEM, GPA_A, 0, 0),
    ("add_log_dirty", GMEM | LOG, GPA_A, 0, 0),
    ("drop_guest_memfd_flag", 0, GPA_A, 0, 0),
    ("change_hva", GMEM, GPA_A, P, 0),
    ("change_offset", GMEM, GPA_A, 0, M2),
]


@pytest.mark.parametrize("flags,gpa,hva_off,off", [r[1:] for r in MODIFY],
                         ids=[r[0] for r in MODIFY])
def test_modify_guest_memfd_slot(bind_vm: Vm, host_mem: SharedMemory, flags: int, gpa: int,
                                 hva_off: int, off: int) -> None:
    """A guest_memfd slot is immutable: moving it, changing its flags (adding LOG_DIRTY or
    dropping GUEST_MEMFD), hva or offset, even re-setting it identically, is EINVAL; it can only
    be deleted (kvm_main.c __kvm_set_memory_region(): "Private memslots are immutable, they can
    only be deleted"). The slot survives the refused change."""
    g = bind_vm.create_guest_memfd(4 * M2)
    bind_vm.set_user_memory_region2(10, GMEM, GPA_A, 2 * M2, host_mem.addr, g, 0)
    hva = host_mem.addr + hva_off
    expect_errno(bind_vm.try_set_user_memory_region2(10, flags, gpa, 2 * M2, hva, g, off),
                 errno.EINVAL, "a guest_memfd slot")
    # Still there: its GPAs and its file range are still taken.
    expect_errno(bind_vm.try_set_user_memory_region2(11, 0, GPA_A, P, host_mem.addr),
                 errno.EEXIST, "slot 10 must survive a refused change")


@pytest.mark.usefixtures("region2")
def test_modify_plain_slot(vm: Vm, host_mem: SharedMemory) -> None:
    """Control for the guest_memfd rows: a plain slot can move and toggle LOG_DIRTY_PAGES
    (api.rst 4.35: slots may be moved in the guest physical address space and their flags
    changed), but not change size or hva (EINVAL)."""
    vm.set_user_memory_region2(10, 0, GPA_A, 2 * M2, host_mem.addr)
    vm.set_user_memory_region2(10, 0, GPA_A + 4 * M2, 2 * M2, host_mem.addr)
    vm.set_user_memory_region2(10, LOG, GPA_A + 4 * M2, 2 * M2, host_mem.addr)
    vm.set_user_memory_region2(10, 0, GPA_A + 4 * M2, 2 * M2, host_mem.addr)
    for size, hva in ((M2, host_mem.addr), (2 * M2, host_mem.addr + P)):
        expect_errno(vm.try_set_user_memory_region2(10, 0, GPA_A + 4 * M2, size, hva),
                     errno.EINVAL, "an existing slot")


# --- several slots, one file (beyond upstream) --------------------------------------------------

def test_one_guest_memfd_several_slots(bind_vm: Vm, host_mem: SharedMemory) -> None:
    """One guest_memfd bound to three slots at different offsets and GPAs; a fourth slot over a
    bound range gets the table's overlap errno; unbinding the middle slot frees exactly its
    range, which another slot at another GPA can then bind (api.rst 4.142: one file may back
    several memslots as long as the bound ranges do not overlap)."""
    vm = bind_vm
    g = vm.create_guest_memfd(16 * P)
    layout = [(20, 1 << 32, 0, 4 * P), (21, 2 << 32, 4 * P, 8 * P), (22, 3 << 32, 12 * P, 4 * P)]
    for slot, gpa, off, size in layout:
        vm.set_user_memory_region2(slot, GMEM, gpa, size, host_mem.addr, g, off)
    allowed, why = expected_errnos(vm, Behaviour.GMEM_BIND_OVERLAP)
    for off in (2 * P, 6 * P, 11 * P, 0):
        expect_errno(vm.try_set_user_memory_region2(23, GMEM, 4 << 32, 4 * P, host_mem.addr, g,
                                                    off), allowed, f"a bound range; {why}")
    vm.delete_memslot(21)
    vm.set_user_memory_region2(23, GMEM, 4 << 32, 8 * P, host_mem.addr, g, 4 * P)
    expect_errno(vm.try_set_user_memory_region2(24, GMEM, 5 << 32, P, host_mem.addr, g, 12 * P),
                 allowed, "slot 22's range is still bound")


def test_unbind_rebind(bind_vm: Vm, make_vm: Callable[[], Vm], host_mem: SharedMemory) -> None:
    """Deleting a guest_memfd slot unbinds its range: the same range binds again at another GPA
    and slot, then back at the original; another VM still cannot bind the file (EINVAL)
    (kvm_gmem_unbind() on delete; kvm_gmem_bind() owning-VM check)."""
    vm = bind_vm
    g = vm.create_guest_memfd(2 * M2)
    for slot, gpa in ((10, GPA_A), (11, GPA_B), (10, GPA_A)):
        vm.set_user_memory_region2(slot, GMEM, gpa, 2 * M2, host_mem.addr, g, 0)
        vm.delete_memslot(slot)
    other = make_vm()
    expect_errno(other.try_set_user_memory_region2(10, GMEM, GPA_A, 2 * M2, host_mem.addr, g, 0),
                 errno.EINVAL, "another VM's guest_memfd")


# --- how many slots -----------------------------------------------------------------------------

def test_max_memslots(kvm: Kvm, vm: Vm) -> None:
    """Slots 0..N-1 can all be added, with N = KVM_CAP_NR_MEMSLOTS; slot N is EINVAL
    (set_memory_region_test::test_add_max_memory_regions; api.rst 4.35). One page per slot over
    MAP_NORESERVE memory keeps it fast and the kernel's per-slot metadata small."""
    n = kvm.check_extension(Cap.NR_MEMSLOTS)
    assert n > 0, "KVM_CAP_NR_MEMSLOTS should be greater than 0"
    mem = anonymous(kvm.backend, (n + 1) * P, "max-memslots")
    try:
        for slot in range(n):
            expect_errno(vm.try_set_user_memory_region(slot, 0, slot * P, P, mem.addr + slot * P),
                         0, f"slot {slot} of {n}")
        expect_errno(vm.try_set_user_memory_region(n, 0, n * P, P, mem.addr + n * P),
                     errno.EINVAL, "slot == KVM_CAP_NR_MEMSLOTS")
        vm.delete_memslot(0)
        vm.set_user_memory_region(0, 0, n * P, P, mem.addr + n * P)
    finally:
        vm.close()
        mem.close()
