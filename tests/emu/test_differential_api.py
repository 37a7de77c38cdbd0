"""Differential probes: the same ioctl sequences and guest_memfd file operations on real KVM
(HostBackend) and on the emulated KVM with the profile that mirrors it (EmuBackend(profile=probe_profile())).

Every probe returns a transcript (step name, return value or errno, bytes read back); the two
transcripts must be equal. Runs wherever /dev/kvm opens; skips (naming it) where it does not.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable
from typing import Any

import pytest

from kvmpy import Kvm
from kvmpy.backend import MAP_PRIVATE, MAP_SHARED, PROT_READ, Backend
from kvmpy.backend.host import HostBackend
from kvmpy.backend.select import kvm_available
from kvmpy.caps import probe_profile
from kvmpy.memory import SharedMemory
from kvmpy.testing.sigbus import touch
from kvmpy.uapi import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    Cap,
    GuestMemfdFlag,
    Ioctl,
    MemFlag,
    MemoryAttribute,
    kvm_pre_fault_memory,
    make_cpuid2,
)

_ok, _why = kvm_available()
pytestmark = pytest.mark.skipif(
    not _ok, reason=f"differential probes need real KVM, and /dev/kvm does not open ({_why})",
)

Transcript = list[tuple[Any, ...]]
GIB4 = 1 << 32
MB = 1 << 20


class Rec:
    """Collects (step, outcome) pairs; an outcome is a value or "E<name>"."""

    def __init__(self) -> None:
        self.t: Transcript = []

    def call(self, step: str, fn: Callable[[], Any]) -> Any:
        try:
            v = fn()
        except OSError as e:
            self.t.append((step, errno.errorcode.get(e.errno or 0, str(e.errno))))
            return None
        self.t.append((step, v if isinstance(v, (int, bytes, str, tuple)) or v is None
                       else "ok"))
        return v

    def err(self, step: str, code: int) -> None:
        self.t.append((step, errno.errorcode.get(code, str(code)) if code else 0))

    def note(self, step: str, value: Any) -> None:
        self.t.append((step, value))


def _backends() -> tuple[Backend, Backend]:
    from kvmpy.backend.emu import EmuBackend

    return HostBackend(), EmuBackend(profile=probe_profile())


def differential(probe: Callable[[Kvm, Rec], None]) -> tuple[Transcript, Transcript]:
    out = []
    for b in _backends():
        rec = Rec()
        with Kvm(b) as kvm:
            probe(kvm, rec)
        out.append(rec.t)
    return out[0], out[1]


# --- probes ---------------------------------------------------------------------------------


def probe_caps_and_vm_types(kvm: Kvm, r: Rec) -> None:
    from kvmpy.backend.emu.profiles import MODELLED_CAPS

    for cap in sorted(MODELLED_CAPS):
        r.note(f"sys cap {Cap(cap).name}", kvm.check_extension(cap))
    for t in range(8):
        r.err(f"create_vm type {t}", kvm.try_create_vm(t))
    for t in kvm.vm_types():
        with kvm.create_vm(t) as vm:
            for cap in sorted(MODELLED_CAPS):
                r.note(f"vm{t} cap {Cap(cap).name}", vm.check_extension(cap))


def probe_system_ioctls(kvm: Kvm, r: Rec) -> None:
    b = kvm.backend
    r.call("api version", lambda: b.ioctl(kvm.fd, Ioctl.KVM_GET_API_VERSION))
    r.call("api version arg 1", lambda: b.ioctl(kvm.fd, Ioctl.KVM_GET_API_VERSION, 1))
    r.call("mmap size", lambda: b.ioctl(kvm.fd, Ioctl.KVM_GET_VCPU_MMAP_SIZE))
    r.call("mmap size arg 1", lambda: b.ioctl(kvm.fd, Ioctl.KVM_GET_VCPU_MMAP_SIZE, 1))
    for nent in (0, 1):
        buf = make_cpuid2(max(nent, 1))
        buf.nent = nent
        r.call(f"supported cpuid nent {nent}",
               lambda buf=buf: b.ioctl(kvm.fd, Ioctl.KVM_GET_SUPPORTED_CPUID, buf))
    # A non-KVM ioctl type on KVM fds, and KVM ioctls on foreign and closed fds.
    r.call("TCGETS on /dev/kvm", lambda: b.ioctl(kvm.fd, 0x5401, 0))
    fd = os.memfd_create("probe")
    try:
        r.call("KVM ioctl on memfd", lambda: b.ioctl(fd, Ioctl.KVM_CHECK_EXTENSION, 3))
    finally:
        os.close(fd)
    with kvm.create_vm() as vm:
        r.call("TCGETS on vm", lambda: b.ioctl(vm.fd, 0x5401, 0))
        r.call("mmap vm fd", lambda: b.mmap(vm.fd, 4096, PROT_READ, MAP_SHARED))
        r.call("read vm fd", lambda: b.read(vm.fd, 8))
        r.call("fallocate vm fd", lambda: b.fallocate(vm.fd, FALLOC_FL_KEEP_SIZE, 0, 4096))
        vmfd = vm.fd
    r.call("ioctl on closed vm fd", lambda: b.ioctl(vmfd, Ioctl.KVM_CHECK_EXTENSION, 3))
    r.call("read /dev/kvm", lambda: b.read(kvm.fd, 8))
    r.call("mmap /dev/kvm", lambda: b.mmap(kvm.fd, 4096, PROT_READ, MAP_SHARED))


def probe_vm_misc(kvm: Kvm, r: Rec) -> None:
    b = kvm.backend
    with kvm.create_vm() as vm:
        r.call("irqchip", lambda: b.ioctl(vm.fd, Ioctl.KVM_CREATE_IRQCHIP))
        r.call("irqchip again", lambda: b.ioctl(vm.fd, Ioctl.KVM_CREATE_IRQCHIP))
        for n in (0, 63, 64, 1000):
            r.call(f"nr_mmu_pages {n}", lambda n=n: b.ioctl(vm.fd, Ioctl.KVM_SET_NR_MMU_PAGES, n))
        for a in (0xFFFBD000, 0xFFFFD000, 0xFFFFF000):
            r.call(f"tss {a:#x}", lambda a=a: b.ioctl(vm.fd, Ioctl.KVM_SET_TSS_ADDR, a))
        # KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL): only bits of the cap's mask (api.rst 7.37).
        for cap, flags, arg in ((Cap.EXIT_HYPERCALL, 0, 1 << 12), (Cap.EXIT_HYPERCALL, 0, 0),
                                (Cap.EXIT_HYPERCALL, 0, 1 << 11),
                                (Cap.EXIT_HYPERCALL, 0, (1 << 12) | 1),
                                (Cap.EXIT_HYPERCALL, 1, 1 << 12),
                                (Cap.MEMORY_ATTRIBUTES, 0, 0), (Cap.GUEST_MEMFD, 0, 0)):
            r.err(f"enable_cap {Cap(cap).name} flags {flags} {arg:#x}",
                  vm.try_enable_cap(cap, arg, flags=flags))
        r.call("enable_cap bad pointer", lambda: b.ioctl(vm.fd, Ioctl.KVM_ENABLE_CAP, 8))


def probe_memslots_v1(kvm: Kvm, r: Rec) -> None:
    with kvm.create_vm() as vm, SharedMemory(kvm.backend, 4 * MB) as mem:
        h = mem.addr
        cases = [
            ("create", 0, 0, GIB4, 2 * MB, h),
            ("same again (no change)", 0, 0, GIB4, 2 * MB, h),
            ("overlap other slot", 1, 0, GIB4 + MB, 2 * MB, h),
            ("adjacent", 1, 0, GIB4 + 2 * MB, MB, h),
            ("gpa unaligned", 2, 0, GIB4 + 0x1001, 4096, h),
            ("size unaligned", 2, 0, 0x10000000, 4095, h),
            ("hva unaligned", 2, 0, 0x10000000, 4096, h + 1),
            ("hva kernel", 2, 0, 0x10000000, 4096, 0xFFFF_8000_0000_0000),
            ("hva top", 2, 0, 0x10000000, 8192, (1 << 47) - 4096),
            ("slot 32763", 32763, 0, 0x20000000, 4096, h),
            ("slot 32764", 32764, 0, 0x30000000, 4096, h),
            ("as_id 1", 1 << 16 | 3, 0, 0x40000000, 4096, h),
            ("gpa wraps", 4, 0, (1 << 64) - 4096, 8192, h),
            ("gpa above max", 4, 0, 1 << 60, 4096, h),
            ("gpa at 2^52-4k", 4, 0, (1 << 52) - 4096, 4096, h),
            ("delete 4", 4, 0, 0, 0, 0),
            ("delete missing", 5, 0, 0, 0, 0),
            ("move 1", 1, 0, GIB4 + 8 * MB, MB, h),
            ("move 1 onto 0", 1, 0, GIB4, MB, h),
            ("dirty log on 0", 0, MemFlag.LOG_DIRTY_PAGES, GIB4, 2 * MB, h),
            ("readonly toggle 0", 0, MemFlag.READONLY, GIB4, 2 * MB, h),
            ("resize 0", 0, 0, GIB4, MB, h),
            ("change hva 0", 0, 0, GIB4, 2 * MB, h + 4096),
            ("readonly new", 6, MemFlag.READONLY, 0x50000000, 4096, h),
            ("v1 guest_memfd flag", 7, MemFlag.GUEST_MEMFD, 0x60000000, 4096, h),
            ("size 0 delete 0", 0, 0, GIB4, 0, h),
        ]
        for name, slot, flags, gpa, size, hva in cases:
            r.err(name, vm.try_set_user_memory_region(slot, flags, gpa, size, hva))
        for bit in range(32):
            r.err(f"v1 flag bit {bit}",
                  vm.try_set_user_memory_region(9, 1 << bit, 0x70000000, 4096, h))
            vm.try_set_user_memory_region(9, 0, 0, 0, 0)


def probe_memslots_v2_gmem(kvm: Kvm, r: Rec) -> None:
    b = kvm.backend
    with kvm.create_vm() as vm, kvm.create_vm() as other, \
            SharedMemory(b, 4 * MB) as mem:
        if not (vm.check_extension(Cap.USER_MEMORY2) and vm.check_extension(Cap.GUEST_MEMFD)):
            r.note("no USER_MEMORY2/GUEST_MEMFD", True)
            return
        h = mem.addr
        g = vm.create_guest_memfd(4 * MB)
        og = other.create_guest_memfd(4 * MB)
        memfd = os.memfd_create("probe")
        G = MemFlag.GUEST_MEMFD
        try:
            cases: list[tuple[str, int, int, int, int, int, Any, int]] = [
                ("bind", 0, G, GIB4, MB, h, g, 0),
                ("overlap file range", 1, G, GIB4 + 2 * MB, MB, h, g, MB // 2),
                ("overlap file range tail", 1, G, GIB4 + 2 * MB, MB, h, g, 0),
                ("bind next range", 1, G, GIB4 + 2 * MB, MB, h, g, MB),
                ("offset unaligned", 2, G, GIB4 + 4 * MB, MB, h, g, 2 * MB + 1),
                ("offset past end", 2, G, GIB4 + 4 * MB, MB, h, g, 4 * MB),
                ("range past end", 2, G, GIB4 + 4 * MB, 2 * MB, h, g, 3 * MB),
                ("offset wraps", 2, G, GIB4 + 4 * MB, MB, h, g, (1 << 64) - 4096),
                ("offset negative", 2, G, GIB4 + 4 * MB, MB, h, g, 1 << 63),
                ("other VM's gmem", 2, G, GIB4 + 4 * MB, MB, h, og, 0),
                ("memfd as gmem", 2, G, GIB4 + 4 * MB, MB, h, memfd, 0),
                ("vm fd as gmem", 2, G, GIB4 + 4 * MB, MB, h, vm.fd, 0),
                ("kvm fd as gmem", 2, G, GIB4 + 4 * MB, MB, h, kvm.fd, 0),
                ("closed fd as gmem", 2, G, GIB4 + 4 * MB, MB, h, 999, 0),
                ("fd -1 as gmem", 2, G, GIB4 + 4 * MB, MB, h, -1, 0),
                ("gmem + dirty log", 2, G | MemFlag.LOG_DIRTY_PAGES, GIB4 + 4 * MB, MB, h, g,
                 2 * MB),
                ("gmem + readonly", 2, G | MemFlag.READONLY, GIB4 + 4 * MB, MB, h, g, 2 * MB),
                ("hva 0 gmem", 2, G, GIB4 + 4 * MB, MB, 0, g, 2 * MB),
                ("gpa overlap beats bind", 3, G, GIB4, MB, h, og, 0),
                ("move gmem slot", 0, G, GIB4 + 16 * MB, MB, h, g, 0),
                ("same gmem slot again", 0, G, GIB4, MB, h, g, 0),
                ("drop gmem flag", 0, 0, GIB4, MB, h, g, 0),
                ("dirty log on gmem slot", 0, G | MemFlag.LOG_DIRTY_PAGES, GIB4, MB, h, g, 0),
                ("delete gmem slot", 0, 0, GIB4, 0, h, 0, 0),
                ("rebind freed range", 0, G, GIB4, MB, h, g, 0),
                ("plain v2 slot", 5, 0, GIB4 + 32 * MB, MB, h, 0, 0),
            ]
            for name, slot, flags, gpa, size, hva, gm, off in cases:
                r.err(name, vm.try_set_user_memory_region2(slot, flags, gpa, size, hva, gm, off))
            for bit in range(32):
                r.err(f"v2 flag bit {bit}",
                      vm.try_set_user_memory_region2(9, 1 << bit, 0x70000000, 4096, h, g,
                                                     3 * MB))
                vm.try_set_user_memory_region2(9, 0, 0, 0, 0)
            # Closing the gmem leaves the slots installed (they cannot be re-bound though).
            g.close()
            r.err("delete slot after gmem close", vm.try_set_user_memory_region2(1, 0, 0, 0, 0))
        finally:
            os.close(memfd)


def probe_gmem_create(kvm: Kvm, r: Rec) -> None:
    for t in kvm.vm_types():
        with kvm.create_vm(t) as vm:
            if not vm.check_extension(Cap.GUEST_MEMFD):
                r.note(f"vm{t} no GUEST_MEMFD", True)
                continue
            for size in (0, 1, 4095, 4096, 4097, 1 << 40, (1 << 63) - 4096, 1 << 63,
                         (1 << 64) - 4096):
                r.err(f"vm{t} size {size:#x}", vm.try_create_guest_memfd(size))
            for bit in range(64):
                r.err(f"vm{t} flag bit {bit}", vm.try_create_guest_memfd(4096, 1 << bit))
            r.err(f"vm{t} flags 3", vm.try_create_guest_memfd(4096, 3))


def probe_gmem_file_ops(kvm: Kvm, r: Rec) -> None:
    b = kvm.backend
    with kvm.create_vm() as vm:
        if not vm.check_extension(Cap.GUEST_MEMFD):
            r.note("no GUEST_MEMFD", True)
            return
        g = vm.create_guest_memfd(16 * 4096)
        st = g.fstat()
        r.note("fstat", (st.st_size, st.st_blksize))
        r.err("read", g.try_read())
        r.err("write", g.try_write())
        r.err("pread", g.try_pread())
        r.err("pwrite", g.try_pwrite())
        r.call("ioctl on gmem", lambda: b.ioctl(g.fd, Ioctl.KVM_CHECK_EXTENSION, 3))
        r.call("mmap without MMAP", lambda: b.mmap(g.fd, 4096, PROT_READ, MAP_SHARED))
        K, P = FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
        cases = [
            ("mode 0", 0, 0, 4096), ("keep", K, 0, 4096), ("punch alone", P, 0, 4096),
            ("keep|punch", K | P, 0, 4096), ("zero range", 0x10, 0, 4096),
            ("keep|zero", K | 0x10, 0, 4096), ("collapse", 0x08, 0, 4096),
            ("insert", 0x20, 0, 4096), ("unshare|keep", 0x40 | K, 0, 4096),
            ("bogus bit", K | 0x100, 0, 4096),
            ("offset unaligned", K, 1, 4096), ("len unaligned", K, 0, 4095),
            ("len 0", K, 0, 0), ("len negative", K, 0, -4096), ("offset negative", K, -4096, 4096),
            ("alloc to end", K, 15 * 4096, 4096), ("alloc past end", K, 15 * 4096, 8192),
            ("alloc at end", K, 16 * 4096, 4096), ("alloc far", K, 1 << 40, 4096),
            ("punch past end", K | P, 16 * 4096, 4096), ("punch across end", K | P, 15 * 4096, 8192),
            ("punch far", K | P, 1 << 40, 4096), ("punch unaligned", K | P, 4096, 4095),
            ("huge len", K, 4096, (1 << 63) - 4096), ("overflowing", K | P, 1 << 62, 1 << 62),
        ]
        for name, mode, off, length in cases:
            r.err(f"fallocate {name}", g.try_fallocate(off, length, mode))
        r.note("fstat after", g.fstat().st_size)


def _raw(fn: Callable[[], Any]) -> Any:
    try:
        v = fn()
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))
    return v if isinstance(v, (int, bytes)) else "ok"


def probe_gmem_copies(kvm: Kvm, r: Rec) -> None:
    """Raw syscalls on the guest_memfd fd (they never reach a backend: the file answers) and a
    dup()'d fd used through the backend (the same file: kvm_gmem_bind() checks f_op)."""
    b = kvm.backend
    vm_type = 1 if 1 in kvm.vm_types() else 0
    with kvm.create_vm(vm_type) as vm, SharedMemory(b, MB) as mem:
        if not (vm.check_extension(Cap.USER_MEMORY2) and vm.check_extension(Cap.GUEST_MEMFD)):
            r.note("no USER_MEMORY2/GUEST_MEMFD", True)
            return
        g = vm.create_guest_memfd(MB)
        fd = g.fd
        r.note("raw ftruncate 0", _raw(lambda: os.ftruncate(fd, 0)))
        r.note("raw ftruncate same", _raw(lambda: os.ftruncate(fd, MB)))
        r.note("raw read", _raw(lambda: os.read(fd, 8)))
        r.note("raw write", _raw(lambda: os.write(fd, b"x")))
        r.note("raw pread", _raw(lambda: os.pread(fd, 8, 0)))
        r.note("raw pwrite", _raw(lambda: os.pwrite(fd, b"x", 0)))
        r.note("raw lseek", _raw(lambda: os.lseek(fd, 0, os.SEEK_SET)))
        r.note("reopen /proc/self/fd", _raw(lambda: os.close(os.open(f"/proc/self/fd/{fd}",
                                                                     os.O_RDWR))))
        st = os.fstat(fd)
        r.note("raw fstat", (st.st_size, st.st_mode, st.st_blksize))
        d = os.dup(fd)
        try:
            r.err("bind dup", vm.try_set_user_memory_region2(0, MemFlag.GUEST_MEMFD, GIB4, MB,
                                                             mem.addr, d, 0))
            r.call("read dup", lambda: b.read(d, 8))
            r.call("pwrite dup", lambda: b.pwrite(d, b"x", 0))
            r.call("mmap dup without MMAP", lambda: b.mmap(d, 4096, PROT_READ, MAP_SHARED))
            r.call("fallocate dup mode 0", lambda: b.fallocate(d, 0, 0, 4096))
            r.call("fallocate dup keep", lambda: b.fallocate(d, FALLOC_FL_KEEP_SIZE, 0, 4096))
            g.close()
            r.call("fallocate dup after original closed",
                   lambda: b.fallocate(d, FALLOC_FL_KEEP_SIZE, 4096, 4096))
            r.err("delete slot", vm.try_set_user_memory_region2(0, 0, 0, 0, 0))
            r.err("rebind dup after original closed",
                  vm.try_set_user_memory_region2(0, MemFlag.GUEST_MEMFD, GIB4, MB, mem.addr,
                                                 d, 0))
        finally:
            b.close(d)


