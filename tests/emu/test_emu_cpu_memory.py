"""Guest-physical memory of the emulated vCPU: KVM's MMU resolution (memslot, then the gfn's
private/shared attribute), KVM_EXIT_MEMORY_FAULT, invalidation on conversions, punch-holes and
memslot changes (api.rst 4.140 KVM_SET_MEMORY_ATTRIBUTES, 5. KVM_EXIT_MEMORY_FAULT)."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
import threading
import time

import pytest

from kvmpy.backend.emu import EmuBackend
from kvmpy.backend.emu.x86.fakevm import FakeGmem, FakeVm, Memfd
from kvmpy.memory import SharedMemory, anonymous
from kvmpy.system import Kvm
from kvmpy.uapi import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    ExitReason,
    MemFlag,
    MemoryExitFlag,
    VmType,
    kvm_regs,
)
from kvmpy.vcpu import Exit

pytestmark = pytest.mark.guest

GPA = 1 << 32          # test memory at 4 GiB, as the selftests do
PAGE = 4096


def loop_src(n_sync: int = 4) -> str:
    """A guest that, per round i: writes i+0x100 to [GPA], reads [GPA] into r12, OUTs port 1."""
    return f"""
    mov rbx, {GPA}
    xor r13, r13
1:  lea rax, [r13 + 0x100]
    mov [rbx], rax
    mov r12, [rbx]
    mov dx, 1
    out dx, al
    inc r13
    cmp r13, {n_sync}
    jne 1b
    hlt
