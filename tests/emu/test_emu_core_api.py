"""The emulated KVM's core on the "upstream" profile: profiles, capabilities, system and VM
ioctls, the fd table. (Differential checks against real KVM live in test_differential_api.py.)"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
from collections.abc import Iterator

import pytest

from kvmpy import Kvm
from kvmpy.backend.emu import EmuBackend, get_profile
from kvmpy.backend.emu.profiles import MODELLED_CAPS
from kvmpy.backend.select import make_backend
from kvmpy.errors import NotModelled
from kvmpy.uapi import Cap, GuestMemfdFlag, Ioctl, MemFlag, MemoryAttribute, VmType, make_cpuid2


@pytest.fixture
def ekvm() -> Iterator[Kvm]:
    with Kvm(EmuBackend()) as k:
        yield k


def test_upstream_caps_per_vm_type(ekvm: Kvm) -> None:
    """api.rst 4.4 KVM_CHECK_EXTENSION: answers per VM type on the VM fd."""
    assert ekvm.vm_types() == [VmType.DEFAULT, VmType.SW_PROTECTED]
    assert ekvm.check_extension(Cap.MEMORY_ATTRIBUTES) == MemoryAttribute.PRIVATE
    assert ekvm.check_extension(Cap.EXIT_HYPERCALL) == 1 << 12
    assert ekvm.check_extension(Cap.PRE_FAULT_MEMORY) == 1
    with ekvm.create_vm(VmType.DEFAULT) as vm:
        assert vm.check_extension(Cap.MEMORY_ATTRIBUTES) == 0
        assert vm.check_extension(Cap.GUEST_MEMFD_FLAGS) == GuestMemfdFlag.MMAP | \
            GuestMemfdFlag.INIT_SHARED
    with ekvm.create_vm(VmType.SW_PROTECTED) as vm:
        assert vm.check_extension(Cap.MEMORY_ATTRIBUTES) == MemoryAttribute.PRIVATE
        # INIT_SHARED is refused for VMs with private memory.
        assert vm.check_extension(Cap.GUEST_MEMFD_FLAGS) == GuestMemfdFlag.MMAP
        assert vm.try_create_guest_memfd(4096, GuestMemfdFlag.INIT_SHARED) == errno.EINVAL
        assert vm.try_create_guest_memfd(4096, GuestMemfdFlag.MMAP) == 0


def test_unmodelled_caps_are_zero(ekvm: Kvm) -> None:
    for cap in (Cap.SYNC_REGS, Cap.GET_TSC_KHZ, 999):
        assert ekvm.check_extension(cap) == 0, cap
    assert Cap.SYNC_REGS not in MODELLED_CAPS


def test_vm_types_outside_profile_are_einval(ekvm: Kvm) -> None:
    for t in (VmType.SEV, VmType.SNP, VmType.TDX, 31, 32, 1 << 40):
        assert ekvm.try_create_vm(t) == errno.EINVAL


def test_profile_6_12() -> None:
    """v6.12: no KVM_CAP_GUEST_MEMFD_FLAGS (every flag EINVAL), guest_memfd slots only on
    private-memory VMs, overlapping bindings EINVAL."""
    with Kvm(EmuBackend("6.12")) as kvm:
        assert kvm.check_extension(Cap.GUEST_MEMFD_FLAGS) == 0
        with kvm.create_vm(VmType.SW_PROTECTED) as vm:
            for bit in range(64):
                assert vm.try_create_guest_memfd(4096, 1 << bit) == errno.EINVAL
            g = vm.create_guest_memfd(4 * 4096)
            G = MemFlag.GUEST_MEMFD
            assert vm.try_set_user_memory_region2(0, G, 1 << 32, 8192, 0, g, 0) == 0
            assert vm.try_set_user_memory_region2(1, G, 2 << 32, 8192, 0, g, 4096) \
                == errno.EINVAL
        with kvm.create_vm(VmType.DEFAULT) as vm:
            assert vm.check_extension(Cap.GUEST_MEMFD) == 0
            g = vm.create_guest_memfd(4096)
            assert vm.try_set_user_memory_region2(0, MemFlag.GUEST_MEMFD, 1 << 32, 4096, 0,
                                                  g, 0) == errno.EINVAL


def test_unknown_profile() -> None:
    with pytest.raises(ValueError, match="unknown emulator profile"):
        get_profile("5.4")


def test_select_honours_profile_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVMPY_EMU_PROFILE", "6.12")
    b = make_backend("emu")
    assert isinstance(b, EmuBackend) and b.profile.name == "6.12"
    assert "6.12" in b.describe()
    b2 = make_backend("emu", "upstream")
    assert isinstance(b2, EmuBackend) and b2.profile.name == "upstream"


def test_system_ioctls(ekvm: Kvm) -> None:
    b = ekvm.backend
    assert ekvm.get_api_version() == 12
    assert ekvm.get_vcpu_mmap_size() == 3 * 4096
    with pytest.raises(OSError) as ei:
        b.ioctl(ekvm.fd, Ioctl.KVM_GET_API_VERSION, 1)
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(OSError) as ei:
        b.ioctl(ekvm.fd, 0x5401, 0)          # TCGETS: kvm_arch_dev_ioctl() -> EINVAL
    assert ei.value.errno == errno.EINVAL


def test_supported_cpuid(ekvm: Kvm) -> None:
    """api.rst 4.46: E2BIG when nent is too small, nent written back on success."""
    entries = {(e.function, e.index): e for e in ekvm.get_supported_cpuid()}
    assert entries[(0x80000001, 0)].edx & (1 << 29)              # long mode
    assert entries[(0x80000001, 0)].edx & (1 << 20)              # NX
    assert entries[(0x80000008, 0)].eax & 0xFF == 40              # the emulated CPU's MAXPHYADDR
    buf = make_cpuid2(2)
    with pytest.raises(OSError) as ei:
        ekvm.backend.ioctl(ekvm.fd, Ioctl.KVM_GET_SUPPORTED_CPUID, buf)
    assert ei.value.errno == errno.E2BIG and buf.nent == 2
    buf = make_cpuid2(64)
    ekvm.backend.ioctl(ekvm.fd, Ioctl.KVM_GET_SUPPORTED_CPUID, buf)
    assert buf.nent == len(entries)


def test_bad_user_pointer_is_efault(ekvm: Kvm) -> None:
    """copy_from_user of an unmapped address: EFAULT, not a crash."""
    with ekvm.create_vm() as vm:
        for req in (Ioctl.KVM_SET_USER_MEMORY_REGION2, Ioctl.KVM_ENABLE_CAP,
                    Ioctl.KVM_SET_MEMORY_ATTRIBUTES, Ioctl.KVM_CREATE_GUEST_MEMFD):
            with pytest.raises(OSError) as ei:
                ekvm.backend.ioctl(vm.fd, req, 8)
            assert ei.value.errno == errno.EFAULT, req.name


def test_unmodelled_kvm_ioctl_raises_not_modelled(ekvm: Kvm) -> None:
    with ekvm.create_vm() as vm:
        with pytest.raises(NotModelled, match="KVM_GET_STATS_FD"):
            ekvm.backend.ioctl(vm.fd, Ioctl.KVM_GET_STATS_FD)
        with pytest.raises(OSError) as ei:
            ekvm.backend.ioctl(vm.fd, 0x5401, 0)     # not a KVM ioctl: ENOTTY on a VM fd
        assert ei.value.errno == errno.ENOTTY


def test_enable_cap_exit_hypercall(ekvm: Kvm) -> None:
    """api.rst 7.37 KVM_CAP_EXIT_HYPERCALL: args[0] within the cap's mask."""
    with ekvm.create_vm(VmType.SW_PROTECTED) as vm:
        emu = ekvm.backend.object_of(vm.fd)          # type: ignore[attr-defined]
        assert vm.try_enable_cap(Cap.EXIT_HYPERCALL, 1 << 11) == errno.EINVAL
        assert vm.try_enable_cap(Cap.EXIT_HYPERCALL, 1 << 12, flags=1) == errno.EINVAL
        assert emu.exit_hypercall_mask == 0
        vm.enable_cap(Cap.EXIT_HYPERCALL, 1 << 12)
        assert emu.exit_hypercall_mask == 1 << 12
        assert vm.try_enable_cap(Cap.MEMORY_ATTRIBUTES, 8) == errno.EINVAL


