"""The guest_memfd as a file: what 7.3's virt/kvm/guest_memfd.c makes of VFS and mm calls.

No merged upstream selftest pins these (guest_memfd_test.c covers read/write, fallocate, mmap,
SIGBUS, MADV_COLLAPSE and NUMA policy; kvmpy's copies are in test_guest_memfd.py). Per VM type
offered and per guest_memfd flag set {0, MMAP, MMAP|INIT_SHARED} offered:

* ftruncate is EINVAL: kvm_gmem_setattr() refuses every setattr (6.12 and 7.3), the size stays;
* fstatfs: 7.3 puts the file on the "guest_memfd" pseudo-filesystem, f_type GUEST_MEMFD_MAGIC
  (kvm_gmem_init_fs_context(): init_pseudo(fc, GUEST_MEMFD_MAGIC); include/uapi/linux/magic.h
  0x474d454d "GMEM"); 6.12 made it with anon_inode_create_getfile() (ANON_INODE_FS_MAGIC).
  Nothing the kernel offers tells the two apart (mbind works on any VMA, with or without
  vm_ops->set_policy), so either is accepted, and one kernel must answer the same for all;
* mmap with PROT_EXEC is EPERM and mprotect(PROT_EXEC) EACCES: kvm_gmem_init_mount() sets
  MNT_NOEXEC on the mount (do_mmap(): path_noexec() refuses VM_EXEC and clears VM_MAYEXEC);
* MADV_COLD / MADV_PAGEOUT succeed and leave the contents: the mapping is unevictable
  (__kvm_gmem_create(): mapping_set_inaccessible(), WARN_ON_ONCE(!mapping_unevictable()));
* a forked child and an mremap'd mapping fault through the same vm_ops
  (kvm_gmem_fault_user_mapping()): shared pages readable/writable, SIGBUS at i_size and on
  private pages;
* UFFDIO_REGISTER of a guest_memfd range is EINVAL while the same userfaultfd registers a shmem
  range (fs/userfaultfd.c: vma_can_userfault() knows anonymous, shmem and hugetlb VMAs only);
  keyed on the answer: should a kernel accept it, the returned ioctls must offer the mode's
  resolving ioctl (UFFDIO_COPY / UFFDIO_CONTINUE), so the test flips rather than breaks.

read/write/pread/pwrite are test_guest_memfd.py::test_read_write_refused; migration (move_pages,
mbind MPOL_MF_MOVE) needs two nodes: test_gmem_numa.py.
"""

from __future__ import annotations

import ctypes
import errno
import os

import pytest

from kvmpy.backend import MAP_SHARED, PROT_READ, PROT_WRITE
from kvmpy.backend.libc import (
    MREMAP_MAYMOVE,
    libc_ioctl,
    libc_mremap,
    libc_userfaultfd,
)
from kvmpy.errors import Errno
from kvmpy.memory import SharedMemory
from kvmpy.system import Kvm
from kvmpy.testing.errnos import errname, errno_of, expect_errno
from kvmpy.testing.require import where
from kvmpy.testing.sigbus import touch
from kvmpy.uapi import PAGE_SIZE, GuestMemfdFlag
from kvmpy.vm import Vm

P = PAGE_SIZE
TOTAL = 4 * P
MMAP = int(GuestMemfdFlag.MMAP)
INIT_SHARED = int(GuestMemfdFlag.INIT_SHARED)
FLAG_IDS = {0: "noflags", MMAP: "mmap", MMAP | INIT_SHARED: "mmap_init_shared"}
#: One VM per VM type for the module's cases (selftests/conftest.py shared_gmem_vm).
SHARED_GMEM_VM = True
GUEST_MEMFD_MAGIC = 0x474D454D   # include/uapi/linux/magic.h
ANON_INODE_FS_MAGIC = 0x09041934  # include/uapi/linux/magic.h
PROT_EXEC = 0x4
MADV_COLD, MADV_PAGEOUT = 20, 21


def only(*sets: int) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("gmem_flags", list(sets), ids=[FLAG_IDS[f] for f in sets])


# --- ftruncate, fstatfs ------------------------------------------------------------------------

TRUNCATE = [("shrink", TOTAL - P), ("grow", 2 * TOTAL), ("to_zero", 0), ("same_size", TOTAL),
            ("unaligned", TOTAL + 1)]


@pytest.mark.parametrize("length", [r[1] for r in TRUNCATE], ids=[r[0] for r in TRUNCATE])
def test_ftruncate_refused(gmem_vm: Vm, gmem_flags_offered: int, length: int) -> None:
    """ftruncate(guest_memfd, n) is EINVAL for any n and st_size stays (kvm_gmem_setattr())."""
    g = gmem_vm.create_guest_memfd(TOTAL, gmem_flags_offered)
    g.fallocate(0, P)
    expect_errno(errno_of("ftruncate", os.ftruncate, g.fd, length), errno.EINVAL,
                 f"guest_memfd of {TOTAL:#x} bytes: kvm_gmem_setattr()")
    size = g.fstat().st_size
    assert size == TOTAL, f"st_size {size:#x} after a refused ftruncate, expected {TOTAL:#x}"


