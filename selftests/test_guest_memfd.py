"""guest_memfd as a file: KVM_CREATE_GUEST_MEMFD, fstat, read/write, fallocate, mmap, SIGBUS.

Mirrors tools/testing/selftests/kvm/guest_memfd_test.c (6.12 and the newest upstream copy, commit
01f492e1): every case runs per VM type offered in KVM_CAP_VM_TYPES and, where the C test does, per
guest_memfd flag set {0, MMAP, MMAP|INIT_SHARED} offered in KVM_CAP_GUEST_MEMFD_FLAGS. Beyond
upstream: exact errnos, more fallocate modes, a guest_memfd outliving its VM fd while bound, many
guest_memfds at once.

Behaviour sources: Documentation/virt/kvm/api.rst 4.142 "KVM_CREATE_GUEST_MEMFD" (flags, sizes,
file semantics, GUEST_MEMFD_FLAG_MMAP/INIT_SHARED), virt/kvm/guest_memfd.c (kvm_gmem_create,
kvm_gmem_fallocate, kvm_gmem_mmap, kvm_gmem_fault_user_mapping), fs/open.c vfs_fallocate() and
fs/read_write.c for the generic file errnos.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from kvmpy.backend import (
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_PRIVATE,
    MAP_SHARED,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
)
from kvmpy.backend.libc import (
    MPOL_BIND,
    MPOL_DEFAULT,
    MPOL_INTERLEAVE,
    libc_get_mempolicy,
    libc_mbind,
    libc_move_pages,
)
from kvmpy.errors import Errno
from kvmpy.memory import SharedMemory
from kvmpy.system import Kvm
from kvmpy.testing.errnos import (
    errno_of,
    expect_errno,
    expect_errnos,
    memslot_accepts_guest_memfd,
    valid_gmem_flags,
)
from kvmpy.testing.sigbus import touch
from kvmpy.uapi import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    PAGE_SIZE,
    GuestMemfdFlag,
    MemFlag,
)
from kvmpy.vm import Vm

P = PAGE_SIZE
TOTAL = 4 * P  # the C test's file size
KEEP = FALLOC_FL_KEEP_SIZE
PUNCH = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
MMAP = int(GuestMemfdFlag.MMAP)
INIT_SHARED = int(GuestMemfdFlag.INIT_SHARED)
MADV_DONTNEED = 4
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25


def only(*sets: int) -> pytest.MarkDecorator:
    """Run a case for the flag sets the C test runs it for (each still skips unless offered)."""
    return pytest.mark.parametrize("gmem_flags", list(sets), ids=[FLAG_IDS[f] for f in sets])


FLAG_IDS = {0: "noflags", MMAP: "mmap", MMAP | INIT_SHARED: "mmap_init_shared"}

#: One VM per VM type for the module's gmem_vm cases, as guest_memfd_test.c has; each case makes
#: its own guest_memfds (closed after it). selftests/conftest.py shared_gmem_vm.
SHARED_GMEM_VM = True


# --- creation --------------------------------------------------------------------------------

def test_create_flag_bits_follow_capability(gmem_vm: Vm) -> None:
    """Each single flag bit 0..63: accepted iff set in KVM_CAP_GUEST_MEMFD_FLAGS on the VM fd,
    otherwise EINVAL (newest guest_memfd_test::test_guest_memfd_flags; 6.12 expected every bit
    to fail because the capability did not exist, kvm_gmem_create())."""
    valid = valid_gmem_flags(gmem_vm)
    expect_errnos(((gmem_vm.try_create_guest_memfd(P, f), 0 if f & valid else errno.EINVAL)
                   for f in (1 << b for b in range(64))), f"KVM_CAP_GUEST_MEMFD_FLAGS={valid:#x}",
                  limit=64)


def test_create_flag_combinations(gmem_vm: Vm) -> None:
    """Every combination of the offered flags is accepted; each offered flag combined with an
    unknown bit is EINVAL (kvm_gmem_create() masks against the supported flags)."""
    valid = valid_gmem_flags(gmem_vm)
    offered = [f for f in (MMAP, INIT_SHARED) if f & valid]
    combos = {0}
    for f in offered:
        combos |= {c | f for c in combos}
    unknown = 1 << 63
    for flags in sorted(combos):
        expect_errno(gmem_vm.try_create_guest_memfd(P, flags), 0)
        expect_errno(gmem_vm.try_create_guest_memfd(P, flags | unknown), errno.EINVAL)


def test_create_invalid_sizes(gmem_vm: Vm, gmem_flags_offered: int) -> None:
    """Sizes 1..page-1 are EINVAL (guest_memfd_test::test_create_guest_memfd_invalid_sizes); so
    are 0 and sizes that are negative as loff_t (kvm_gmem_create(): size <= 0 or unaligned)."""
    sizes = [*range(1, P), 0, P + 1, 1 << 63, 2**64 - P]
    expect_errnos((gmem_vm.try_create_guest_memfd(size, gmem_flags_offered), errno.EINVAL)
                  for size in sizes)


def test_create_multiple(gmem_vm: Vm, gmem_flags_offered: int) -> None:
    """Two guest_memfds are distinct files: own sizes, different inodes, creating the second does
    not change the first (guest_memfd_test::test_create_guest_memfd_multiple)."""
    g1 = gmem_vm.create_guest_memfd(P, gmem_flags_offered)
    st1 = g1.fstat()
    assert st1.st_size == P, f"fstat(guest_memfd of {P:#x} bytes).st_size = {st1.st_size:#x}"
    g2 = gmem_vm.create_guest_memfd(2 * P, gmem_flags_offered)
    st2 = g2.fstat()
    assert st2.st_size == 2 * P, f"fstat(guest_memfd of {2 * P:#x}).st_size = {st2.st_size:#x}"
    st1b = g1.fstat()
    assert st1b.st_size == P, "the first guest_memfd's size changed when a second was created"
    assert st1b.st_ino != st2.st_ino, f"two guest_memfds share inode {st2.st_ino}"
    g2.close()
    g1.close()


def test_file_size(gmem_vm: Vm, gmem_flags_offered: int) -> None:
    """fstat: st_size is the requested size, st_blksize the page size, and it is a regular file
    (guest_memfd_test::test_file_size; kvm_gmem_create() sets i_size, a pseudo-fs inode)."""
    g = gmem_vm.create_guest_memfd(TOTAL, gmem_flags_offered)
    st = g.fstat()
    assert st.st_size == TOTAL, f"st_size {st.st_size:#x}, expected {TOTAL:#x}"
    assert st.st_blksize == P, f"st_blksize {st.st_blksize}, expected {P}"
    assert (st.st_mode & 0o170000) == 0o100000, f"st_mode {st.st_mode:#o} is not a regular file"


READ_WRITE = [
    # (id, call, expected errno, why)
    ("read", lambda g: g.try_read(64), errno.EINVAL, "no read/read_iter: vfs_read() -EINVAL"),
    ("write", lambda g: g.try_write(b"\0" * 64), errno.EINVAL, "no write: vfs_write() -EINVAL"),
    ("pread", lambda g: g.try_pread(64, 0), errno.ESPIPE, "no FMODE_PREAD: -ESPIPE"),
    ("pwrite", lambda g: g.try_pwrite(b"\0" * 64, 0), errno.ESPIPE, "no FMODE_PWRITE: -ESPIPE"),
]


@pytest.mark.parametrize("name,call,want,why", READ_WRITE, ids=[r[0] for r in READ_WRITE])
def test_read_write_refused(gmem_vm: Vm, gmem_flags_offered: int, name: str, call: object,
                            want: int, why: str) -> None:
    """read/write/pread/pwrite on a guest_memfd fail (guest_memfd_test::test_file_read_write);
    the errnos are the VFS's for a file without those operations (fs/read_write.c)."""
    g = gmem_vm.create_guest_memfd(TOTAL, gmem_flags_offered)
    g.fallocate(0, TOTAL)  # allocated memory is still not readable through the file
    expect_errno(call(g), want, why)  # type: ignore[operator]


