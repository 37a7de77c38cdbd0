"""The fault-injection backend (kvmpy/backend/faults.py): each fault fires where it says and
changes exactly the documented result, on the emulated KVM; plus the KVMPY_INJECT_FAULT hook
of make_backend and the faultcheck driver's plumbing."""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest

from kvmpy.app.faultcheck import Result, markdown_table
from kvmpy.backend.faults import FAULTS, FaultBackend, from_env
from kvmpy.backend.host import HostBackend
from kvmpy.backend.select import make_backend
from kvmpy.memory import SharedMemory
from kvmpy.model.harness import GPA_BASE, ModelHarness, ModelMismatch
from kvmpy.system import Kvm
from kvmpy.uapi import GuestMemfdFlag, VmType

MMAP_SHARED = int(GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED)


def faulty(name: str) -> FaultBackend:
    return FaultBackend(make_backend("emu"), name)


@pytest.fixture
def fkvm(request: pytest.FixtureRequest) -> Iterator[Kvm]:
    b = faulty(request.param)
    with Kvm(b) as k:
        yield k
    assert b.hits > 0, f"fault {request.param} never fired"


def with_fault(name: str) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("fkvm", [name], indirect=True, ids=[name])


def test_unknown_fault_and_real_kvm_refusal() -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        FaultBackend(make_backend("emu"), "no-such-fault")

    emu_only = next(n for n, s in FAULTS.items() if s.emu_only)
    with pytest.raises(NotImplementedError, match="cannot be injected"):
        FaultBackend(HostBackend(), emu_only)


def test_env_hook_wraps_make_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVMPY_INJECT_FAULT", raising=False)
    assert not isinstance(make_backend("emu"), FaultBackend)
    monkeypatch.setenv("KVMPY_INJECT_FAULT", "mmio-gpa")
    b = make_backend("emu")
    assert isinstance(b, FaultBackend) and b.fault.name == "mmio-gpa"
    assert b.name == "emu" and "injected fault: mmio-gpa" in b.describe()
    assert from_env(b.inner) is not b.inner


@with_fault("memslot-overlap-errno")
def test_memslot_overlap_errno(fkvm: Kvm) -> None:
    with fkvm.create_vm() as vm, SharedMemory(fkvm.backend, 0x2000) as mem:
        vm.set_user_memory_region2(1, 0, GPA_BASE, 0x2000, mem.addr)
        assert vm.try_set_user_memory_region2(2, 0, GPA_BASE + 0x1000, 0x1000,
                                              mem.addr) == errno.EINVAL


@with_fault("slot-delete-ignored")
def test_slot_delete_ignored(fkvm: Kvm) -> None:
    with fkvm.create_vm() as vm, SharedMemory(fkvm.backend, 0x2000) as mem:
        vm.set_user_memory_region2(1, 0, GPA_BASE, 0x2000, mem.addr)
        vm.delete_memslot(1)
        # Still there: re-creating it with another size is a forbidden modification.
        assert vm.try_set_user_memory_region2(1, 0, GPA_BASE, 0x1000, mem.addr) == errno.EINVAL


@with_fault("gmem-invalid-flag-accepted")
def test_gmem_invalid_flag_accepted(fkvm: Kvm) -> None:
    with fkvm.create_vm() as vm:
        assert vm.try_create_guest_memfd(0x1000, 1 << 40) == 0


@with_fault("gmem-size-errno")
def test_gmem_size_errno(fkvm: Kvm) -> None:
    with fkvm.create_vm() as vm:
        assert vm.try_create_guest_memfd(0x1800, 0) == errno.ENOMEM


@with_fault("punch-hole-dropped")
def test_punch_hole_dropped(fkvm: Kvm) -> None:
    with fkvm.create_vm() as vm:
        g = vm.create_guest_memfd(0x2000, MMAP_SHARED)
        m = g.mmap()
        m.write(0, b"\x42" * 8)
        g.punch_hole(0, 0x1000)
        assert m.read(0, 8) == b"\x42" * 8
        # Bad arguments still fail as the kernel's would.
        assert g.try_punch_hole(0x10, 0x1000) == errno.EINVAL