def test_fstatfs_magic(gmem_vm: Vm, gmem_flags_offered: int) -> None:
    """fstatfs f_type is GUEST_MEMFD_MAGIC (7.3: the guest_memfd pseudo-filesystem) or
    ANON_INODE_FS_MAGIC (6.12..6.18: anon_inode_create_getfile()), and one kernel answers the
    same for every guest_memfd, whatever its flags (all come from one mount)."""
    g = gmem_vm.create_guest_memfd(TOTAL, gmem_flags_offered)
    f_type = g.fstatfs_type()
    print(f"fstatfs(guest_memfd).f_type = {f_type:#x} on {where(gmem_vm)}")
    want = {GUEST_MEMFD_MAGIC, ANON_INODE_FS_MAGIC}
    assert f_type in want, (f"fstatfs(guest_memfd).f_type = {f_type:#x} on {where(gmem_vm)}; "
                            f"expected GUEST_MEMFD_MAGIC {GUEST_MEMFD_MAGIC:#x} or "
                            f"ANON_INODE_FS_MAGIC {ANON_INODE_FS_MAGIC:#x}")
    other = gmem_vm.create_guest_memfd(P, 0)
    assert other.fstatfs_type() == f_type, "guest_memfds of one kernel on two filesystems"
    assert other.fstat().st_dev == g.fstat().st_dev, "guest_memfds of one VM on two mounts"


# --- mmap: noexec mount ------------------------------------------------------------------------

@only(MMAP, MMAP | INIT_SHARED)
def test_mmap_exec_refused(gmem_vm: Vm, gmem_flags_offered: int) -> None:
    """PROT_EXEC mappings are EPERM, mprotect(PROT_EXEC) of a mapping EACCES; PROT_READ alone
    maps (kvm_gmem_init_mount(): MNT_NOEXEC; do_mmap() path_noexec(); mprotect without
    VM_MAYEXEC)."""
    g = gmem_vm.create_guest_memfd(TOTAL, gmem_flags_offered)
    for prot in (PROT_READ | PROT_EXEC, PROT_READ | PROT_WRITE | PROT_EXEC, PROT_EXEC):
        expect_errno(g.try_mmap(TOTAL, prot=prot), errno.EPERM)
    expect_errno(g.try_mmap(TOTAL, prot=PROT_READ), 0, "a PROT_READ mapping must still work")
    m = g.mmap(TOTAL)
    expect_errno(m.try_mprotect(PROT_READ | PROT_EXEC), errno.EACCES, "no VM_MAYEXEC on a noexec mount")


# --- reclaim advice ------------------------------------------------------------------------------

@only(MMAP | INIT_SHARED)
@pytest.mark.parametrize("advice", [MADV_COLD, MADV_PAGEOUT], ids=["cold", "pageout"])
def test_reclaim_advice_keeps_contents(kvm: Kvm, gmem_vm: Vm, gmem_flags_offered: int,
                                       advice: int) -> None:
    """MADV_COLD and MADV_PAGEOUT on a populated mapping succeed and every byte stays, through
    the mapping and a second one (unevictable mapping: __kvm_gmem_create())."""
    g = gmem_vm.create_guest_memfd(TOTAL, gmem_flags_offered)
    m = g.mmap(TOTAL)
    pattern = bytes((i * 7 + 3) & 0xFF for i in range(TOTAL))
    m.write(0, pattern)
    kvm.backend.madvise(m.addr, TOTAL, advice)
    assert m.read(0, TOTAL) == pattern, f"madvise({advice}) changed the guest_memfd's contents"
    with g.mmap(TOTAL) as again:
        assert again.read(0, TOTAL) == pattern, "a new mapping does not see the contents"


# --- fork, mremap: the same fault semantics ------------------------------------------------------

@only(MMAP, MMAP | INIT_SHARED)
def test_fork_keeps_fault_semantics(gmem_vm: Vm, gmem_flags_offered: int) -> None:
    """A forked child's copy of the mapping faults through kvm_gmem_fault_user_mapping():
    INIT_SHARED pages are the parent's (the child's writes are seen), SIGBUS at i_size;
    without INIT_SHARED, SIGBUS at offset 0. (sigbus.touch runs the access in a forked child;
    the parent populated the pages first, so the child's are inherited VMAs over live pages.)"""
    g = gmem_vm.create_guest_memfd(TOTAL, gmem_flags_offered)
    m = g.mmap(2 * TOTAL)
    if gmem_flags_offered & INIT_SHARED:
        m.fill(0, TOTAL, 0x11)
        r = touch(m.addr, 2 * TOTAL, write=True, value=0x22)
        assert r.sigbus and r.faulted_at == TOTAL, f"child writing 2x i_size: {r.describe()}; " \
                                                   f"expected SIGBUS at {TOTAL:#x}"
        assert m.read(0, TOTAL) == b"\x22" * TOTAL, "the child's writes are not in the parent"
    else:
        r = touch(m.addr, TOTAL, write=False)
        assert r.sigbus and r.faulted_at == 0, f"child reading private page 0: {r.describe()}"