# --- fallocate -------------------------------------------------------------------------------

FALLOCATE = [
    # (id, steps done first, mode, offset, length, expected errno)
    # guest_memfd_test::test_fallocate, in its order
    ("alloc_whole_file", [], KEEP, 0, TOTAL, 0),
    ("punch_unaligned_offset", [], PUNCH, P - 1, P, errno.EINVAL),
    ("alloc_at_size", [], KEEP, TOTAL, P, errno.EINVAL),
    ("alloc_after_size", [], KEEP, TOTAL + P, P, errno.EINVAL),
    ("punch_at_size", [], PUNCH, TOTAL, P, 0),
    ("punch_after_size", [], PUNCH, TOTAL + P, P, 0),
    ("punch_unaligned_len", [], PUNCH, P, P - 1, errno.EINVAL),
    ("punch_page", [(KEEP, 0, TOTAL)], PUNCH, P, P, 0),
    ("refill_punched_page", [(KEEP, 0, TOTAL), (PUNCH, P, P)], KEEP, P, P, 0),
    # beyond upstream: the other modes and the VFS checks
    ("alloc_crossing_size", [], KEEP, 0, TOTAL + P, errno.EINVAL),
    ("alloc_unaligned_len", [], KEEP, 0, P + 1, errno.EINVAL),
    ("no_keep_size", [], 0, 0, P, errno.EOPNOTSUPP),
    ("punch_without_keep_size", [], FALLOC_FL_PUNCH_HOLE, 0, P, errno.EOPNOTSUPP),
    ("zero_range", [], KEEP | FALLOC_FL_ZERO_RANGE, 0, P, errno.EOPNOTSUPP),
    ("collapse_range", [], KEEP | FALLOC_FL_COLLAPSE_RANGE, 0, P, errno.EOPNOTSUPP),
    ("zero_len", [], KEEP, 0, 0, errno.EINVAL),
    ("punch_zero_len", [], PUNCH, 0, 0, errno.EINVAL),
    ("negative_offset", [], KEEP, -P, P, errno.EINVAL),
    ("punch_far_past_size", [], PUNCH, 1 << 62, P, 0),
    ("punch_twice", [(PUNCH, 0, P)], PUNCH, 0, P, 0),
]


