"""The object layer against a backend: lifetimes, fd hygiene, checked calls and errnos."""

import errno
import os

import pytest

from kvmpy import GuestMemfd, Kvm, KvmError
from kvmpy.testing.require import require_cap
from kvmpy.uapi import Cap, GuestMemfdFlag, Ioctl, MemFlag, VmType


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_api_version(kvm: Kvm) -> None:
    assert kvm.get_api_version() == 12


def test_vcpu_mmap_size_holds_kvm_run(kvm: Kvm) -> None:
    size = kvm.get_vcpu_mmap_size()
    assert size >= 4096 and size % 4096 == 0


def test_supported_cpuid_has_long_mode(kvm: Kvm) -> None:
    entries = {(e.function, e.index): e for e in kvm.get_supported_cpuid()}
    ext = entries.get((0x80000001, 0))
    assert ext is not None, "no CPUID leaf 0x80000001"
    assert ext.edx & (1 << 29), "CPUID.80000001H:EDX.LM clear"


def test_vm_vcpu_create_close_no_fd_growth(kvm: Kvm) -> None:
    """1000 VM create/close cycles (every 10th with a vCPU and a guest_memfd) leak no fd."""
    gmem_ok = kvm.check_extension(Cap.GUEST_MEMFD)
    before = open_fds()
    for i in range(1000):
        with kvm.create_vm() as vm:
            if i % 10 == 0:
                vm.create_vcpu()
                if gmem_ok:
                    vm.create_guest_memfd(4096)
    assert open_fds() == before


def test_close_closes_children_first(kvm: Kvm) -> None:
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu()
    require_cap(vm, Cap.GUEST_MEMFD)
    g = vm.create_guest_memfd(8192)
    kvm.close()
    assert vcpu.fd == -1 and g.closed and vm.closed and kvm.fd == -1


def test_disowned_gmem_outlives_vm(kvm: Kvm) -> None:
    vm = kvm.create_vm()
    require_cap(vm, Cap.GUEST_MEMFD)
    g = vm.disown(vm.create_guest_memfd(4 * 4096))
    vm.close()
    try:
        assert not g.closed
        g.fallocate(0, 4096)
        g.punch_hole(0, 4096)
    finally:
        g.close()


def test_checked_call_names_ioctl_and_errno(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        with pytest.raises(KvmError) as ei:
            # Unaligned GPA: EINVAL (api.rst 4.35, "guest_phys_addr ... must be page aligned").
            vm.set_user_memory_region(0, 0, 0x1001, 4096, 0)
        assert ei.value.errno == errno.EINVAL
        assert ei.value.call == "KVM_SET_USER_MEMORY_REGION"
        assert "KVM_SET_USER_MEMORY_REGION failed: EINVAL" in str(ei.value)
        assert "guest_phys_addr=0x1001" in str(ei.value)


def test_try_twin_returns_errno(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        assert vm.try_set_user_memory_region(0, 0, 0x1001, 4096, 0) == errno.EINVAL
        assert vm.memslots == {}


def test_bad_vm_type_is_einval(kvm: Kvm) -> None:
    bad = max(VmType) + 10
    assert kvm.try_create_vm(bad) == errno.EINVAL
    with pytest.raises(KvmError, match="KVM_CREATE_VM failed: EINVAL"):
        kvm.create_vm(bad)


def test_closed_fd_is_ebadf_not_crash(kvm: Kvm) -> None:
    vm = kvm.create_vm()
    fd = vm.fd
    vm.close()
    with pytest.raises(OSError) as ei:
        kvm.backend.ioctl(fd, Ioctl.KVM_CHECK_EXTENSION, int(Cap.USER_MEMORY))
    assert ei.value.errno == errno.EBADF


def test_memslot_record(kvm: Kvm) -> None:
    from kvmpy.memory import anonymous

    with kvm.create_vm() as vm, anonymous(kvm.backend, 2 << 20) as mem:
        vm.set_user_memory_region(3, 0, 1 << 32, 2 << 20, mem.addr)
        assert vm.memslots[3].guest_phys_addr == 1 << 32
        assert vm.memslots[3].end == (1 << 32) + (2 << 20)
        vm.set_user_memory_region(3, 0, 1 << 32, 0, mem.addr)
        assert 3 not in vm.memslots


def test_guest_memfd_basics(kvm: Kvm) -> None:
    """Creation, sizes, flags and file semantics (api.rst 4.141; virt/kvm/guest_memfd.c)."""
    with kvm.create_vm() as vm:
        require_cap(vm, Cap.GUEST_MEMFD)
        g: GuestMemfd = vm.create_guest_memfd(4 * 4096)
        st = g.fstat()
        assert st.st_size == 4 * 4096 and st.st_blksize == 4096
        for size in (0, 1, 4095, 4097):
            assert vm.try_create_guest_memfd(size) == errno.EINVAL, f"size {size}"
        assert g.try_read() and g.try_write() and g.try_pread() and g.try_pwrite()
        assert g.try_fallocate(0, 4 * 4096) == 0
        assert g.try_punch_hole(4096, 4095) == errno.EINVAL
        valid = vm.check_extension(Cap.GUEST_MEMFD_FLAGS)
        for bit in range(64):
            want = 0 if valid & (1 << bit) else errno.EINVAL
            assert vm.try_create_guest_memfd(4096, 1 << bit) == want, f"flag bit {bit}"


def test_guest_memfd_mmap_roundtrip(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        flags = GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED
        require_cap(vm, Cap.GUEST_MEMFD_FLAGS, int(flags))
        g = vm.create_guest_memfd(2 * 4096, flags)
        m = g.mmap()
        m.fill(0, 2 * 4096, 0xAA)
        assert m.read(4096, 4) == b"\xaa" * 4
        g.punch_hole(0, 4096)
        assert m.read(0, 4096) == bytes(4096)
        assert m.read(4096, 4096) == b"\xaa" * 4096


def test_region2_binds_guest_memfd(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        require_cap(vm, Cap.USER_MEMORY2)
        require_cap(vm, Cap.GUEST_MEMFD)
        flags = vm.check_extension(Cap.GUEST_MEMFD_FLAGS) & (GuestMemfdFlag.MMAP |
                                                             GuestMemfdFlag.INIT_SHARED)
        g = vm.create_guest_memfd(2 << 20, flags)
        from kvmpy.memory import anonymous

        with anonymous(kvm.backend, 2 << 20) as mem:
            vm.set_user_memory_region2(10, MemFlag.GUEST_MEMFD, 1 << 32, 2 << 20, mem.addr, g, 0)
            assert vm.memslots[10].guest_memfd is g
            vm.delete_memslot(10)
            assert 10 not in vm.memslots