def probe_gmem_mmap(kvm: Kvm, r: Rec) -> None:
    b = kvm.backend
    with kvm.create_vm() as vm:
        both = int(GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED)
        if vm.check_extension(Cap.GUEST_MEMFD_FLAGS) & both != both:
            r.note("no MMAP|INIT_SHARED", True)
            return
        g = vm.create_guest_memfd(4 * 4096, both)
        for name, fl in (("MAP_PRIVATE", MAP_PRIVATE), ("MAP_SHARED_VALIDATE", 0x03)):
            r.call(name, lambda fl=fl: b.munmap(b.mmap(g.fd, 4096, PROT_READ, fl), 4096))
        m = g.mmap()
        m.fill(0, 4 * 4096, 0x5A)
        r.note("read back", m.read(4090, 12))
        g.punch_hole(4096, 4096)
        r.note("after punch", m.read(4090, 12) + m.read(8192, 4))
        r.err("fallocate again", g.try_fallocate(4096, 4096))
        r.note("after realloc", m.read(4096, 8))
        m.write(0, b"hello")
        m2 = g.mmap(4096, 0)
        r.note("second mapping sees", m2.read(0, 5))
        r.call("MADV_COLLAPSE", lambda: b.madvise(m.addr, 4 * 4096, 25))
        r.call("MADV_DONTNEED", lambda: b.madvise(m.addr, 4096, 4))
        r.note("after DONTNEED", m.read(0, 5))
        r.call("mmap at offset past size",
               lambda: b.munmap(b.mmap(g.fd, 4096, PROT_READ, MAP_SHARED, 8 * 4096), 4096))