@pytest.mark.parametrize("steps,mode,offset,length,want", [r[1:] for r in FALLOCATE],
                         ids=[r[0] for r in FALLOCATE])
def test_fallocate(gmem_vm: Vm, gmem_flags_offered: int, steps: list[tuple[int, int, int]],
                   mode: int, offset: int, length: int, want: int) -> None:
    """fallocate on a 4-page guest_memfd (guest_memfd_test::test_fallocate): KEEP_SIZE is
    required and PUNCH_HOLE the only extra mode (else EOPNOTSUPP), offset and length must be
    page aligned (EINVAL), allocation may not reach past i_size (EINVAL) while punching past it
    succeeds (kvm_gmem_fallocate/kvm_gmem_allocate; vfs_fallocate() for len <= 0, offset < 0
    and PUNCH_HOLE without KEEP_SIZE)."""
    g = gmem_vm.create_guest_memfd(TOTAL, gmem_flags_offered)
    for m, o, n in steps:
        g.fallocate(o, n, m)
    expect_errno(g.try_fallocate(offset, length, mode), want, f"guest_memfd size {TOTAL:#x}")


INVALID_PUNCH = [(0, 1), (0, P - 1), (0, P + 1), (1, 1), (1, P - 1), (1, P), (1, P + 1),
                 (P, 1), (P, P - 1), (P, P + 1)]


@pytest.mark.parametrize("offset,length", INVALID_PUNCH,
                         ids=[f"off{o:#x}-len{n:#x}" for o, n in INVALID_PUNCH])
def test_invalid_punch_hole(gmem_vm: Vm, gmem_flags_offered: int, offset: int,
                            length: int) -> None:
    """PUNCH_HOLE with an offset or length that is not page aligned is EINVAL
    (guest_memfd_test::test_invalid_punch_hole; kvm_gmem_fallocate())."""
    g = gmem_vm.create_guest_memfd(TOTAL, gmem_flags_offered)
    expect_errno(g.try_punch_hole(offset, length), errno.EINVAL)


# --- mmap ------------------------------------------------------------------------------------

@only(0)
def test_mmap_not_supported(gmem_vm: Vm, gmem_flags_offered: int) -> None:
    """Without GUEST_MEMFD_FLAG_MMAP, mmap of one page or the whole file fails with ENODEV
    (guest_memfd_test::test_mmap_not_supported; 6.12 has no mmap op, do_mmap() -ENODEV; 6.18
    kvm_gmem_mmap() returns -ENODEV unless the file was created with MMAP)."""
    g = gmem_vm.create_guest_memfd(TOTAL, gmem_flags_offered)
    for length in (P, TOTAL):
        for flags in (MAP_SHARED, MAP_PRIVATE):
            expect_errno(g.try_mmap(length, flags=flags), errno.ENODEV)