def test_irqchip_and_mmu_pages(ekvm: Kvm) -> None:
    with ekvm.create_vm() as vm:
        vm.create_irqchip()
        with pytest.raises(OSError) as ei:
            vm.create_irqchip()
        assert ei.value.errno == errno.EEXIST
        with pytest.raises(OSError) as ei:
            vm.set_nr_mmu_pages(63)
        assert ei.value.errno == errno.EINVAL
        vm.set_nr_mmu_pages(64)


def test_fds_are_real_unique_and_forgotten(ekvm: Kvm) -> None:
    b = ekvm.backend
    assert isinstance(b, EmuBackend)
    vms = [ekvm.create_vm() for _ in range(3)]
    fds = [v.fd for v in vms]
    assert len(set(fds)) == 3 and all(os.fstat(fd) for fd in fds)
    fd = fds[0]
    vms[0].close()
    assert b.object_of(fd) is None
    with pytest.raises(OSError) as ei:
        b.ioctl(fd, Ioctl.KVM_CHECK_EXTENSION, int(Cap.USER_MEMORY))
    assert ei.value.errno == errno.EBADF
    # An fd closed behind the backend's back and reused is foreign, not the old VM.
    os.close(fds[1])
    m = os.memfd_create("reuse")
    os.dup2(m, fds[1])
    os.close(m)
    try:
        with pytest.raises(OSError) as ei:
            b.ioctl(fds[1], Ioctl.KVM_CHECK_EXTENSION, int(Cap.USER_MEMORY))
        assert ei.value.errno == errno.ENOTTY
        assert b.object_of(fds[1]) is None
    finally:
        os.close(fds[1])
        vms[1].fd = -1
    for v in vms[2:]:
        v.close()