@with_fault("gmem-not-zeroed")
def test_gmem_not_zeroed(fkvm: Kvm) -> None:
    with fkvm.create_vm() as vm:
        m = vm.create_guest_memfd(0x2000, MMAP_SHARED).mmap()
        assert m.read(0x1ff8, 8) == b"\xa5" * 8


@with_fault("attributes-partial")
def test_attributes_partial(fkvm: Kvm) -> None:
    with fkvm.create_vm(VmType.SW_PROTECTED) as vm:
        vm.set_private(GPA_BASE, 0x3000)
        emu_vm = fkvm.backend.object_of(vm.fd)  # type: ignore[attr-defined]
        assert emu_vm.is_private(GPA_BASE) and not emu_vm.is_private(GPA_BASE + 0x1000)


@with_fault("attributes-einval-ignored")
def test_attributes_einval_ignored(fkvm: Kvm) -> None:
    with fkvm.create_vm(VmType.SW_PROTECTED) as vm:
        assert vm.try_set_memory_attributes(GPA_BASE + 8, 0x1000) == 0
        assert vm.try_set_memory_attributes(GPA_BASE, 0x1000, attributes=1) == 0


def _private_fault(h: ModelHarness) -> None:
    h.set_slot(0, GPA_BASE, 0x2000)
    h.set_attributes(GPA_BASE, 0x1000)
    h.guest_read(GPA_BASE + 8)


@pytest.mark.guest
@with_fault("memory-fault-gpa")
def test_memory_fault_gpa(fkvm: Kvm) -> None:
    with ModelHarness(fkvm, VmType.SW_PROTECTED) as h, \
            pytest.raises(ModelMismatch, match=r"gpa=4294971392"):
        _private_fault(h)


@pytest.mark.guest
@with_fault("memory-fault-flags")
def test_memory_fault_flags(fkvm: Kvm) -> None:
    with ModelHarness(fkvm, VmType.SW_PROTECTED) as h, \
            pytest.raises(ModelMismatch, match=r"Fault\(flags=0,"):
        _private_fault(h)


@pytest.mark.guest
@with_fault("mmio-gpa")
def test_mmio_gpa(fkvm: Kvm) -> None:
    with ModelHarness(fkvm) as h, pytest.raises(ModelMismatch, match="Mmio"):
        h.guest_write(GPA_BASE + 0x10000, 1)


@pytest.mark.guest
@with_fault("skip-invalidation-attributes")
def test_skip_invalidation_attributes(fkvm: Kvm) -> None:
    """The vCPU keeps its shared translation after a conversion to private."""
    with ModelHarness(fkvm, VmType.SW_PROTECTED) as h:
        g = h.create_gmem(0x2000, 0)
        h.set_slot(0, GPA_BASE, 0x2000, gmem=g)
        h.host_write(0, 0, 0x1111)
        h.guest_read(GPA_BASE)
        h.set_attributes(GPA_BASE, 0x1000)
        with pytest.raises(ModelMismatch, match="guest saw 0x1111, model expects 0x0"):
            h.guest_read(GPA_BASE)


def test_faultcheck_table_marks_uncaught() -> None:
    rs = [Result("mmio-gpa", ["selftests/x.py::test_a"], 3, 1.0, 1),
          Result("punch-hole-dropped", [], 0, 1.0, 0)]
    t = markdown_table(rs, [])
    assert "| `mmio-gpa` |" in t and "| 1 | `x.py` x1 |" in t
    assert "**NOT CAUGHT** (never fired)" in t


def test_every_fault_has_a_seam_test() -> None:
    """Each fault of FAULTS is exercised above (a new fault needs its own test here)."""
    import sys

    names = {n.removeprefix("test_").replace("_", "-")
             for n in dir(sys.modules[__name__]) if n.startswith("test_")}
    missing = [f for f in FAULTS if f not in names]
    assert not missing, f"faults without a seam test: {missing}"