@only(MMAP | INIT_SHARED)
def test_mmap_supported(gmem_vm: Vm, gmem_flags_offered: int) -> None:
    """An INIT_SHARED guest_memfd maps MAP_SHARED: writes read back, PUNCH_HOLE zeroes exactly
    the punched page through the live mapping, and the page refaults writable
    (guest_memfd_test::test_mmap_supported; api.rst 4.142, GUEST_MEMFD_FLAG_INIT_SHARED)."""
    g = gmem_vm.create_guest_memfd(TOTAL, gmem_flags_offered)
    m = g.mmap(TOTAL)
    m.fill(0, TOTAL, 0xAA)
    assert m.read(0, TOTAL) == b"\xaa" * TOTAL, "guest_memfd mapping does not read back 0xaa"
    g.punch_hole(0, P)
    data = m.read(0, TOTAL)
    assert data[:P] == b"\0" * P, "PUNCH_HOLE(0, page) did not zero page 0 through the mapping"
    assert data[P:] == b"\xaa" * (TOTAL - P), "PUNCH_HOLE(0, page) changed pages 1..3"
    m.fill(0, P, 0xAA)
    assert m.read(0, TOTAL) == b"\xaa" * TOTAL, "page 0 did not refault writable after punch"


@only(MMAP | INIT_SHARED)
def test_mmap_shared_across_mappings(gmem_vm: Vm, gmem_flags_offered: int) -> None:
    """Two MAP_SHARED mappings of one guest_memfd see the same pages, and a mapping at a file
    offset sees the matching page (beyond upstream; MAP_SHARED file semantics, api.rst 4.142)."""
    g = gmem_vm.create_guest_memfd(TOTAL, gmem_flags_offered)
    a = g.mmap(TOTAL)
    b = g.mmap(P, offset=2 * P)
    for i in range(4):
        a.fill(i * P, P, 0x10 + i)
    assert b.read(0, P) == bytes([0x12]) * P, "mapping at offset 2 pages does not see page 2"
    b.fill(0, P, 0x77)
    assert a.read(2 * P, P) == b"\x77" * P, "write through one mapping not seen by the other"


@only(MMAP, MMAP | INIT_SHARED)
def test_mmap_private_refused(gmem_vm: Vm, gmem_flags_offered: int) -> None:
    """MAP_PRIVATE (copy-on-write) of a mappable guest_memfd is EINVAL
    (guest_memfd_test::test_mmap_cow; kvm_gmem_mmap() requires VM_SHARED|VM_MAYSHARE)."""
    g = gmem_vm.create_guest_memfd(TOTAL, gmem_flags_offered)
    for length in (P, TOTAL):
        expect_errno(g.try_mmap(length, flags=MAP_PRIVATE), errno.EINVAL)


@only(MMAP | INIT_SHARED)
def test_fault_overflow_sigbus(gmem_vm: Vm, gmem_flags_offered: int) -> None:
    """A mapping 4x the file size faults SIGBUS at the first byte past i_size, both writing and
    reading, and the pages below i_size keep what was written (guest_memfd_test::
    test_fault_overflow; kvm_gmem_fault_user_mapping() returns VM_FAULT_SIGBUS past i_size)."""
    g = gmem_vm.create_guest_memfd(TOTAL, gmem_flags_offered)
    m = g.mmap(4 * TOTAL)
    r = touch(m.addr, 4 * TOTAL, write=True)
    assert r.sigbus and r.faulted_at == TOTAL, (
        f"memset over a {4 * TOTAL:#x}-byte mapping of a {TOTAL:#x}-byte guest_memfd: "
        f"{r.describe()}; expected SIGBUS at offset {TOTAL:#x}")
    r = touch(m.addr + TOTAL, 1, write=False)
    assert r.sigbus, f"read at offset {TOTAL:#x} (== i_size): {r.describe()}; expected SIGBUS"
    assert m.read(0, TOTAL) == b"\xaa" * TOTAL, "bytes below i_size lost the child's 0xaa"