"""


def _gmem(size: int) -> FakeGmem:
    fd = os.memfd_create("gmem", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return FakeGmem(fd, size)


def test_private_page_served_from_gmem_then_shared_backing_after_conversion(guests):
    """A private gfn in a guest_memfd slot is the guest_memfd page; converting it to shared
    makes the guest see the shared backing (and its own earlier write stays in the gmem)."""
    vm = FakeVm()
    g = guests(loop_src(), vm=vm)
    shared = Memfd(PAGE, "shared")
    gm = _gmem(PAGE)
    shared.write(0, struct.pack("<Q", 0xAAAA))
    vm.set_slot(1, GPA, PAGE, shared.addr, gmem=gm)
    vm.set_private(GPA, PAGE, True)
    assert g.h.run() == 0 and g.h.exit_reason == ExitReason.IO
    assert os.pread(gm.fd, 8, 0) == struct.pack("<Q", 0x100)
    assert shared.read(0, 8) == struct.pack("<Q", 0xAAAA)
    vm.set_private(GPA, PAGE, False)
    assert g.h.run() == 0 and g.h.exit_reason == ExitReason.IO
    assert shared.read(0, 8) == struct.pack("<Q", 0x101)
    assert os.pread(gm.fd, 8, 0) == struct.pack("<Q", 0x100)
    vm.set_private(GPA, PAGE, True)
    assert g.h.run() == 0 and g.h.get_regs().r12 == 0x102
    assert os.pread(gm.fd, 8, 0) == struct.pack("<Q", 0x102)
    shared.close()
    os.close(gm.fd)


def test_punch_hole_is_seen_by_the_guest(guests):
    """After a punch-hole of a private page (and the zap KVM does for it) the guest reads
    zeroes from it."""
    from kvmpy.backend.libc import libc_fallocate

    vm = FakeVm()
    g = guests(f"mov rbx, {GPA}\n1: mov r12, [rbx]\nmov dx, 1\nout dx, al\njmp 1b", vm=vm)
    gm = _gmem(PAGE)
    os.pwrite(gm.fd, struct.pack("<Q", 0xF00D), 0)
    vm.set_slot(1, GPA, PAGE, 0, gmem=gm)
    vm.set_private(GPA, PAGE, True)
    assert g.h.run() == 0 and g.h.get_regs().r12 == 0xF00D
    libc_fallocate(gm.fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 0, PAGE)
    vm.invalidate(GPA, GPA + PAGE)
    assert g.h.run() == 0 and g.h.get_regs().r12 == 0
    os.close(gm.fd)


def test_private_access_without_gmem_is_memory_fault(guests):
    """A private gfn in a slot without guest_memfd: KVM_RUN fails with EFAULT and
    KVM_EXIT_MEMORY_FAULT, flags PRIVATE, the page-aligned gpa and size 4096."""
    vm = FakeVm()
    g = guests(loop_src(), vm=vm)
    shared = Memfd(4 * PAGE, "shared")
    vm.set_slot(1, GPA, 4 * PAGE, shared.addr)
    vm.set_private(GPA, PAGE, True)
    assert g.h.run() == errno.EFAULT
    assert g.h.exit_reason == ExitReason.MEMORY_FAULT
    mf = g.h.run_struct.exit.memory_fault
    assert (mf.flags, mf.gpa, mf.size) == (MemoryExitFlag.PRIVATE, GPA, PAGE)
    assert g.h.get_regs().rip != 0x10000     # stopped at the faulting store, not restarted
    vm.set_private(GPA, PAGE, False)          # userspace converts; the access then works
    assert g.h.run() == 0 and g.h.exit_reason == ExitReason.IO
    assert shared.read(0, 8) == struct.pack("<Q", 0x100)
    shared.close()


def test_private_gfn_without_memslot_is_private_memory_fault(guests):
    """kvm_handle_noslot_fault(): a private fault with no memslot exits with
    KVM_EXIT_MEMORY_FAULT (PRIVATE) instead of emulated MMIO; a shared one is MMIO."""
    vm = FakeVm()
    g = guests(loop_src(), vm=vm)
    vm.set_private(GPA, PAGE, True)
    assert g.h.run() == errno.EFAULT and g.h.exit_reason == ExitReason.MEMORY_FAULT
    mf = g.h.run_struct.exit.memory_fault
    assert (mf.flags, mf.gpa, mf.size) == (MemoryExitFlag.PRIVATE, GPA, PAGE)
    vm.set_private(GPA, PAGE, False)
    assert g.h.run() == 0 and g.h.exit_reason == ExitReason.MMIO


def test_page_tables_in_another_memslot(guests):
    """Page-table pages may live in any memslot: unicorn's own walker does not fault slots
    in, so the emulator must map them before the guest sees a (wrong) #PF."""
    from kvmpy.backend.emu.x86.fakevm import PDPT

    vm = FakeVm()
    g = guests(f"mov rbx, {GPA}\nmov r12, [rbx]\nhlt", vm=vm)
    pt = Memfd(PAGE, "pt")               # the PD for [4 GiB, 5 GiB) at gpa 0x800000
    pt.write(0, b"".join(struct.pack("<Q", (GPA + (i << 21)) | 0x83) for i in range(512)))
    g.low.write(PDPT + 8 * 4, struct.pack("<Q", 0x800000 | 3))
    vm.set_slot(2, 0x800000, PAGE, pt.addr)
    data = Memfd(PAGE, "data")
    data.write(0, struct.pack("<Q", 0xCAFE))
    vm.set_slot(1, GPA, PAGE, data.addr)
    assert g.h.run() == 0 and g.h.exit_reason == ExitReason.HLT
    assert g.h.get_regs().r12 == 0xCAFE
    pt.close()
    data.close()