def _child_touch(addr: int, write: bool) -> int:
    """The signal that killed a forked child touching one byte at ``addr`` (0: none)."""
    return touch(addr, 1, write=write).signal or 0


def probe_gmem_sigbus(kvm: Kvm, r: Rec) -> None:
    with kvm.create_vm() as vm:
        valid = vm.check_extension(Cap.GUEST_MEMFD_FLAGS)
        if not valid & GuestMemfdFlag.MMAP:
            r.note("no MMAP", True)
            return
        g = vm.create_guest_memfd(2 * 4096, GuestMemfdFlag.MMAP)
        m = g.mmap(4 * 4096)
        r.note("private page read", _child_touch(m.addr, False))
        r.note("private page write", _child_touch(m.addr + 4096, True))
        r.note("past EOF", _child_touch(m.addr + 3 * 4096, False))
        if valid & GuestMemfdFlag.INIT_SHARED:
            g2 = vm.create_guest_memfd(2 * 4096, GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED)
            m2 = g2.mmap(4 * 4096)
            r.note("shared page", _child_touch(m2.addr, True))
            r.note("shared past EOF", _child_touch(m2.addr + 2 * 4096, True))
    r.note("SIGBUS is", int(signal.SIGBUS))


def probe_gmem_outlives_vm(kvm: Kvm, r: Rec) -> None:
    vm = kvm.create_vm()
    if not vm.check_extension(Cap.GUEST_MEMFD):
        vm.close()
        r.note("no GUEST_MEMFD", True)
        return
    g = vm.disown(vm.create_guest_memfd(4 * 4096))
    vm.close()
    try:
        r.err("fallocate after vm close", g.try_fallocate(0, 4096))
        r.err("punch after vm close", g.try_punch_hole(0, 4096))
        r.note("fstat", g.fstat().st_size)
    finally:
        g.close()