@only(MMAP)
def test_fault_private_sigbus(gmem_vm: Vm, gmem_flags_offered: int) -> None:
    """MMAP without INIT_SHARED: memory starts private, so the first write and the first read
    through the mapping SIGBUS at offset 0 (guest_memfd_test::test_fault_private;
    kvm_gmem_fault_user_mapping() refuses pages that are not shared)."""
    g = gmem_vm.create_guest_memfd(TOTAL, gmem_flags_offered)
    m = g.mmap(TOTAL)
    r = touch(m.addr, TOTAL, write=True)
    assert r.sigbus and r.faulted_at == 0, (
        f"memset over a private (MMAP, no INIT_SHARED) guest_memfd mapping: {r.describe()}; "
        "expected SIGBUS at offset 0")
    r = touch(m.addr, 1, write=False)
    assert r.sigbus and r.faulted_at == 0, f"read of private page 0: {r.describe()}; expected SIGBUS"
    # The failed faults leave the file usable.
    g.fallocate(0, TOTAL)
    g.punch_hole(0, TOTAL)


def _pmd_size() -> int:
    p = Path("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")
    if not p.exists():
        pytest.skip(f"no transparent hugepages on this host ({p} missing)")
    return int(p.read_text())


@only(MMAP | INIT_SHARED)
def test_madv_collapse_refused(kvm: Kvm, gmem_vm: Vm, gmem_flags_offered: int) -> None:
    """MADV_HUGEPAGE on a PMD-aligned guest_memfd mapping is accepted but MADV_COLLAPSE is
    EINVAL (no huge folio may map beyond shared ranges); MADV_DONTNEED then refaults fine
    (guest_memfd_test::test_collapse, newest upstream)."""
    pmd = _pmd_size()
    b = kvm.backend
    g = gmem_vm.create_guest_memfd(pmd, gmem_flags_offered)
    reserved = b.mmap(-1, 2 * pmd, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS)
    try:
        aligned = (reserved + pmd - 1) & ~(pmd - 1)
        addr = b.mmap(g.fd, pmd, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, 0, addr=aligned)
        assert addr == aligned, f"MAP_FIXED mapping landed at {addr:#x}, asked {aligned:#x}"
        for off in range(0, pmd, P):  # reads populate the page tables without dirtying
            ctypes.string_at(addr + off, 1)
        b.madvise(addr, pmd, MADV_HUGEPAGE)
        expect_errno(errno_of("madvise(MADV_COLLAPSE)", b.madvise, addr, pmd, MADV_COLLAPSE),
                     errno.EINVAL)
        b.madvise(addr, pmd, MADV_DONTNEED)
        assert ctypes.string_at(addr, 1) == b"\0", "refault after MADV_DONTNEED"
    finally:
        b.munmap(reserved, 2 * pmd)


# --- NUMA (multi-node hosts only) --------------------------------------------------------------

def _numa_nodes() -> int:
    base = Path("/sys/devices/system/node")
    return len(list(base.glob("node[0-9]*"))) if base.exists() else 1


def _require_two_nodes() -> None:
    n = _numa_nodes()
    if n < 2:
        pytest.skip(f"host has {n} NUMA node(s) (/sys/devices/system/node): guest_memfd NUMA "
                    "policy cases need nodes 0 and 1")


def _mbind(addr: int, length: int, mode: int, nodemask: int) -> Errno:
    return errno_of("mbind", libc_mbind, addr, length, mode, nodemask)


@only(MMAP, MMAP | INIT_SHARED)
def test_mbind(gmem_vm: Vm, gmem_flags_offered: int) -> None:
    """mbind policies on a guest_memfd mapping read back through get_mempolicy; policy 999 is
    EINVAL (guest_memfd_test::test_mbind, newest upstream: guest_memfd honours mempolicy).
    Only node 0 is named, so a single-node host runs it too."""
    g = gmem_vm.create_guest_memfd(TOTAL, gmem_flags_offered)
    m = g.mmap(TOTAL)
    for addr, mode in ((m.addr, MPOL_INTERLEAVE), (m.addr + 2 * P, MPOL_BIND)):
        expect_errno(_mbind(addr, 2 * P, mode, 1), 0)
        assert libc_get_mempolicy(addr) == (mode, 1), f"get_mempolicy({addr:#x}) after mbind {mode}"
    expect_errno(_mbind(m.addr, TOTAL, MPOL_DEFAULT, 0), 0)
    assert libc_get_mempolicy(m.addr) == (MPOL_DEFAULT, 0)
    expect_errno(_mbind(m.addr, P, 999, 1), errno.EINVAL, "policy 999")


