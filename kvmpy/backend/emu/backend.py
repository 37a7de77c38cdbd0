"""EmuBackend: the Backend seam answered by an in-process emulated KVM.

Requests are the real ioctl numbers (kvmpy.uapi.Ioctl); struct arguments are read from and
written to the caller's memory by address, as the kernel's copy_from_user/copy_to_user do
(process_vm_readv/writev: a bad pointer is EFAULT, never a crash). Every emulated object is a
real file with its own inode (a memfd; a guest_memfd's is a handle file, see gmem.py), and the
table maps the inode (st_dev, st_ino) to the object: a dup()'d or passed fd is the same object,
an fd closed behind the backend's back and reused is foreign. Foreign fds get the real syscall.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import struct
import threading
import weakref
from dataclasses import dataclass
from types import SimpleNamespace

from ...errors import NotModelled
from ...uapi import (
    KVMIO,
    PAGE_SIZE,
    Cap,
    Ioctl,
    kvm_cpuid2,
    kvm_cpuid_entry2,
    kvm_create_guest_memfd,
    kvm_enable_cap,
    kvm_memory_attributes,
    kvm_pre_fault_memory,
    kvm_userspace_memory_region,
    kvm_userspace_memory_region2,
)
from .. import Backend, IoctlArg, arg_pointer
from ..libc import (
    copy_from_user,
    copy_to_user,
    libc_fallocate,
    libc_ioctl,
    libc_madvise,
    libc_mmap,
    libc_munmap,
)
from . import sigwatch as _sigwatch  # noqa: F401  (its pipe is made with the backend)
from .dispatch import Entry, Ptr, Table, call, check_table
from .gmem import PROT_EXEC, EmuGmem, has_cap_sys_admin, sync_poison
from .memslots import RegionArgs
from .profiles import VCPU_MMAP_SIZE, Profile, get_profile
from .system import EmuSystem, get_supported_cpuid
from .vm import EmuVm, VcpuLike

# Plain ints: attribute access on an Enum class costs ~0.5 us, ioctl dispatch compares many.
CAP_GUEST_MEMFD = int(Cap.GUEST_MEMFD)
R = SimpleNamespace(**{m.name: int(m) for m in Ioctl})
MADV_COLLAPSE = 25
MADV_HWPOISON = 100
MAP_SHARED = 0x01

# High enough that no ordinary file sits at such an offset, below MAX_LFS_FILESIZE (2**63 - 1).
_TAG_BASE = 1 << 61

_MPOL_MF_MOVE_ANY = 1 << 1 | 1 << 2   # MPOL_MF_MOVE | MPOL_MF_MOVE_ALL (uapi/linux/mempolicy.h)


@dataclass
class EmuVcpuFd:
    """A vCPU fd: the memfd holding kvm_run, the emulator's own mapping of it, the EmuVcpu."""

    vm: EmuVm
    vcpu_id: int
    run_addr: int
    vcpu: VcpuLike


_Obj = EmuSystem | EmuVm | EmuGmem | EmuVcpuFd


def _ioc_type(request: int) -> int:
    return (request >> 8) & 0xFF


# The _IOC_NR of every KVMIO ioctl in the 6.12 uAPI (include/uapi/linux/kvm.h,
# arch/x86/include/uapi/asm/kvm.h). Such a request the emulator does not answer is
# NotModelled; any other number cannot be a KVM ioctl and gets the kernel's default errno.
KVM_IOCTL_NRS = frozenset([0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x09, 0x0A, 0x41, 0x42,
                           0x44, 0x45, 0x46, 0x47, 0x48, 0x49, 0x50, 0x51, 0x52,
                           *range(0x60, 0x69), 0x6A, 0x71, *range(0x76, 0x7D),
                           *range(0x80, 0x87), *range(0x88, 0xD3), 0xD4, 0xD5,
                           *range(0xE0, 0xE4)])


def is_kvm_ioctl(request: int) -> bool:
    """Whether ``request`` is (by type and number) an ioctl the kernel's KVM defines."""
    return _ioc_type(request) == KVMIO and request & 0xFF in KVM_IOCTL_NRS


