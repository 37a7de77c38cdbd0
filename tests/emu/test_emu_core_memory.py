"""The emulated KVM's memory model on the "upstream" profile: memslots, guest_memfd binding,
memory attributes, invalidation, guest_memfd files (SIGBUS in a child), pre-fault."""

from __future__ import annotations

import ctypes
import errno
import gc
import os
import signal
import weakref
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpy import Kvm
from kvmpy.backend.emu import EmuBackend, EmuVm
from kvmpy.backend.emu.attributes import AttributeMap
from kvmpy.memory import SharedMemory
from kvmpy.testing.sigbus import touch
from kvmpy.uapi import (
    Cap,
    ExitReason,
    GuestMemfdFlag,
    MemFlag,
    MemoryAttribute,
    MemoryExitFlag,
    VmType,
    kvm_run,
)
from kvmpy.vm import Vm

GIB4 = 1 << 32
MB = 1 << 20
G = MemFlag.GUEST_MEMFD
P = int(MemoryAttribute.PRIVATE)


class SpyVcpu:
    """Stands in for an EmuVcpu to record invalidations (the contract's vcpu.invalidate)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.hva_calls: list[tuple[int, int, bool]] = []

    def invalidate(self, lo: int, hi: int) -> None:
        self.calls.append((lo, hi))

    def invalidate_hva(self, lo: int, hi: int, wait: bool = True) -> None:
        self.hva_calls.append((lo, hi, wait))

    def ioctl(self, request: int, arg: int) -> int:
        raise OSError(errno.ENOTTY, "spy")

    def kick(self) -> None: ...

    def close(self) -> None: ...


@pytest.fixture
def ekvm() -> Iterator[Kvm]:
    with Kvm(EmuBackend()) as k:
        yield k


def emu_of(vm: Vm) -> EmuVm:
    obj = vm.backend.object_of(vm.fd)  # type: ignore[attr-defined]
    assert isinstance(obj, EmuVm)
    return obj


def spy(vm: Vm) -> SpyVcpu:
    s = SpyVcpu()
    emu_of(vm).vcpus.append(s)
    return s


# --- memslots ----------------------------------------------------------------------------------


def test_memslot_lookup_and_invalidation(ekvm: Kvm) -> None:
    """Every add/delete/move/flags change invalidates the GPA ranges KVM would zap."""
    with ekvm.create_vm() as vm, SharedMemory(ekvm.backend, 4 * MB) as mem:
        emu, sp = emu_of(vm), spy(vm)
        vm.set_user_memory_region(0, 0, GIB4, 2 * MB, mem.addr)
        vm.set_user_memory_region(1, 0, GIB4 + 2 * MB, MB, mem.addr)
        s0 = emu.find_memslot(GIB4 + 4096)
        assert s0 is not None and (s0.slot, s0.gpa, s0.size) == (0, GIB4, 2 * MB)
        assert emu.find_memslot(GIB4 + 2 * MB).slot == 1          # type: ignore[union-attr]
        assert emu.find_memslot(GIB4 + 3 * MB) is None
        assert emu.find_memslot(GIB4 - 1) is None
        assert sp.calls == [(GIB4, GIB4 + 2 * MB), (GIB4 + 2 * MB, GIB4 + 3 * MB)]
        sp.calls.clear()
        v0 = emu.memory_version
        vm.set_user_memory_region(1, 0, GIB4 + 8 * MB, MB, mem.addr)           # move
        assert sp.calls == [(GIB4 + 2 * MB, GIB4 + 3 * MB), (GIB4 + 8 * MB, GIB4 + 9 * MB)]
        assert emu.find_memslot(GIB4 + 2 * MB) is None
        sp.calls.clear()
        vm.set_user_memory_region(0, MemFlag.LOG_DIRTY_PAGES, GIB4, 2 * MB, mem.addr)
        assert sp.calls == [(GIB4, GIB4 + 2 * MB)]
        sp.calls.clear()
        vm.set_user_memory_region(0, MemFlag.LOG_DIRTY_PAGES, GIB4, 2 * MB, mem.addr)
        assert sp.calls == []                                     # no change, no zap
        vm.set_user_memory_region(0, 0, GIB4, 0, 0)                # delete
        assert sp.calls == [(GIB4, GIB4 + 2 * MB)] and emu.find_memslot(GIB4) is None
        assert emu.memory_version > v0


def test_backend_munmap_is_the_mmu_notifier(ekvm: Kvm) -> None:
    """EmuBackend.munmap over a memslot's userspace_addr: every vCPU drops the range before
    the pages go (waiting), the range counts as gone meanwhile, then a non-waiting rebuild
    (kvm_mmu_notifier_invalidate_range_start/_end); an unrelated munmap zaps nothing."""
    from kvmpy.memory import anonymous

    with ekvm.create_vm() as vm:
        emu, sp = emu_of(vm), spy(vm)
        seen: list[list[tuple[int, int]]] = []
        sp.invalidate_hva = lambda lo, hi, wait=True: (  # type: ignore[method-assign]
            sp.hva_calls.append((lo, hi, wait)), seen.append(list(emu.hva_unmapping)))
        mem, other = anonymous(ekvm.backend, 2 * MB), anonymous(ekvm.backend, MB)
        vm.set_user_memory_region(0, 0, GIB4, MB, mem.addr + MB)
        other.close()
        assert sp.hva_calls == []
        lo, hi = mem.addr, mem.addr + 2 * MB
        mem.close()
        assert sp.hva_calls == [(lo, hi, True), (lo, hi, False)]
        assert seen == [[(lo, hi)], []] and emu.hva_unmapping == []


def test_memslot_validation_errnos(ekvm: Kvm) -> None:
    """api.rst 4.35: alignment, overlap (EEXIST), delete of a missing slot, immutable fields."""
    with ekvm.create_vm() as vm, SharedMemory(ekvm.backend, 2 * MB) as mem:
        h = mem.addr
        assert vm.try_set_user_memory_region(0, 0, GIB4, MB, h) == 0
        assert vm.try_set_user_memory_region(1, 0, GIB4 + 4096, 4096, h) == errno.EEXIST
        assert vm.try_set_user_memory_region(1, 0, GIB4 + 1, 4096, h) == errno.EINVAL
        assert vm.try_set_user_memory_region(1, 0, 0, 4095, h) == errno.EINVAL
        assert vm.try_set_user_memory_region(1, 0, 0, 4096, h + 8) == errno.EINVAL
        assert vm.try_set_user_memory_region(2, 0, 0, 0, 0) == errno.EINVAL
        assert vm.try_set_user_memory_region(0, MemFlag.READONLY, GIB4, MB, h) == errno.EINVAL
        assert vm.try_set_user_memory_region(0, 0, GIB4, 2 * MB, h) == errno.EINVAL
        assert vm.try_set_user_memory_region(32764, 0, 0, 4096, h) == errno.EINVAL
        assert vm.try_set_user_memory_region(2 << 16, 0, 0, 4096, h) == errno.EINVAL
        assert vm.try_set_user_memory_region(3, 0, 1 << 40, 4096, h) == errno.EINVAL
        assert vm.try_set_user_memory_region(3, 0, (1 << 40) - 4096, 4096, h) == 0
        assert vm.try_set_user_memory_region(4, G, 0, 4096, h) == errno.EINVAL    # v1


def test_gmem_binding_rules(ekvm: Kvm) -> None:
    """kvm_gmem_bind(): foreign fd EINVAL, closed fd EBADF, other VM EINVAL, range checks,
    overlapping file ranges EEXIST on upstream; gmem slots are immutable."""
    with ekvm.create_vm(VmType.SW_PROTECTED) as vm, \
            ekvm.create_vm(VmType.SW_PROTECTED) as other:
        g = vm.create_guest_memfd(4 * MB)
        og = other.create_guest_memfd(MB)
        assert vm.try_set_user_memory_region2(0, G, GIB4, MB, 0, g, 0) == 0
        assert vm.try_set_user_memory_region2(1, G, 2 * GIB4, MB, 0, g, MB - 4096) \
            == errno.EEXIST
        assert vm.try_set_user_memory_region2(1, G, 2 * GIB4, MB, 0, og, 0) == errno.EINVAL
        assert vm.try_set_user_memory_region2(1, G, 2 * GIB4, MB, 0, vm.fd, 0) == errno.EINVAL
        assert vm.try_set_user_memory_region2(1, G, 2 * GIB4, MB, 0, 4000, 0) == errno.EBADF
        assert vm.try_set_user_memory_region2(1, G, 2 * GIB4, MB, 0, g, 4 * MB) == errno.EINVAL
        assert vm.try_set_user_memory_region2(1, G, 2 * GIB4, MB, 0, g, MB + 1) == errno.EINVAL
        assert vm.try_set_user_memory_region2(1, G | MemFlag.READONLY, 2 * GIB4, MB, 0, g,
                                              MB) == errno.EINVAL
        assert vm.try_set_user_memory_region2(0, G, 3 * GIB4, MB, 0, g, 0) == errno.EINVAL
        assert vm.try_set_user_memory_region2(1, G, 2 * GIB4, MB, 0, g, MB) == 0
        s = emu_of(vm).find_memslot(2 * GIB4 + 5)
        assert s is not None and s.gmem is not None and s.gmem_offset == MB
        assert s.gmem.fd == g.fd and s.gmem.vm is emu_of(vm)


def test_gmem_close_unbinds_slots(ekvm: Kvm) -> None:
    """kvm_gmem_release(): the slot stays but loses its file (private faults then EFAULT)."""
    with ekvm.create_vm(VmType.SW_PROTECTED) as vm:
        g = vm.create_guest_memfd(MB)
        vm.set_user_memory_region2(0, G, GIB4, MB, 0, g, 0)
        sp = spy(vm)
        g.close()
        s = emu_of(vm).find_memslot(GIB4)
        assert s is not None and s.gmem is None and s.flags & G
        assert sp.calls == [(GIB4, GIB4 + MB)]


# --- memory attributes -------------------------------------------------------------------------


def test_attributes_validation_and_map(ekvm: Kvm) -> None:
    """api.rst 4.140 KVM_SET_MEMORY_ATTRIBUTES: page alignment, non-zero size, no wrap, only
    PRIVATE, flags 0; unsupported on DEFAULT VMs except attributes 0."""
    with ekvm.create_vm(VmType.DEFAULT) as vm:
        assert vm.try_set_memory_attributes(GIB4, 4096, P) == errno.EINVAL
        assert vm.try_set_memory_attributes(GIB4, 4096, 0) == 0
    with ekvm.create_vm(VmType.SW_PROTECTED) as vm:
        emu, sp = emu_of(vm), spy(vm)
        for a, s, attrs, fl in ((GIB4, 0, P, 0), (GIB4 + 1, 4096, P, 0), (GIB4, 4097, P, 0),
                                ((1 << 64) - 4096, 8192, P, 0), ((1 << 64) - 4096, 4096, P, 0),
                                (GIB4, 4096, P, 1), (GIB4, 4096, 1 << 4, 0),
                                (GIB4, 4096, P | 1, 0)):
            assert vm.try_set_memory_attributes(a, s, attrs, fl) == errno.EINVAL, (a, s, attrs)
        assert sp.calls == []
        vm.set_private(GIB4, 4 * 4096)
        assert [emu.is_private(GIB4 + i * 4096) for i in range(-1, 5)] == \
            [False, True, True, True, True, False]
        assert sp.calls == [(GIB4, GIB4 + 4 * 4096)]
        vm.set_private(GIB4 + 4096, 4096)                       # already private: no zap
        assert len(sp.calls) == 1
        vm.set_shared(GIB4 + 4096, 4096)
        assert sp.calls[-1] == (GIB4 + 4096, GIB4 + 8192)
        assert emu.attributes.ranges() == [(GIB4 >> 12, (GIB4 >> 12) + 1),
                                           ((GIB4 >> 12) + 2, (GIB4 >> 12) + 4)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 64), st.integers(1, 16), st.booleans()), max_size=25))
def test_attribute_map_matches_a_set(ops: list[tuple[int, int, bool]]) -> None:
    m, model = AttributeMap(), set()
    for start, n, private in ops:
        expect_noop = all((g in model) == private for g in range(start, start + n))
        assert m.all_equal(start, start + n, private) == expect_noop
        m.set(start, start + n, private)
        for g in range(start, start + n):
            (model.add if private else model.discard)(g)
    assert {g for g in range(0, 100) if m.is_private(g)} == model
    rs = m.ranges()
    assert all(s < e for s, e in rs) and all(rs[i][1] < rs[i + 1][0] for i in range(len(rs) - 1))


# --- guest_memfd files -------------------------------------------------------------------------


def _child_touch(addr: int, write: bool) -> int:
    """The signal that killed a forked child touching one byte at ``addr`` (0: none)."""
    return touch(addr, 1, write=write).signal or 0


def test_gmem_mmap_sigbus_in_child(ekvm: Kvm) -> None:
    """kvm_gmem_fault_user_mapping(): memory that is not shared SIGBUSes; so does past EOF."""
    with ekvm.create_vm(VmType.SW_PROTECTED) as vm:
        g = vm.create_guest_memfd(2 * 4096, GuestMemfdFlag.MMAP)
        m = g.mmap(3 * 4096)
        assert _child_touch(m.addr, False) == signal.SIGBUS
        assert _child_touch(m.addr + 4096, True) == signal.SIGBUS
        assert _child_touch(m.addr + 2 * 4096, False) == signal.SIGBUS
    with ekvm.create_vm() as vm:
        g = vm.create_guest_memfd(2 * 4096, GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED)
        m = g.mmap(3 * 4096)
        assert _child_touch(m.addr, True) == 0
        assert _child_touch(m.addr + 2 * 4096, True) == signal.SIGBUS


def test_gmem_mmap_rules(ekvm: Kvm) -> None:
    from kvmpy.backend import MAP_PRIVATE, PROT_READ

    with ekvm.create_vm() as vm:
        g0 = vm.create_guest_memfd(4096)
        assert g0.try_mmap() == errno.ENODEV
        g = vm.create_guest_memfd(2 * MB, GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED)
        assert g.try_mmap(flags=MAP_PRIVATE) == errno.EINVAL
        m = g.mmap()
        with pytest.raises(OSError) as ei:
            ekvm.backend.madvise(m.addr + 4096, 4096, 25)          # MADV_COLLAPSE
        assert ei.value.errno == errno.EINVAL
        m.close()
        # Once unmapped the range is ordinary memory again for madvise.
        other = ekvm.backend.mmap(-1, 4096, PROT_READ, 0x22)
        ekvm.backend.madvise(other, 4096, 4)
        ekvm.backend.munmap(other, 4096)


def test_punch_hole_zeroes_and_invalidates(ekvm: Kvm) -> None:
    """The memfd's bytes are the private contents; a punch-hole zeroes them and zaps exactly the
    GPAs bound to the punched file range."""
    with ekvm.create_vm(VmType.SW_PROTECTED) as vm:
        g = vm.create_guest_memfd(8 * 4096)
        vm.set_user_memory_region2(0, G, GIB4, 4 * 4096, 0, g, 4 * 4096)
        backing = emu_of(vm).find_memslot(GIB4).gmem              # type: ignore[union-attr]
        assert backing is not None
        os.pwrite(backing.mem_fd, b"\xab" * (8 * 4096), 0)
        sp = spy(vm)
        g.punch_hole(3 * 4096, 3 * 4096)                          # file pages 3..5
        assert os.pread(backing.mem_fd, 8 * 4096, 0) == (b"\xab" * (3 * 4096) + bytes(3 * 4096)
                                                     + b"\xab" * (2 * 4096))
        assert sp.calls == [(GIB4, GIB4 + 2 * 4096)]              # file 4..5 -> gpa +0..+2
        sp.calls.clear()
        g.punch_hole(0, 2 * 4096)                                 # unbound: no zap
        assert sp.calls == []
        assert g.try_fallocate(7 * 4096, 2 * 4096) == errno.EINVAL   # allocation past EOF
        assert g.try_punch_hole(7 * 4096, 2 * 4096) == 0             # punch past EOF: fine


def test_gmem_keeps_vm_alive(ekvm: Kvm) -> None:
    """A guest_memfd holds a reference on its VM (__kvm_gmem_create())."""
    vm = ekvm.create_vm(VmType.SW_PROTECTED)
    ref = weakref.ref(emu_of(vm))
    g = vm.disown(vm.create_guest_memfd(4 * 4096))
    vm.close()
    gc.collect()
    assert ref() is not None
    g.fallocate(0, 4096)
    g.close()
    gc.collect()
    assert ref() is None


# --- KVM_PRE_FAULT_MEMORY (the VM-level logic; the ioctl needs a vCPU) ----------------------------


def test_pre_fault_logic(ekvm: Kvm) -> None:
    """api.rst 4.143: progress is reported in gpa/size; ENOENT without a memslot; a private gfn
    in a slot without guest_memfd is a memory fault; private pages are allocated."""
    with ekvm.create_vm(VmType.SW_PROTECTED) as vm, SharedMemory(ekvm.backend, MB) as mem:
        emu = emu_of(vm)
        vm.set_user_memory_region2(0, 0, GIB4, MB, mem.addr)
        g = vm.create_guest_memfd(MB)
        vm.set_user_memory_region2(1, G, 2 * GIB4, MB, mem.addr, g, 0)
        assert emu.pre_fault(GIB4, 8192, 1) == (errno.EINVAL, GIB4, 8192)
        assert emu.pre_fault(GIB4, 0, 0)[0] == errno.EINVAL
        assert emu.pre_fault(GIB4 + 1, 4096, 0)[0] == errno.EINVAL
        assert emu.pre_fault((1 << 64) - 4096, 8192, 0)[0] == errno.EINVAL
        assert emu.pre_fault(0, 4096, 0) == (errno.ENOENT, 0, 4096)
        assert emu.pre_fault(GIB4, 8192, 0) == (0, GIB4 + 8192, 0)
        # Runs off the end of the slot: success with the rest left over, then ENOENT.
        assert emu.pre_fault(GIB4 + MB - 4096, 3 * 4096, 0) == (0, GIB4 + MB, 2 * 4096)
        assert emu.pre_fault(GIB4 + MB, 2 * 4096, 0) == (errno.ENOENT, GIB4 + MB, 2 * 4096)
        vm.set_private(GIB4 + 4 * 4096, 4096)
        run = kvm_run()
        err, gpa, size = emu.pre_fault(GIB4 + 2 * 4096, 4 * 4096, 0, ctypes.addressof(run))
        assert (err, gpa, size) == (0, GIB4 + 4 * 4096, 2 * 4096)
        err, gpa, size = emu.pre_fault(gpa, size, 0, ctypes.addressof(run))
        assert (err, gpa, size) == (errno.EFAULT, GIB4 + 4 * 4096, 2 * 4096)
        assert run.exit_reason == ExitReason.MEMORY_FAULT
        mf = run.exit.memory_fault
        assert (mf.flags, mf.gpa, mf.size) == (MemoryExitFlag.PRIVATE, GIB4 + 4 * 4096, 4096)
        vm.set_private(2 * GIB4, MB)
        blocks = g.fstat().st_blocks
        assert emu.pre_fault(2 * GIB4 + 4096, 4 * 4096, 0) == (0, 2 * GIB4 + 5 * 4096, 0)
        assert g.fstat().st_blocks > blocks


def test_pre_fault_unsupported_profile() -> None:
    """A VM whose profile lacks PRE_FAULT_MEMORY: EOPNOTSUPP after the argument checks."""
    import dataclasses

    from kvmpy.backend.emu import get_profile

    up = get_profile("upstream")
    vm_caps = {t: {**c, Cap.PRE_FAULT_MEMORY: 0} for t, c in up.vm_caps.items()}
    p = dataclasses.replace(up, vm_caps=vm_caps)
    with Kvm(EmuBackend(p)) as kvm, kvm.create_vm() as vm:
        emu = emu_of(vm)
        assert emu.pre_fault(GIB4, 4096, 1)[0] == errno.EINVAL
        assert emu.pre_fault(GIB4, 4096, 0) == (errno.EOPNOTSUPP, GIB4, 4096)


def test_pre_fault_ioctl_through_vcpu(ekvm: Kvm) -> None:
    """The vCPU ioctl copies the leftover range back into the caller's struct."""
    from kvmpy.uapi import kvm_pre_fault_memory

    with ekvm.create_vm() as vm, SharedMemory(ekvm.backend, MB) as mem:
        vm.set_user_memory_region(0, 0, GIB4, MB, mem.addr)
        vcpu = vm.create_vcpu()
        r = kvm_pre_fault_memory(gpa=GIB4 + MB - 4096, size=3 * 4096)
        assert vcpu.try_pre_fault_memory(r) == 0
        assert (r.gpa, r.size) == (GIB4 + MB, 2 * 4096)
        assert vcpu.try_pre_fault_memory(r) == errno.ENOENT
        assert (r.gpa, r.size) == (GIB4 + MB, 2 * 4096)