@only(MMAP, MMAP | INIT_SHARED)
def test_mremap_keeps_fault_semantics(kvm: Kvm, gmem_vm: Vm, gmem_flags_offered: int) -> None:
    """mremap(MREMAP_MAYMOVE) of a mapping to twice its size keeps the pages and the fault
    handler: shared data moves along, SIGBUS at i_size (INIT_SHARED) or at 0 (private)."""
    b = kvm.backend
    g = gmem_vm.create_guest_memfd(TOTAL, gmem_flags_offered)
    addr = b.mmap(g.fd, TOTAL, PROT_READ | PROT_WRITE, MAP_SHARED, 0)
    length = TOTAL
    try:
        shared = bool(gmem_flags_offered & INIT_SHARED)
        if shared:
            ctypes.memset(addr, 0x33, TOTAL)
        addr = libc_mremap(addr, TOTAL, 2 * TOTAL, MREMAP_MAYMOVE)
        length = 2 * TOTAL
        if shared:
            assert ctypes.string_at(addr, TOTAL) == b"\x33" * TOTAL, "data lost by mremap"
            r = touch(addr, 2 * TOTAL, write=True)
            assert r.sigbus and r.faulted_at == TOTAL, f"after mremap: {r.describe()}; " \
                                                       f"expected SIGBUS at {TOTAL:#x}"
        else:
            r = touch(addr, P, write=False)
            assert r.sigbus and r.faulted_at == 0, f"after mremap, private page: {r.describe()}"
    finally:
        b.munmap(addr, length)


# --- userfaultfd -------------------------------------------------------------------------------

UFFD_API = 0xAA
UFFD_USER_MODE_ONLY = 1
UFFDIO_API = 0xC018AA3F       # _IOWR(0xAA, 0x3F, struct uffdio_api)
UFFDIO_REGISTER = 0xC020AA00  # _IOWR(0xAA, 0x00, struct uffdio_register)
UFFDIO_REGISTER_MODE_MISSING, UFFDIO_REGISTER_MODE_MINOR = 1, 4
_UFFDIO_COPY, _UFFDIO_CONTINUE = 3, 7
UFFD_MODES = [("missing", UFFDIO_REGISTER_MODE_MISSING, _UFFDIO_COPY),
              ("minor", UFFDIO_REGISTER_MODE_MINOR, _UFFDIO_CONTINUE)]


def _uffd_register(uffd: int, addr: int, length: int, mode: int) -> tuple[Errno, int]:
    """UFFDIO_REGISTER; returns (errno, the ioctls mask the kernel answered)."""
    reg = (ctypes.c_uint64 * 4)(addr, length, mode, 0)
    err = errno_of("UFFDIO_REGISTER", libc_ioctl, uffd, UFFDIO_REGISTER, ctypes.addressof(reg),
                   detail=f"uffd {uffd}, start={addr:#x}, len={length:#x}, mode={mode}")
    return err, 0 if err else int(reg[3])


@only(MMAP | INIT_SHARED)
@pytest.mark.parametrize("mode,resolve", [m[1:] for m in UFFD_MODES], ids=[m[0] for m in UFFD_MODES])
def test_userfaultfd_register(kvm: Kvm, gmem_vm: Vm,
                              gmem_flags_offered: int, mode: int, resolve: int) -> None:
    """UFFDIO_REGISTER over a guest_memfd mapping is EINVAL (vma_can_userfault()), while the
    same userfaultfd registers a shmem mapping; if the kernel accepts it, the answer must offer
    the resolving ioctl."""
    try:
        uffd = libc_userfaultfd(os.O_CLOEXEC | os.O_NONBLOCK | UFFD_USER_MODE_ONLY)
    except OSError as e:
        pytest.skip(f"userfaultfd(UFFD_USER_MODE_ONLY) -> {errname(e.errno or 0)}: "
                    "CONFIG_USERFAULTFD off or not permitted")
    try:
        api = (ctypes.c_uint64 * 3)(UFFD_API, 0, 0)
        libc_ioctl(uffd, UFFDIO_API, ctypes.addressof(api))
        with SharedMemory(kvm.backend, TOTAL, "uffd-control") as shm:
            err, _ = _uffd_register(uffd, shm.addr, TOTAL, mode)
            if err:
                pytest.skip(f"UFFDIO_REGISTER(mode {mode}) of a shmem mapping -> {errname(err)}: "
                            "this userfaultfd mode is not offered")
            g = gmem_vm.create_guest_memfd(TOTAL, gmem_flags_offered)
            m = g.mmap(TOTAL)
            err, ioctls = _uffd_register(uffd, m.addr, TOTAL, mode)
            print(f"UFFDIO_REGISTER(guest_memfd mapping, mode {mode}) -> {errname(err)}, "
                  f"ioctls {ioctls:#x}")
            if err == 0:  # a kernel with guest_memfd userfaultfd support: the answer must work
                assert ioctls & (1 << resolve), (
                    f"UFFDIO_REGISTER of a guest_memfd mapping succeeded but offers ioctls "
                    f"{ioctls:#x} without bit {resolve}")
            else:
                expect_errno(err, errno.EINVAL, "a guest_memfd mapping")
    finally:
        os.close(uffd)