def probe_memory_attributes(kvm: Kvm, r: Rec) -> None:
    b = kvm.backend
    for t in kvm.vm_types():
        with kvm.create_vm(t) as vm:
            P = int(MemoryAttribute.PRIVATE)
            cases = [
                ("private", GIB4, 8192, P, 0), ("shared", GIB4, 4096, 0, 0),
                ("size 0", GIB4, 0, P, 0), ("unaligned addr", GIB4 + 1, 4096, P, 0),
                ("unaligned size", GIB4, 4095, P, 0), ("wrap", (1 << 64) - 4096, 8192, P, 0),
                ("flags", GIB4, 4096, P, 1), ("bit 0", GIB4, 4096, 1, 0),
                ("bit 4", GIB4, 4096, 1 << 4, 0), ("bit 63", GIB4, 4096, 1 << 63, 0),
                ("end of space", (1 << 64) - 4096, 4096, P, 0),
            ]
            for name, a, s, attrs, fl in cases:
                r.err(f"vm{t} {name}", vm.try_set_memory_attributes(a, s, attrs, fl))
            r.call(f"vm{t} bad pointer",
                   lambda vm=vm: b.ioctl(vm.fd, Ioctl.KVM_SET_MEMORY_ATTRIBUTES, 16))


def probe_pre_fault(kvm: Kvm, r: Rec) -> None:
    b = kvm.backend
    with kvm.create_vm() as vm, SharedMemory(b, 2 * MB) as mem:
        vm.set_user_memory_region(0, 0, GIB4, 2 * MB, mem.addr)
        vcpu = vm.create_vcpu()
        cases = [
            ("in slot", GIB4, 8192, 0), ("size 0", GIB4, 0, 0), ("flags", GIB4, 4096, 1),
            ("unaligned", GIB4 + 1, 4096, 0), ("wrap", (1 << 64) - 4096, 8192, 0),
            ("no slot", 0, 4096, 0), ("runs past slot", GIB4 + 2 * MB - 4096, 8192, 0),
        ]
        for name, gpa, size, flags in cases:
            pf = kvm_pre_fault_memory(gpa=gpa, size=size, flags=flags)
            e = vcpu.try_pre_fault_memory(pf)
            r.note(name, (errno.errorcode[e] if e else 0, pf.gpa, pf.size))