@only(MMAP | INIT_SHARED)
def test_numa_allocation(gmem_vm: Vm, gmem_flags_offered: int) -> None:
    """Pages of an INIT_SHARED guest_memfd land on the nodes its mapping's policy names, before
    and after a punch-hole (guest_memfd_test::test_numa_allocation, newest upstream)."""
    _require_two_nodes()
    g = gmem_vm.create_guest_memfd(TOTAL, gmem_flags_offered)
    m = g.mmap(TOTAL)
    pages = [m.addr + i * P for i in range(4)]
    m.fill(0, P, 0xAA)
    expect_errno(_mbind(pages[0], P, MPOL_BIND, 1), 0)
    g.punch_hole(0, P)
    for first, second, want in ((2, 1, [1, 1, 0, 0]), (1, 2, [0, 0, 1, 1])):
        expect_errno(_mbind(pages[0], 2 * P, MPOL_BIND, first), 0)
        expect_errno(_mbind(pages[2], 2 * P, MPOL_BIND, second), 0)
        m.fill(0, TOTAL, 0xAA)
        got = libc_move_pages(pages)
        assert got == want, f"pages on nodes {got}, expected {want}"
        g.punch_hole(0, TOTAL)


# --- lifetime and scale (beyond upstream) ------------------------------------------------------

def test_outlives_vm_fd_while_bound(kvm: Kvm, make_vm: Callable[[], Vm],
                                    gmem_flags_offered: int) -> None:
    """A guest_memfd keeps its VM alive: with the VM fd closed and a range still bound to a
    memslot, fallocate and punch-hole keep working and mapped data persists (api.rst 4.142: the
    file holds a reference to the VM; private_mem_conversions_test does fallocate after
    kvm_vm_free)."""
    flags = gmem_flags_offered
    gmem_vm = make_vm()  # its own VM: the case closes it
    g = gmem_vm.create_guest_memfd(TOTAL, flags)
    shared = SharedMemory(kvm.backend, TOTAL)
    try:
        if memslot_accepts_guest_memfd(gmem_vm):
            gmem_vm.set_user_memory_region2(10, MemFlag.GUEST_MEMFD, 1 << 32, TOTAL, shared.addr,
                                            g, 0)
        m = g.mmap(TOTAL) if flags & INIT_SHARED else None
        if m:
            m.fill(0, TOTAL, 0x5A)
        gmem_vm.disown(g)
        gmem_vm.close()
        g.fallocate(0, TOTAL)
        g.punch_hole(P, P)
        g.fallocate(P, P)
        assert g.fstat().st_size == TOTAL
        if m:
            assert m.read(0, P) == b"\x5a" * P, "data lost after the VM fd was closed"
            assert m.read(P, P) == b"\0" * P, "punch-hole after VM close did not zero the page"
            m.fill(P, P, 0x11)
            assert m.read(P, P) == b"\x11" * P
    finally:
        g.close()
        shared.close()


def test_many_guest_memfds(gmem_vm: Vm) -> None:
    """256 guest_memfds at once: each its own inode and size, all fallocate-able, and closing
    them returns every fd (beyond upstream: no global limit, no shared state between files)."""
    before = len(os.listdir("/proc/self/fd"))
    gs = [gmem_vm.create_guest_memfd((i % 8 + 1) * P) for i in range(256)]
    assert len(os.listdir("/proc/self/fd")) - before == 256
    inos = set()
    for i, g in enumerate(gs):
        st = g.fstat()
        assert st.st_size == (i % 8 + 1) * P, f"guest_memfd #{i}: st_size {st.st_size:#x}"
        inos.add(st.st_ino)
        g.fallocate(0, g.size)
    assert len(inos) == 256, f"256 guest_memfds share inodes: {256 - len(inos)} duplicates"
    for g in gs:
        g.close()
    assert len(os.listdir("/proc/self/fd")) == before