def test_fd_lookup_cache_follows_the_file_not_the_number(ekvm: Kvm) -> None:
    """The backend's fd -> object cache (EmuBackend._lookup) must not outlive the file: an
    fd number closed behind its back and reused by another VM's file is that VM, a raw lseek()
    of a VM fd does not make it foreign, and a dup() is the same VM."""
    b = ekvm.backend
    assert isinstance(b, EmuBackend)
    a, other = ekvm.create_vm(), ekvm.create_vm()
    fd = a.fd
    vm_a, vm_other = b.object_of(fd), b.object_of(other.fd)
    assert vm_a is not None and vm_other is not None and vm_a is not vm_other
    assert b.ioctl(fd, Ioctl.KVM_CHECK_EXTENSION, int(Cap.USER_MEMORY)) == 1   # cached now
    os.lseek(fd, 0, os.SEEK_SET)
    assert b.object_of(fd) is vm_a
    d = os.dup(fd)
    try:
        assert b.object_of(d) is vm_a
    finally:
        os.close(d)
    os.dup2(other.fd, fd)           # the number now names the other VM's file
    try:
        assert b.object_of(fd) is vm_other
        assert b.object_of(fd) is vm_other     # and so it stays once cached
    finally:
        os.close(fd)
        a.fd = -1
    with pytest.raises(OSError) as ei:
        b.ioctl(fd, Ioctl.KVM_CHECK_EXTENSION, int(Cap.USER_MEMORY))
    assert ei.value.errno == errno.EBADF
    other.close()