def _random_ops(seed: int) -> Callable[[Kvm, Rec], None]:
    """A seeded random sequence of memslot (v1/v2, guest_memfd) and guest_memfd file operations:
    the emulator must agree with KVM on every errno, whatever state earlier steps left."""

    def probe(kvm: Kvm, r: Rec) -> None:
        import random

        rng = random.Random(seed)
        b = kvm.backend
        with kvm.create_vm() as vm, kvm.create_vm() as other, SharedMemory(b, 4 * MB) as mem:
            gmem_ok = vm.check_extension(Cap.GUEST_MEMFD)
            gs = [vm.create_guest_memfd(2 * MB), vm.create_guest_memfd(MB)] if gmem_ok else []
            og = other.create_guest_memfd(MB) if gmem_ok else None
            memfd = os.memfd_create("probe")
            fds: list[Any] = [*gs, og, memfd, 1000]
            flags_choice = [0, 0, MemFlag.LOG_DIRTY_PAGES, MemFlag.READONLY, MemFlag.GUEST_MEMFD,
                            MemFlag.GUEST_MEMFD, MemFlag.GUEST_MEMFD | MemFlag.READONLY, 8]
            sizes = [0, 4096, 8192, 64 * 1024, 64 * 1024, MB, 4097]
            try:
                for i in range(250):
                    op = rng.random()
                    if op < 0.75:
                        slot = rng.randrange(6)
                        flags = rng.choice(flags_choice)
                        gpa = GIB4 + rng.randrange(48) * 64 * 1024 + (1 if rng.random() < 0.1 else 0)
                        size = rng.choice(sizes)
                        hva = mem.addr + rng.randrange(32) * 64 * 1024
                        gm = rng.choice(fds) if rng.random() < 0.3 else rng.choice(gs or fds)
                        off = rng.randrange(40) * 64 * 1024
                        if rng.random() < 0.2:
                            r.err(f"{i} v1 {slot} {flags:#x} {gpa:#x} {size:#x}",
                                  vm.try_set_user_memory_region(slot, flags, gpa, size, hva))
                        else:
                            r.err(f"{i} v2 {slot} {flags:#x} {gpa:#x} {size:#x} {off:#x}",
                                  vm.try_set_user_memory_region2(slot, flags, gpa, size, hva,
                                                                 gm, off))
                    elif gs:
                        g = rng.choice(gs)
                        mode = rng.choice([FALLOC_FL_KEEP_SIZE,
                                           FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 0])
                        off = rng.randrange(40) * 64 * 1024 + rng.choice([0, 0, 1])
                        length = rng.choice([4096, 64 * 1024, MB, 0])
                        r.err(f"{i} fallocate {mode} {off:#x} {length:#x}",
                              g.try_fallocate(off, length, mode))
            finally:
                os.close(memfd)

    probe.__name__ = f"probe_random_{seed}"
    return probe


