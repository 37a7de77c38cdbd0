"""The emulated guest_memfd's memory failure and noexec mount (issue 14).

MADV_HWPOISON of a guest_memfd page through the backend is recorded by the emulator only (host
RAM is never poisoned): the host page SIGBUSes in every mapping, including ones made later and
in forked children, other pages keep their bytes, a punch-hole lets a new mapping fault a fresh
zero page (7.3 virt/kvm/guest_memfd.c kvm_gmem_error_folio(), kvm_gmem_punch_hole()).
"""

from __future__ import annotations

import errno

import pytest

from kvmpy.backend.emu import EmuBackend
from kvmpy.backend.emu.gmem import has_cap_sys_admin
from kvmpy.system import Kvm
from kvmpy.testing.child import run_in_child
from kvmpy.testing.sigbus import touch
from kvmpy.uapi import PAGE_SIZE, GuestMemfdFlag, VmType

P = PAGE_SIZE
SHARED = int(GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED)
MADV_HWPOISON = 100
PROT_READ, PROT_EXEC = 0x1, 0x4

needs_admin = pytest.mark.skipif(not has_cap_sys_admin(), reason="MADV_HWPOISON needs "
                                 "CAP_SYS_ADMIN (madvise_inject_error())")


@needs_admin
def test_poison_from_a_child_reaches_the_parent() -> None:
    kvm = Kvm(EmuBackend(profile="7.3"))
    with kvm.create_vm(VmType.DEFAULT) as vm:
        g = vm.create_guest_memfd(4 * P, SHARED)
        m = g.mmap()
        for i in range(4):
            m.write(i * P, bytes([i + 1]) * P)
        out = run_in_child(lambda: str(kvm.backend.madvise(m.addr + P, P, MADV_HWPOISON)))
        assert out.ok, out.describe()
        r = touch(m.addr + P, P, write=False)          # the fork syncs the parent's mapping
        assert r.sigbus, r.describe()
        assert m.read(0, P) == b"\1" * P and m.read(2 * P, P) == b"\3" * P
        with g.mmap() as later:                         # a new mapping: SIGBUS there too
            assert touch(later.addr + P, P, write=True).sigbus
        g.punch_hole(P, P)
        assert touch(m.addr + P, P, write=False).sigbus  # the old mapping keeps its entry
        with g.mmap() as fresh:
            assert fresh.read(P, P) == b"\0" * P
        m.close()


@needs_admin
def test_poison_errnos() -> None:
    kvm = Kvm(EmuBackend(profile="7.3"))
    with kvm.create_vm(VmType.SW_PROTECTED) as vm:
        g = vm.create_guest_memfd(2 * P, int(GuestMemfdFlag.MMAP))
        m = g.mmap()
        with pytest.raises(OSError) as e:          # a private page cannot be faulted in
            kvm.backend.madvise(m.addr, P, MADV_HWPOISON)
        assert e.value.errno == errno.EFAULT
    kvm = Kvm(EmuBackend(profile="6.12"))          # no CONFIG_MEMORY_FAILURE there
    backend = kvm.backend
    assert isinstance(backend, EmuBackend) and not backend.profile.memory_failure


@pytest.mark.parametrize("profile,want", [("7.3", errno.EPERM), ("upstream", errno.EPERM)])
def test_prot_exec_mmap_refused(profile: str, want: int) -> None:
    kvm = Kvm(EmuBackend(profile=profile))
    with kvm.create_vm(VmType.DEFAULT) as vm:
        g = vm.create_guest_memfd(P, SHARED)
        assert g.try_mmap(P, prot=PROT_READ | PROT_EXEC) == want
        g0 = vm.create_guest_memfd(P, 0)          # before the MMAP flag's ENODEV (do_mmap())
        assert g0.try_mmap(P, prot=PROT_READ | PROT_EXEC) == want
        assert g.try_mmap(P, prot=PROT_READ) == 0


def test_6_12_mount_is_not_noexec() -> None:
    from kvmpy.backend.emu.profiles import get_profile
    assert not get_profile("6.12").gmem_noexec and get_profile("7.3").gmem_noexec