class EmuBackend(Backend):
    """The emulated KVM. ``profile``: "upstream" (default), "6.12", "host", or a Profile."""

    name = "emu"

    def __init__(self, profile: str | Profile = "upstream") -> None:
        self.profile = profile if isinstance(profile, Profile) else get_profile(profile)
        self._lock = threading.Lock()
        self._objs: dict[tuple[int, int], _Obj] = {}     # (st_dev, st_ino) -> object
        self._keys: dict[int, tuple[int, int]] = {}      # id(object) -> its key
        self._tags: dict[int, int] = {}                  # id(object) -> its file offset tag
        self._fd_cache: dict[int, tuple[int, _Obj]] = {}  # fd -> (tag, object), see _lookup
        # Address ranges of guest_memfd mappings (for madvise), [start, end).
        #: Host mappings of guest_memfds made through this backend: (start, end, file, offset
        #: of start in the file).
        self._gmem_maps: list[tuple[int, int, EmuGmem, int]] = []
        self._tls = threading.local()
        # Every VM made here, for munmap's MMU-notifier pass (a VM lives while a vCPU holds it).
        self._vms: weakref.WeakSet[EmuVm] = weakref.WeakSet()

    # --- fd table ------------------------------------------------------------------------------
    # Objects are known by their file's inode, not by fd number, as the kernel knows a file:
    # a dup(), an inherited or SCM_RIGHTS-passed copy of an fd is the same object, and an fd
    # closed behind the backend's back and reused for another file is foreign.
    #
    # The fstat() of every lookup is ~1 us of a ~20 us ioctl, so the memfd-backed objects
    # (/dev/kvm, VM, vCPU) also get a per-object random file offset as a tag, and a cache
    # fd -> (tag, object) is trusted only while lseek(fd, 0, SEEK_CUR) (~0.25 us) returns that
    # tag: the offset lives in the open file (shared by dup()s and forks, as the object is),
    # a closed fd fails, and a reused fd number is another file with its own offset. Nothing
    # reads or writes these memfds through their offset (read/write are refused, mmap names
    # its offset), so only a raw lseek() tells (real KVM fds: noop_llseek, always 0). A
    # guest_memfd's handle may not seek (memfd_secret) and is looked up by inode only.
    def _register(self, fd: int, obj: _Obj, tag: bool = True) -> int:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        if tag:
            self._tags[id(obj)] = os.lseek(fd, _TAG_BASE | secrets.randbits(60), os.SEEK_SET)
        with self._lock:
            self._objs[key] = obj
            self._keys[id(obj)] = key
        return fd

    def _lookup(self, fd: int) -> _Obj | None:
        hit = self._fd_cache.get(fd)
        if hit is not None:
            try:
                if os.lseek(fd, 0, os.SEEK_CUR) == hit[0]:
                    return hit[1]
            except OSError as e:
                if e.errno is None:
                    raise       # a signal handler's exception (TimeoutError), not lseek's
            self._fd_cache.pop(fd, None)
        try:
            st = os.fstat(fd)
        except OverflowError:
            return None
        except OSError as e:
            if e.errno is None:
                raise       # a signal handler's exception (TimeoutError), not fstat's
            return None
        obj = self._objs.get((st.st_dev, st.st_ino))
        if obj is not None:
            tag = self._tags.get(id(obj))
            if tag is not None and os.lseek(fd, 0, os.SEEK_CUR) == tag:
                self._fd_cache[fd] = (tag, obj)
        return obj

    def _gmem(self, fd: int) -> EmuGmem | None:
        obj = self._lookup(fd)
        return obj if isinstance(obj, EmuGmem) and not obj.closed else None

    def object_of(self, fd: int) -> object | None:
        """The emulated object behind ``fd`` (EmuSystem, EmuVm, EmuGmem, EmuVcpuFd) or None."""
        return self._lookup(fd)

    # --- Backend -------------------------------------------------------------------------------
    def open_kvm(self) -> int:
        fd = os.memfd_create("kvm-emu-system", os.MFD_CLOEXEC)
        return self._register(fd, EmuSystem(self.profile))

    def _cin(self, addr: int, size: int) -> bytes:
        """copy_from_user: direct when [addr, addr+size) lies inside the ctypes object the
        caller passed (known valid), else through process_vm_readv (EFAULT on a bad pointer)."""
        lo, hi = getattr(self._tls, "span", (0, 0))
        if lo <= addr and addr + size <= hi:
            return ctypes.string_at(addr, size)
        return copy_from_user(addr, size)

    def _cout(self, addr: int, data: bytes) -> None:
        lo, hi = getattr(self._tls, "span", (0, 0))
        if lo <= addr and addr + len(data) <= hi:
            ctypes.memmove(addr, data, len(data))
        else:
            copy_to_user(addr, data)

    def ioctl(self, fd: int, request: int, arg: IoctlArg = None) -> int:
        if arg is None or isinstance(arg, int):
            # No struct of the caller's to vouch for: the span is left as it is (none, or that
            # of an ioctl this one interrupts, whose struct is still alive), which spares
            # KVM_RUN, the emulated guest's hot call, the thread-local round trip.
            return self._ioctl(fd, request & 0xFFFF_FFFF, arg_pointer(arg))
        addr = arg_pointer(arg)
        tls = self._tls
        outer = getattr(tls, "span", (0, 0))
        tls.span = (0, 0) if arg is None or isinstance(arg, int) else \
            (addr, addr + ctypes.sizeof(arg))
        try:
            return self._ioctl(fd, request & 0xFFFF_FFFF, addr)
        finally:
            # An ioctl made by a signal handler inside this one must not leave its span behind.
            tls.span = outer

    def _ioctl(self, fd: int, request: int, addr: int) -> int:
        obj = self._lookup(fd)
        if obj is None:
            return libc_ioctl(fd, request, addr)
        if isinstance(obj, EmuVcpuFd):
            if (request >> 8) & 0xFF != KVMIO:     # _ioc_type(), inline: every vCPU ioctl
                # kvm_vcpu_ioctl(): "if (unlikely(_IOC_TYPE(ioctl) != KVMIO)) return -EINVAL".
                raise OSError(errno.EINVAL, f"ioctl {request:#x} is not a KVM ioctl")
            e = VCPU_FD_IOCTLS.get(request)
            if e is None:
                # EmuVcpu's own table (vcpu.py); the span-aware copies skip process_vm_*v
                # for a struct the caller passed (KVM_GET_REGS: ~6 us of ~10).
                return obj.vcpu.ioctl(request, addr, self._cin, self._cout)
            return self._call(e, request, addr, obj)
        if isinstance(obj, EmuGmem):
            # kvm_gmem_fops has no unlocked_ioctl.
            raise OSError(errno.ENOTTY, "guest_memfd has no ioctls")
        table, what = (SYSTEM_IOCTLS, "/dev/kvm") if isinstance(obj, EmuSystem) else \
            (VM_IOCTLS, "a VM fd")
        e = table.get(request)
        if e is not None and (e.built_in is None or e.built_in(obj)):
            return self._call(e, request, addr, obj)
        if not is_kvm_ioctl(request) or e is not None:
            # Unknown (or compiled-out) ioctls fall to the arch handlers' defaults:
            # kvm_arch_dev_ioctl() answers EINVAL, kvm_arch_vm_ioctl() ENOTTY
            # (arch/x86/kvm/x86.c); a compiled-out one on a VM is ENOTTY.
            err = errno.EINVAL if isinstance(obj, EmuSystem) and e is None else errno.ENOTTY
            name = Ioctl.name_of(request) if e is not None else f"ioctl {request:#x}"
            raise OSError(err, f"{name} is not a KVM ioctl of this kernel")
        raise NotModelled(f"{Ioctl.name_of(request)} on {what} is not modelled by the "
                          f"emulated KVM")

    def _call(self, e: Entry, request: int, addr: int, obj: object) -> int:
        return call(e, request, addr, self._cin, self._cout, self, obj)

    # --- /dev/kvm handlers ---------------------------------------------------------------------
    def _api_version(self, sysobj: EmuSystem, arg: int) -> int:
        if arg:
            raise OSError(errno.EINVAL, "KVM_GET_API_VERSION takes no argument")
        return sysobj.api_version()

    def _vcpu_mmap_size(self, sysobj: EmuSystem, arg: int) -> int:
        if arg:
            raise OSError(errno.EINVAL, "KVM_GET_VCPU_MMAP_SIZE takes no argument")
        return VCPU_MMAP_SIZE

    def _create_vm(self, sysobj: EmuSystem, arg: int) -> int:
        p = sysobj.profile
        # kvm_arch_init_vm(): the type must be offered in KVM_CAP_VM_TYPES.
        if arg >= 32 or not p.vm_types & (1 << arg):
            raise OSError(errno.EINVAL, f"VM type {arg} not supported")
        vm = EmuVm(arg, p, self._gmem)
        with self._lock:
            self._vms.add(vm)
        fd = os.memfd_create("kvm-emu-vm", os.MFD_CLOEXEC)
        return self._register(fd, vm)

    def _supported_cpuid(self, sysobj: EmuSystem, arg: int) -> int:
        (nent,) = struct.unpack_from("<I", self._cin(arg, ctypes.sizeof(kvm_cpuid2)))
        entries = get_supported_cpuid(sysobj.profile, nent)
        blob = b"".join(kvm_cpuid_entry2(*e).to_bytes() for e in entries)
        assert len(blob) == ctypes.sizeof(kvm_cpuid_entry2) * len(entries)
        self._cout(arg + ctypes.sizeof(kvm_cpuid2), blob)
        self._cout(arg, struct.pack("<I", len(entries)))
        return 0

    # --- VM handlers ---------------------------------------------------------------------------
    def _set_region(self, vm: EmuVm, r1: kvm_userspace_memory_region) -> None:
        vm.set_memory_region(RegionArgs(r1.slot, r1.flags, r1.guest_phys_addr, r1.memory_size,
                                        r1.userspace_addr), False)

    def _set_region2(self, vm: EmuVm, r2: kvm_userspace_memory_region2) -> None:
        vm.set_memory_region(RegionArgs(r2.slot, r2.flags, r2.guest_phys_addr, r2.memory_size,
                                        r2.userspace_addr, r2.guest_memfd_offset,
                                        r2.guest_memfd), True)

    def _create_gmem(self, vm: EmuVm, c: kvm_create_guest_memfd) -> int:
        g = vm.create_gmem(c.size, c.flags)
        return self._register(g.fd, g, tag=False)

    def _create_vcpu(self, vm: EmuVm, vcpu_id: int) -> int:
        vm.reserve_vcpu_id(vcpu_id)
        try:
            from .vcpu import EmuVcpu  # type: ignore[import-not-found,unused-ignore]
        except ImportError as e:
            vm.release_vcpu_id(vcpu_id)
            raise NotModelled("KVM_CREATE_VCPU: vCPUs are not available in the emulated KVM "
                              f"(kvmpy.backend.emu.vcpu could not be imported: {e})") from e
        fd = os.memfd_create("kvm-emu-vcpu", os.MFD_CLOEXEC)
        run_addr = 0
        try:
            os.ftruncate(fd, VCPU_MMAP_SIZE)
            run_addr = libc_mmap(0, VCPU_MMAP_SIZE, 3, MAP_SHARED, fd, 0)
            vcpu: VcpuLike = EmuVcpu(vm, vcpu_id, run_addr, VCPU_MMAP_SIZE)
        except BaseException:
            if run_addr:
                libc_munmap(run_addr, VCPU_MMAP_SIZE)
            os.close(fd)
            vm.release_vcpu_id(vcpu_id)
            raise
        with vm.lock:
            vm.vcpus.append(vcpu)
        return self._register(fd, EmuVcpuFd(vm, vcpu_id, run_addr, vcpu))

    def _pre_fault(self, v: EmuVcpuFd, r: kvm_pre_fault_memory) -> None:
        """KVM_PRE_FAULT_MEMORY: the leftover range is copied back even on failure."""
        err, r.gpa, r.size = v.vm.pre_fault(r.gpa, r.size, r.flags, v.run_addr)
        if err:
            raise OSError(err, f"KVM_PRE_FAULT_MEMORY: {os.strerror(err)}")

    # --- files ---------------------------------------------------------------------------------
    def mmap(self, fd: int, length: int, prot: int, flags: int, offset: int = 0,
             addr: int = 0) -> int:
        obj = self._lookup(fd) if fd >= 0 else None
        if obj is None or isinstance(obj, EmuVcpuFd):
            return libc_mmap(addr, length, prot, flags, fd, offset)
        if isinstance(obj, EmuGmem):
            a = obj.mmap(length, prot, flags, offset, addr)
            with self._lock:
                self._gmem_maps.append((a, a + _page_up(length), obj, offset))
                obj.host_maps.append((a, a + _page_up(length), offset))
            return a
        # /dev/kvm and VM fds have no mmap.
        raise OSError(errno.ENODEV, "this KVM fd cannot be mmap'd")

    def munmap(self, addr: int, length: int) -> None:
        end = addr + _page_up(length)
        with self._lock:
            vms = list(self._vms)
        with contextlib.ExitStack() as notifiers:
            # Every emulated VM lets go of the range first (EmuVm.host_unmapping(): the MMU
            # notifier); only then may the pages go. A raw munmap bypassing the backend is not
            # seen (docs/emulator.md).
            for vm in vms:
                notifiers.enter_context(vm.host_unmapping(addr, end))
            libc_munmap(addr, length)
        with self._lock:
            out: list[tuple[int, int, EmuGmem, int]] = []
            for s, e, g, off in self._gmem_maps:
                if e <= addr or s >= end:
                    out.append((s, e, g, off))
                    continue
                if s < addr:
                    out.append((s, addr, g, off))
                if e > end:
                    out.append((end, e, g, off + end - s))
            touched = {id(g): g for s, e, g, _ in self._gmem_maps if s < end and addr < e}
            self._gmem_maps = out
            for g in touched.values():
                g.set_host_maps([(s, e, off) for s, e, gg, off in out if gg is g])

    def madvise(self, addr: int, length: int, advice: int) -> None:
        sync_poison()
        if advice == MADV_HWPOISON:
            self._hwpoison(addr, length)
            return
        if advice == MADV_COLLAPSE:
            end = addr + length
            if any(s < end and addr < e for s, e, _, _ in self._gmem_maps):
                # A guest_memfd VMA is not eligible for khugepaged collapse.
                raise OSError(self.profile.gmem_collapse_errno,
                              "madvise(MADV_COLLAPSE) on a guest_memfd mapping")
        libc_madvise(addr, length, advice)

    def _hwpoison(self, addr: int, length: int) -> None:
        """madvise(MADV_HWPOISON) (mm/madvise.c madvise_inject_error()): EPERM without
        CAP_SYS_ADMIN, then per page memory_failure(). A guest_memfd page is poisoned in the
        emulator, never in host RAM (gmem.py EmuGmem.hwpoison()); any other address gets the
        real madvise, as it would without the emulator."""
        if not has_cap_sys_admin():
            raise OSError(errno.EPERM, "madvise(MADV_HWPOISON) needs CAP_SYS_ADMIN")
        end = addr + length
        with self._lock:
            maps = [m for m in self._gmem_maps if m[0] < end and addr < m[1]]
        if not maps:
            libc_madvise(addr, length, MADV_HWPOISON)
            return
        if not self.profile.memory_failure:
            # CONFIG_MEMORY_FAILURE off: MADV_HWPOISON is not a valid advice.
            raise OSError(errno.EINVAL, "madvise(MADV_HWPOISON) without CONFIG_MEMORY_FAILURE")
        page = addr & ~(PAGE_SIZE - 1)
        while page < end:
            m = next((m for m in maps if m[0] <= page < m[1]), None)
            if m is None:
                libc_madvise(page, PAGE_SIZE, MADV_HWPOISON)
            else:
                m[2].hwpoison(m[3] + page - m[0])
            page += PAGE_SIZE

    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        obj = self._lookup(fd)
        if obj is None:
            libc_fallocate(fd, mode, offset, length)
            return
        if isinstance(obj, EmuGmem):
            obj.fallocate(mode, offset, length)
            return
        if offset < 0 or length <= 0:
            raise OSError(errno.EINVAL, "fallocate: offset < 0 or len <= 0")
        # KVM's anonymous-inode fds are neither regular files nor block devices.
        raise OSError(errno.ENODEV, "fallocate on a KVM fd")

    def fstat(self, fd: int) -> os.stat_result:
        st = os.fstat(fd)
        obj = self._lookup(fd)
        if isinstance(obj, EmuGmem) and not obj.closed:
            # The handle holds no pages; the contents file's allocation is the guest_memfd's.
            extra = {k: getattr(st, k) for k in _STAT_EXTRA}
            with obj.contents() as cfd:
                extra["st_blocks"] = os.fstat(cfd).st_blocks
            return os.stat_result(list(st), extra)
        return st

    def fstatfs_type(self, fd: int) -> int:
        obj = self._lookup(fd)
        if isinstance(obj, EmuGmem) and not obj.closed:
            return self.profile.gmem_fs_magic   # the handle itself is a memfd_secret
        return super().fstatfs_type(fd)

    def mprotect(self, addr: int, length: int, prot: int) -> None:
        end = addr + _page_up(length)
        if prot & PROT_EXEC and self.profile.gmem_noexec and any(
                s < end and addr < e for s, e, _, _ in self._gmem_maps):
            # mm/mprotect.c do_mprotect_pkey(): VM_EXEC without VM_MAYEXEC is EACCES; do_mmap()
            # clears VM_MAYEXEC for a file on a noexec mount (path_noexec()).
            raise OSError(errno.EACCES, "mprotect(PROT_EXEC) of a guest_memfd mapping "
                          "(noexec mount)")
        super().mprotect(addr, length, prot)

    def _in_gmem_map(self, addr: int, end: int) -> bool:
        return any(s < end and addr < e for s, e, _, _ in self._gmem_maps)

    def mbind(self, addr: int, length: int, mode: int, nodemask: int, flags: int = 0) -> None:
        if flags & _MPOL_MF_MOVE_ANY and self._in_gmem_map(addr, addr + _page_up(length)):
            # The policy lands on the contents memfd as on the guest_memfd, but its folios must
            # not move: 7.3 kvm_gmem_migrate_folio() fails every migration (-EINVAL), which
            # do_mbind() counts as failed pages (-EIO with MPOL_MF_STRICT). Without the move
            # flags the kernel sets the policy and, with STRICT, reports misplaced pages the same.
            flags &= ~_MPOL_MF_MOVE_ANY
        super().mbind(addr, length, mode, nodemask, flags)

    def move_pages(self, addrs: list[int], nodes: list[int] | None = None,
                   flags: int = 0) -> list[int]:
        if nodes is None or not any(self._in_gmem_map(a, a + 1) for a in addrs):
            return super().move_pages(addrs, nodes, flags)
        # mm/migrate.c do_pages_move(): a page already on its target node reports that node;
        # a guest_memfd page elsewhere fails migrate_pages() (kvm_gmem_migrate_folio()), its
        # status is left as the caller passed it (0) and it stays where it is.
        where = super().move_pages(addrs)
        out: list[int] = []
        for a, node, now in zip(addrs, nodes, where, strict=True):
            if not self._in_gmem_map(a, a + 1):
                out.append(super().move_pages([a], [node], flags)[0])
            else:
                out.append(node if now == node else 0)
        return out

    def _rw_refused(self, fd: int, positioned: bool) -> None:
        """KVM files have no read/write methods (EINVAL); a guest_memfd is also not
        FMODE_PREAD/PWRITE, so pread/pwrite fail earlier with ESPIPE."""
        obj = self._lookup(fd)
        if obj is None:
            return
        err = errno.EINVAL
        if isinstance(obj, EmuGmem):
            err = self.profile.gmem_prw_errno if positioned else self.profile.gmem_rw_errno
        raise OSError(err, "KVM fds cannot be read or written")

    def read(self, fd: int, count: int) -> bytes:
        self._rw_refused(fd, False)
        return os.read(fd, count)

    def write(self, fd: int, data: bytes) -> int:
        self._rw_refused(fd, False)
        return os.write(fd, data)

    def pread(self, fd: int, count: int, offset: int) -> bytes:
        self._rw_refused(fd, True)
        return os.pread(fd, count, offset)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        self._rw_refused(fd, True)
        return os.pwrite(fd, data, offset)

    def close(self, fd: int) -> None:
        obj = self._lookup(fd)
        os.close(fd)
        self._fd_cache.pop(fd, None)
        if obj is None or self._other_fd_open(obj):
            # The kernel releases a file when its last reference goes (fput()).
            return
        with self._lock:
            key = self._keys.pop(id(obj), None)
            if key is not None:
                self._objs.pop(key, None)
            self._tags.pop(id(obj), None)
            # list() copies the items at once (other threads' lookups fill the cache unlocked).
            for cfd, (_, o) in list(self._fd_cache.items()):
                if o is obj:
                    self._fd_cache.pop(cfd, None)
        if isinstance(obj, EmuGmem):
            obj.release()
        elif isinstance(obj, EmuVcpuFd):
            # The kernel keeps the vCPU until the VM dies; it can no longer be reached.
            with obj.vm.lock:
                if obj.vcpu in obj.vm.vcpus:
                    obj.vm.vcpus.remove(obj.vcpu)
            obj.vcpu.close()
            libc_munmap(obj.run_addr, VCPU_MMAP_SIZE)

    def _other_fd_open(self, obj: _Obj) -> bool:
        """Whether another fd of this process still refers to ``obj``'s file (a dup). Fds in
        flight in an SCM_RIGHTS message are not seen (docs/emulator.md)."""
        key = self._keys.get(id(obj))
        if key is None:
            return False
        try:
            names = os.listdir("/proc/self/fd")
        except OSError as e:
            if e.errno is None:
                raise
            return False
        for name in names:
            try:
                st = os.fstat(int(name))
            except OSError as e:
                if e.errno is None:
                    raise
                continue
            except ValueError:
                continue
            if (st.st_dev, st.st_ino) == key:
                return True
        return False

    def kick(self, vcpu_fd: int, thread_ident: int) -> None:
        obj = self._lookup(vcpu_fd)
        if not isinstance(obj, EmuVcpuFd):
            raise OSError(errno.EBADF, f"fd {vcpu_fd} is not an emulated vCPU")
        obj.vcpu.kick()

    def modelled_errno(self, behaviour: str) -> int | None:
        # The profile is the record of what each kernel answers (kvmpy.testing.errnos.Behaviour).
        return {"gmem_bind_overlap": self.profile.gmem_overlap_errno}.get(behaviour)

    def describe(self) -> str:
        try:
            from importlib.metadata import version

            uc = f"vCPUs on unicorn {version('unicorn')}"
        except Exception:
            uc = "no unicorn"
        return f"emulated KVM (profile {self.profile.name}: {self.profile.description}; {uc})"