def test_vcpu_creation_without_vcpu_module_is_explicit(ekvm: Kvm) -> None:
    try:
        import kvmpy.backend.emu.vcpu  # noqa: F401
    except ImportError:
        with ekvm.create_vm() as vm, pytest.raises(NotModelled, match="vCPUs"):
            vm.create_vcpu()
        return
    with ekvm.create_vm() as vm:
        v = vm.create_vcpu(3)
        assert vm.try_enable_cap(Cap.EXIT_HYPERCALL, 1 << 12) == 0
        with pytest.raises(OSError) as ei:
            vm.create_vcpu(3)
        assert ei.value.errno == errno.EEXIST
        with pytest.raises(OSError) as ei:
            vm.create_vcpu(4096)
        assert ei.value.errno == errno.EINVAL
        with pytest.raises(OSError) as ei:
            vm.create_irqchip()                     # after vCPUs: EINVAL
        assert ei.value.errno == errno.EINVAL
        # The caller's kvm_run mapping and the emulator's are the same memory.
        emu = ekvm.backend.object_of(v.fd)          # type: ignore[attr-defined]
        v.run_struct.immediate_exit = 1
        assert ctypes.c_uint8.from_address(emu.run_addr + 1).value == 1


def test_profile_replace_keeps_semantics() -> None:
    """Profiles are plain data: a derived profile without PRE_FAULT answers cap 0."""
    p = dataclasses.replace(get_profile("upstream"), name="nopf",
                            system_caps={**get_profile("upstream").system_caps,
                                         Cap.PRE_FAULT_MEMORY: 0})
    with Kvm(EmuBackend(p)) as kvm:
        assert kvm.check_extension(Cap.PRE_FAULT_MEMORY) == 0


def test_plugin_emu_profile_option(pytester: pytest.Pytester) -> None:
    """--emu-profile reaches the backend fixture and the run header names it."""
    pytester.makepyfile(
        """
        def test_profile(backend):
            assert backend.name == "emu"
            assert backend.profile.name == "6.12"
        """
    )
    r = pytester.runpytest("-p", "kvmpy.testing.plugin", "--backend", "emu",
                           "--emu-profile", "6.12")
    r.assert_outcomes(passed=1)
    r.stdout.fnmatch_lines(["*emulated KVM profile: 6.12*"])


# An ioctl number no kernel defines (_IO(KVMIO, 0xff), _IOWR(KVMIO, 0xff, 8)), a KVMIO number
# below the used range (0x10), and a foreign type (TCGETS).
UNKNOWN_IOCTLS = (0xAEFF, 0xC008AEFF, 0xAE10, 0x5401)


def test_unknown_ioctl_errnos(ekvm: Kvm) -> None:
    """The kernel's defaults for an ioctl it does not know: /dev/kvm EINVAL
    (kvm_arch_dev_ioctl()), VM fd ENOTTY (kvm_arch_vm_ioctl()), vCPU fd EINVAL
    (kvm_vcpu_ioctl()'s _IOC_TYPE check, then kvm_arch_vcpu_ioctl()'s default); all in
    arch/x86/kvm/x86.c and virt/kvm/kvm_main.c. Issue 11 item 13."""
    b = ekvm.backend
    with ekvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        for req in UNKNOWN_IOCTLS:
            for fd, want in ((ekvm.fd, errno.EINVAL), (vm.fd, errno.ENOTTY),
                             (vcpu.fd, errno.EINVAL)):
                with pytest.raises(OSError) as ei:
                    b.ioctl(fd, req, 0)
                assert ei.value.errno == want, (hex(req), fd)


def test_known_unmodelled_vcpu_ioctl_is_enotty(ekvm: Kvm) -> None:
    """A real vCPU ioctl the emulator does not answer (KVM_GET_FPU) is ENOTTY, as from a
    kernel without it, so callers skip (not the EINVAL of an unknown number)."""
    with ekvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        with pytest.raises(OSError) as ei:
            ekvm.backend.ioctl(vcpu.fd, 0x81A0AE8C, 0)      # _IOR(KVMIO, 0x8c, kvm_fpu)
        assert ei.value.errno == errno.ENOTTY