def test_deleted_slot_becomes_mmio_and_readded_slot_is_seen(guests):
    vm = FakeVm()
    g = guests(loop_src(), vm=vm)
    a = Memfd(PAGE, "a")
    vm.set_slot(1, GPA, PAGE, a.addr)
    assert g.h.run() == 0 and g.h.exit_reason == ExitReason.IO
    vm.set_slot(1, 0, 0, 0)
    assert g.h.run() == 0 and g.h.exit_reason == ExitReason.MMIO
    assert g.h.run_struct.exit.mmio.phys_addr == GPA and g.h.run_struct.exit.mmio.is_write
    b = Memfd(PAGE, "b")
    vm.set_slot(2, GPA, PAGE, b.addr)
    assert g.h.run() == 0 and g.h.exit_reason == ExitReason.IO   # the write was retired
    assert g.h.run() == 0 and g.h.exit_reason == ExitReason.IO
    assert b.read(0, 8) == struct.pack("<Q", 0x102)
    assert a.read(0, 8) == struct.pack("<Q", 0x100)
    a.close()
    b.close()


def test_anonymous_shared_backing_is_mapped_directly(guests):
    """Private anonymous host memory cannot be aliased by fd: the slot is mapped directly and
    host writes are still seen by the guest without copies."""
    vm = FakeVm()
    g = guests(f"mov rbx, {GPA}\nmov r12, [rbx]\nmov qword ptr [rbx+8], 0x77\nhlt", vm=vm)
    m = mmap.mmap(-1, 2 * PAGE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    m[0:8] = struct.pack("<Q", 0x1234)
    vm.set_slot(1, GPA, 2 * PAGE, addr)
    assert g.h.run() == 0 and g.h.exit_reason == ExitReason.HLT
    assert g.h.get_regs().r12 == 0x1234
    assert m[8:16] == struct.pack("<Q", 0x77)
    vm.set_slot(1, 0, 0, 0)
    g.h.vcpu.phys.apply_pending()


def test_anonymous_backing_unmapped_behind_kvm_is_memory_fault_not_a_crash(guests):
    """The host frees a directly mapped anonymous backing without deleting the slot: KVM
    (through its MMU notifier) can no longer fault the pages in, so the next access is
    KVM_EXIT_MEMORY_FAULT; the emulator must not touch the vanished pages."""
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    vm = FakeVm()
    g = guests(f"mov rbx, {GPA}\n1: mov r12, [rbx]\nmov dx, 1\nout dx, al\njmp 1b", vm=vm)
    addr = libc.mmap(None, 2 * PAGE, 3, 0x22, -1, 0)       # MAP_PRIVATE | MAP_ANONYMOUS
    ctypes.memmove(addr, struct.pack("<Q", 0x77), 8)
    vm.set_slot(1, GPA, 2 * PAGE, addr)
    assert g.h.run() == 0 and g.h.get_regs().r12 == 0x77
    assert libc.munmap(addr, 2 * PAGE) == 0
    assert g.h.run() == errno.EFAULT
    mf = g.h.run_struct.exit.memory_fault
    assert (g.h.exit_reason, mf.flags, mf.gpa) == (ExitReason.MEMORY_FAULT, 0, GPA)


def test_unbacked_hva_is_memory_fault_without_private_flag(guests):
    """A shared gfn whose userspace_addr is not mapped: KVM cannot fault the page in and
    KVM_RUN fails with EFAULT (memory fault exit, flags 0)."""
    vm = FakeVm()
    g = guests(loop_src(), vm=vm)
    m = mmap.mmap(-1, PAGE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    hole = addr + 64 * PAGE * 1024   # far away, assumed unmapped: checked below
    with open("/proc/self/maps") as f:
        spans = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in f]
    if any(lo < hole + PAGE and hole < hi for lo, hi in spans):
        pytest.skip("no unmapped host range found at the probe address")
    vm.set_slot(1, GPA, PAGE, hole)
    assert g.h.run() == errno.EFAULT
    mf = g.h.run_struct.exit.memory_fault
    assert (mf.flags, mf.gpa, mf.size) == (0, GPA, PAGE)


@pytest.mark.parametrize("prot", [0, 1], ids=["none", "read-only"])
def test_inaccessible_host_mapping_is_memory_fault_not_a_crash(guests, prot):
    """A slot over a PROT_NONE or read-only host mapping: KVM cannot fault the page in for the
    access; the emulator exits with EFAULT (memory fault, flags 0) instead of touching it."""
    import ctypes.util

    vm = FakeVm()
    g = guests(f"mov rbx, {GPA}\nmov r12, [rbx]\nmov [rbx], r12\nhlt", vm=vm)
    m = mmap.mmap(-1, PAGE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert libc.mprotect(addr, PAGE, prot) == 0
    vm.set_slot(1, GPA, PAGE, addr)
    assert g.h.run() == errno.EFAULT
    mf = g.h.run_struct.exit.memory_fault
    assert (g.h.exit_reason, mf.flags, mf.gpa) == (ExitReason.MEMORY_FAULT, 0, GPA)
    vm.set_slot(1, 0, 0, 0)
    g.h.vcpu.phys.apply_pending()
    assert libc.mprotect(addr, PAGE, 3) == 0


def test_readonly_slot_write_is_mmio(guests):
    """Writes to a KVM_MEM_READONLY slot exit as MMIO writes (api.rst 4.35); reads work."""
    vm = FakeVm()
    g = guests(f"mov rbx, {GPA}\nmov r12, [rbx]\nmov dword ptr [rbx], 0x55\nhlt", vm=vm)
    ro = Memfd(PAGE, "ro")
    ro.write(0, struct.pack("<Q", 0x4242))
    vm.set_slot(1, GPA, PAGE, ro.addr, flags=MemFlag.READONLY)
    assert g.h.run() == 0 and g.h.exit_reason == ExitReason.MMIO
    m = g.h.run_struct.exit.mmio
    assert (m.phys_addr, m.len, m.is_write) == (GPA, 4, 1)
    assert g.h.get_regs().r12 == 0x4242
    assert ro.read(0, 4) == struct.pack("<I", 0x4242)
    assert g.h.run() == 0 and g.h.exit_reason == ExitReason.HLT
    ro.close()


# --- through the real emulated backend (the acceptance scenario) ---------------------
def _emu_vcpu_guest(kvm: Kvm, vm, src: str):
    """Low memory + long mode for a hand-assembled guest on an EmuBackend VM."""
    from kvmpy.backend.emu.x86.fakevm import (
        CODE,
        LOW_SIZE,
        STACK_TOP,
        asm,
        build_low_memory,
        long_mode_sregs,
    )

    low = SharedMemory(kvm.backend, LOW_SIZE)
    vm.set_user_memory_region2(0, 0, 0, LOW_SIZE, low.addr)

    class _View:
        def write(self, off: int, data: bytes) -> None:
            low.mapping.write(off, data)

    build_low_memory(_View(), asm(src, CODE))  # type: ignore[arg-type]
    vcpu = vm.create_vcpu(0)
    vcpu.set_cpuid2(kvm.get_supported_cpuid())
    vcpu.set_sregs(long_mode_sregs())
    r = kvm_regs()
    r.rip, r.rsp, r.rflags = CODE, STACK_TOP, 2
    vcpu.set_regs(r)
    return low, vcpu


def test_emu_backend_private_write_convert_host_sees_shared_data():
    """On the emulator: the guest writes a private (guest_memfd) page, the page is converted
    to shared (KVM_SET_MEMORY_ATTRIBUTES + punch-hole) and the host sees the shared backing's
    data, not the private data; the guest then reads the shared data."""
    kvm = Kvm(EmuBackend())
    vm = kvm.create_vm(VmType.SW_PROTECTED)
    src = f"""
    mov rbx, {GPA}
    mov qword ptr [rbx], 0x5ec7e7
    mov dx, 1
    out dx, al
    mov r12, [rbx]
    hlt
"""
    low, vcpu = _emu_vcpu_guest(kvm, vm, src)
    shared = SharedMemory(kvm.backend, PAGE)
    shared.mapping.write(0, struct.pack("<Q", 0x5AAED))
    gmem = vm.create_guest_memfd(PAGE)
    vm.set_user_memory_region2(1, MemFlag.GUEST_MEMFD, GPA, PAGE, shared.addr, gmem, 0)
    vm.set_private(GPA, PAGE)
    ex = vcpu.run()
    assert ex.reason == ExitReason.IO
    assert shared.mapping.read(0, 8) == struct.pack("<Q", 0x5AAED)
    vm.set_shared(GPA, PAGE)
    gmem.fallocate(0, PAGE, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE)
    assert shared.mapping.read(0, 8) == struct.pack("<Q", 0x5AAED)
    ex = vcpu.run()
    assert ex.reason == ExitReason.HLT
    assert vcpu.get_regs().r12 == 0x5AAED
    vm.close()
    shared.close()
    low.close()
    kvm.close()


def test_emu_backend_private_access_without_gmem_memory_fault():
    kvm = Kvm(EmuBackend())
    vm = kvm.create_vm(VmType.SW_PROTECTED)
    low, vcpu = _emu_vcpu_guest(kvm, vm, f"mov rbx, {GPA + 3 * PAGE + 8}\nmov r12, [rbx]\nhlt")
    mem = anonymous(kvm.backend, 8 * PAGE)
    vm.set_user_memory_region2(1, 0, GPA, 8 * PAGE, mem.addr)
    vm.set_private(GPA, 8 * PAGE)
    ex = vcpu.run()
    assert ex.reason == ExitReason.MEMORY_FAULT and ex.errno == errno.EFAULT
    assert ex.memory_fault is not None
    assert (ex.memory_fault.flags, ex.memory_fault.gpa, ex.memory_fault.size) == \
        (MemoryExitFlag.PRIVATE, GPA + 3 * PAGE, PAGE)
    vm.close()
    mem.close()
    low.close()
    kvm.close()


def _unmap_during_run() -> str:
    """In a child: a vCPU thread spins reading an anonymous-backed slot; the main thread closes
    the backing through kvmpy while the guest runs. Returns what the runs ended with."""
    kvm = Kvm(EmuBackend())
    vm = kvm.create_vm(VmType.DEFAULT)
    _low, vcpu = _emu_vcpu_guest(kvm, vm, f"mov rbx, {GPA}\n1: mov r12, [rbx]\njmp 1b")
    mem = anonymous(kvm.backend, 4 * PAGE)
    mem.write(0, struct.pack("<Q", 0x77))
    vm.set_user_memory_region2(1, 0, GPA, 4 * PAGE, mem.addr)
    exits: list[object] = []
    t = threading.Thread(target=lambda: exits.append(vcpu.run()), daemon=True)
    t.start()
    time.sleep(0.2)              # the guest is spinning on the slot by now
    mem.close()                  # EmuBackend.munmap: the emulated MMU notifier
    t.join(10.0)
    assert not t.is_alive(), "KVM_RUN did not end after the backing was unmapped"
    ex = exits[0]
    assert isinstance(ex, Exit), ex
    if ex.errno != errno.EFAULT:
        ex = vcpu.run()       # KVM may finish the slice first; the next run faults
    return f"{int(ex.reason)} {int(ex.errno)}"


def test_anonymous_backing_closed_while_vcpu_runs_in_another_thread_is_efault():
    """issue 11 item 4: munmap of a directly mapped (anonymous) backing while a vCPU runs on it
    in another thread. KVM's MMU notifier zaps the range; the next fault finds no VMA and KVM_RUN
    fails with EFAULT (arch/x86/kvm/mmu/mmu.c kvm_handle_error_pfn: KVM_PFN_ERR_FAULT). The
    emulator must take the range out of unicorn before the pages go, or the process dies."""
    from kvmpy.testing.child import run_in_child

    out = run_in_child(_unmap_during_run, timeout=60.0)
    assert out.ok, out.describe()
    assert out.text.split() == [str(int(ExitReason.MEMORY_FAULT)), str(errno.EFAULT)], out.text