PROBES = [probe_caps_and_vm_types, probe_system_ioctls, probe_vm_misc, probe_memslots_v1,
          probe_memslots_v2_gmem, probe_gmem_create, probe_gmem_file_ops, probe_gmem_copies,
          probe_gmem_mmap,
          probe_gmem_sigbus, probe_gmem_outlives_vm, probe_memory_attributes,
          *(_random_ops(seed) for seed in range(6))]


@pytest.mark.parametrize("probe", PROBES, ids=[p.__name__[6:] for p in PROBES])
def test_differential(probe: Callable[[Kvm, Rec], None]) -> None:
    real, emu = differential(probe)
    assert len(real) > 3 or probe is probe_gmem_outlives_vm, "probe recorded nothing"
    assert emu == real


def probe_unknown_ioctls(kvm: Kvm, r: Rec) -> None:
    """Ioctl numbers no KVM defines, and a foreign type, on each kind of KVM fd (issue 11
    item 13): kvm_arch_dev_ioctl() / kvm_arch_vm_ioctl() / kvm_vcpu_ioctl() defaults."""
    b = kvm.backend
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        for req in (0xAEFF, 0xC008AEFF, 0xAE10, 0x5401):
            for name, fd in (("sys", kvm.fd), ("vm", vm.fd), ("vcpu", vcpu.fd)):
                r.call(f"{name} ioctl {req:#x}", lambda fd=fd, req=req: b.ioctl(fd, req, 0))