# --- which ioctls the emulated KVM models, per fd (dispatch.py decodes the arguments) ------------
B = EmuBackend
SYSTEM_IOCTLS: Table = check_table({
    R.KVM_GET_API_VERSION:     Entry(int, B._api_version),
    R.KVM_CHECK_EXTENSION:     Entry(int, lambda be, sysobj, cap: sysobj.profile.cap(cap)),
    R.KVM_GET_VCPU_MMAP_SIZE:  Entry(int, B._vcpu_mmap_size),
    R.KVM_CREATE_VM:           Entry(int, B._create_vm),
    R.KVM_GET_SUPPORTED_CPUID: Entry(Ptr, B._supported_cpuid),
})
VM_IOCTLS: Table = check_table({
    R.KVM_CHECK_EXTENSION:         Entry(int, lambda be, vm, cap: vm.check_extension(cap)),
    R.KVM_SET_USER_MEMORY_REGION:  Entry(kvm_userspace_memory_region, B._set_region),
    R.KVM_SET_USER_MEMORY_REGION2: Entry(kvm_userspace_memory_region2, B._set_region2),
    R.KVM_SET_MEMORY_ATTRIBUTES:   Entry(kvm_memory_attributes, lambda be, vm, a:
                                         vm.set_memory_attributes(a.address, a.size,
                                                                  a.attributes, a.flags),
                                         built_in=lambda vm: vm.profile.memory_attributes_ioctl),
    R.KVM_CREATE_GUEST_MEMFD:      Entry(kvm_create_guest_memfd, B._create_gmem,
                                         built_in=lambda vm: bool(vm.profile.cap(
                                             CAP_GUEST_MEMFD))),
    R.KVM_ENABLE_CAP:              Entry(kvm_enable_cap, lambda be, vm, ec:
                                         vm.enable_cap(ec.cap, ec.flags, list(ec.args))),
    R.KVM_CREATE_VCPU:             Entry(int, B._create_vcpu),
    R.KVM_CREATE_IRQCHIP:          Entry(int, lambda be, vm, _: vm.create_irqchip()),
    R.KVM_SET_NR_MMU_PAGES:        Entry(int, lambda be, vm, n: vm.set_nr_mmu_pages(n)),
    R.KVM_SET_TSS_ADDR:            Entry(int, lambda be, vm, a: vm.set_tss_addr(a)),
})
# Answered before the vCPU's own table (vcpu.py VCPU_IOCTLS), without its ioctl lock.
VCPU_FD_IOCTLS: Table = check_table({
    R.KVM_PRE_FAULT_MEMORY: Entry(kvm_pre_fault_memory, B._pre_fault, copy_back_on_error=True),
})
# A guest_memfd has no ioctls at all (ENOTTY, in EmuBackend.ioctl).
del B


_STAT_EXTRA = ("st_atime", "st_mtime", "st_ctime", "st_atime_ns", "st_mtime_ns", "st_ctime_ns",
               "st_blksize", "st_blocks", "st_rdev")


def _page_up(n: int) -> int:
    return (n + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


__all__ = ["EmuBackend", "EmuVcpuFd"]