def test_differential_unknown_ioctls() -> None:
    real, emu = differential(probe_unknown_ioctls)
    assert len(real) == 12 and emu == real


def test_differential_pre_fault() -> None:
    """KVM_PRE_FAULT_MEMORY is a vCPU ioctl (emulated vCPUs are a hard dependency: no skip)."""
    real, emu = differential(probe_pre_fault)
    assert emu == real


def _raw_divergences(kvm: Kvm) -> dict[str, Any]:
    """Raw syscalls on a guest_memfd fd that userspace cannot make the emulated file answer as
    guest_memfd does (docs/emulator.md, "guest_memfd files")."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]

    def fallocate(fd: int) -> None:
        if libc.fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 4096):
            raise OSError(ctypes.get_errno(), "fallocate")

    def mmap_raw(fd: int) -> None:
        import mmap

        mmap.mmap(fd, 4096).close()

    with kvm.create_vm(0) as vm:
        g = vm.create_guest_memfd(4 * 4096)
        return {"fallocate KEEP_SIZE": _raw(lambda: fallocate(g.fd)),
                "mmap without MMAP flag": _raw(lambda: mmap_raw(g.fd)),
                "fchmod": _raw(lambda: os.fchmod(g.fd, 0o600))}


def test_raw_gmem_syscall_divergences_pinned() -> None:
    """Pinned real-vs-emulated differences of *raw* syscalls on a guest_memfd fd. The handle is
    a memfd_secret file (gmem.py): it has no fallocate (EOPNOTSUPP; real: kvm_gmem_fallocate
    allocates), its mmap maps a placeholder (real: ENODEV without GUEST_MEMFD_FLAG_MMAP) and
    secretmem's setattr lets a mode change through (real: kvm_gmem_setattr() -EINVAL). The
    same calls through the backend are answered as guest_memfd does (probe_gmem_file_ops)."""
    from kvmpy.backend.emu import EmuBackend
    from kvmpy.backend.emu.gmem import _memfd_secret

    fd = _memfd_secret()
    if fd < 0:
        pytest.skip("memfd_secret(2) is not available: the emulated guest_memfd uses the "
                    "sealed-memfd handle, whose raw answers differ more (docs/emulator.md)")
    os.close(fd)
    with Kvm(HostBackend()) as kvm:
        real = _raw_divergences(kvm)
    with Kvm(EmuBackend(profile=probe_profile())) as kvm:
        emu = _raw_divergences(kvm)
    assert real == {"fallocate KEEP_SIZE": "ok", "mmap without MMAP flag": "ENODEV",
                    "fchmod": "EINVAL"}
    assert emu == {"fallocate KEEP_SIZE": errno.errorcode[errno.EOPNOTSUPP],
                   "mmap without MMAP flag": "ok",
                   "fchmod": "ok"}


def test_transcripts_can_differ() -> None:
    """The comparison has teeth: the upstream profile disagrees with this host somewhere."""
    from kvmpy.backend.emu import EmuBackend

    outs = []
    for b in (HostBackend(), EmuBackend(profile="upstream")):
        rec = Rec()
        with Kvm(b) as kvm:
            probe_caps_and_vm_types(kvm, rec)
            probe_memslots_v2_gmem(kvm, rec)
        outs.append(rec.t)
    assert outs[0] != outs[1]
