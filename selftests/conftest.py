"""Shared selftest fixtures: VM factories per VM type, guest_memfd flag sets, fd-leak checks.

* ``vm_type`` is parametrized over the VM types a case can run on (ids ``default``,
  ``sw_protected``, plus whatever else the real /dev/kvm offers); a type the backend does not offer
  in KVM_CAP_VM_TYPES skips, naming the capability and its value.
* ``vm`` is one VM of that type; ``make_vm`` creates more of the same type; ``shared_gmem_vm``
  is one VM of that type shared by a module's API-level guest_memfd cases.
* ``gmem_flags`` is parametrized over the flag sets guest_memfd_test covers (ids ``noflags``,
  ``mmap``, ``mmap_init_shared``); a set the VM does not offer in KVM_CAP_GUEST_MEMFD_FLAGS skips.
* Every test module is wrapped in an fd-leak check: fds opened during the module and still open
  after it (and after its module fixtures) fail the module's last test at teardown, naming each fd
  and what it points at. Fds opened while session fixtures were set up (a backend's own, for the
  process's life) are not counted (kvmpy.testing.plugin.SESSION_FDS).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvmpy.backend import Backend
from kvmpy.backend.select import kvm_available
from kvmpy.system import Kvm
from kvmpy.testing.errnos import valid_gmem_flags
from kvmpy.testing.plugin import SESSION_FDS, open_kvm
from kvmpy.testing.require import skip_missing, where
from kvmpy.uapi import Cap, GuestMemfdFlag, VmType
from kvmpy.vm import Vm

# Installed (kvmpy.selftests, no repository conftest.py above it): load kvmpy's plugins here, so
# `pytest --pyargs kvmpy.selftests` works on its own; in a checkout the root conftest.py does.
if not (Path(__file__).resolve().parent.parent / "conftest.py").is_file():
    pytest_plugins = ["kvmpy.testing.plugin", "kvmpy.testing.ktap", "kvmpy.testing.health",
                      "kvmpy.testing.isolate"]

# --- VM types ---------------------------------------------------------------------------------

#: Always parametrized (the two types an x86 host can offer without confidential hardware).
BASE_VM_TYPES = (VmType.DEFAULT, VmType.SW_PROTECTED)


def _real_kvm_vm_types(config: pytest.Config) -> list[VmType]:
    """Extra VM types the real /dev/kvm offers (SEV, SNP, TDX hosts), when real KVM is selected."""
    if config.getoption("--backend") not in ("kvm", "both", "auto") or not kvm_available()[0]:
        return []
    try:
        with Kvm() as k:
            return [t for t in k.vm_types() if t not in BASE_VM_TYPES]
    except Exception:  # probing for ids only: a broken /dev/kvm is reported by the tests
        return []


def vm_type_id(t: int) -> str:
    return VmType(t).name.lower()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "vm_type" in metafunc.fixturenames:
        types = [*BASE_VM_TYPES, *_real_kvm_vm_types(metafunc.config)]
        metafunc.parametrize("vm_type", types, ids=[vm_type_id(t) for t in types])
    if "gmem_flags" in metafunc.fixturenames and not _marker_parametrizes(metafunc, "gmem_flags"):
        sets = list(GMEM_FLAG_SETS)
        metafunc.parametrize("gmem_flags", [f for f, _ in sets], ids=[i for _, i in sets])


def _marker_parametrizes(metafunc: pytest.Metafunc, name: str) -> bool:
    """A test narrows ``gmem_flags`` to the sets its case applies to with its own marker."""
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0]
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",")]
        if name in names:
            return True
    return False


def require_offered_vm_type(kvm: Kvm, vm_type: int) -> None:
    """Skip unless KVM_CAP_VM_TYPES offers ``vm_type`` (DEFAULT alone when the cap is 0)."""
    if vm_type not in kvm.vm_types():
        mask = kvm.check_extension(Cap.VM_TYPES)
        pytest.skip(f"KVM_X86_{VmType(vm_type).name}_VM not in KVM_CAP_VM_TYPES={mask:#x} on "
                    f"{where(kvm)}")


@pytest.fixture
def make_vm(kvm: Kvm, vm_type: int) -> Callable[[], Vm]:
    """A factory of VMs of the parametrized type (skips if the backend does not offer it)."""
    require_offered_vm_type(kvm, vm_type)

    def make() -> Vm:
        return kvm.create_vm(vm_type)

    return make


@pytest.fixture
def vm(make_vm: Callable[[], Vm]) -> Vm:
    """One VM of the parametrized type; closed with ``kvm``."""
    return make_vm()


@pytest.fixture
def gmem_vm(request: pytest.FixtureRequest, backend: Backend, vm_type: int) -> Vm:
    """A VM on which KVM_CREATE_GUEST_MEMFD is offered (KVM_CAP_GUEST_MEMFD on the VM fd): the
    module's ``shared_gmem_vm`` where the module sets SHARED_GMEM_VM = True, else a new ``vm``.
    (``backend`` and ``vm_type`` are named so that they parametrize the case.)"""
    if getattr(request.module, "SHARED_GMEM_VM", False):
        shared: Vm = request.getfixturevalue("shared_gmem_vm")
        return shared
    vm: Vm = request.getfixturevalue("vm")
    val = vm.check_extension(Cap.GUEST_MEMFD)
    if not val:
        pytest.skip(f"KVM_CAP_GUEST_MEMFD={val:#x} on {where(vm)}")
    return vm


class _ModuleVms:
    """A module's own Kvm on the backend and one VM per VM type on it (shared_gmem_vm)."""

    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm
        self.vms: dict[int, Vm] = {}


@pytest.fixture(scope="module")
def _module_vms(backend: Backend) -> Iterator[_ModuleVms]:
    with open_kvm(backend) as k:
        yield _ModuleVms(k)


@pytest.fixture
def shared_gmem_vm(_module_vms: _ModuleVms, vm_type: int) -> Iterator[Vm]:
    """A VM of the parametrized type on which KVM_CREATE_GUEST_MEMFD is offered, shared by the
    module's cases, as guest_memfd_test.c runs all its cases on one VM per type (a VM's close
    costs ~6 ms in a TCG VM, mostly an RCU wait, issue 15). For cases that only create
    guest_memfds on it: those are closed after each case, and a case that leaves the VM closed
    or with memslots or vCPUs gets it replaced for the next one."""
    kvm = _module_vms.kvm
    require_offered_vm_type(kvm, vm_type)
    vm = _module_vms.vms.get(vm_type)
    if vm is None:
        vm = _module_vms.vms[vm_type] = kvm.create_vm(vm_type)
    val = vm.check_extension(Cap.GUEST_MEMFD)
    if not val:
        pytest.skip(f"KVM_CAP_GUEST_MEMFD={val:#x} on {where(vm)}")
    yield vm
    for g in vm.guest_memfds:
        vm.disown(g).close()
    if vm.closed or vm.memslots or vm.vcpus:
        vm.close()
        del _module_vms.vms[vm_type]


# --- guest_memfd flag sets --------------------------------------------------------------------

GMEM_FLAG_SETS: tuple[tuple[int, str], ...] = (
    (0, "noflags"),
    (int(GuestMemfdFlag.MMAP), "mmap"),
    (int(GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED), "mmap_init_shared"),
)


def require_gmem_flags(vm: Vm, flags: int) -> None:
    """Skip unless every bit of ``flags`` is in the VM's KVM_CAP_GUEST_MEMFD_FLAGS."""
    valid = valid_gmem_flags(vm)
    if flags & ~valid:
        missing = "|".join(f"GUEST_MEMFD_FLAG_{f.name}" for f in GuestMemfdFlag
                           if f and f & flags & ~valid)
        feature = "gmem_init_shared" if flags & ~valid == GuestMemfdFlag.INIT_SHARED else ""
        skip_missing(vm, feature, f"{missing} not in KVM_CAP_GUEST_MEMFD_FLAGS={valid:#x} on "
                     f"{where(vm)}")


@pytest.fixture
def gmem_flags_offered(gmem_vm: Vm, gmem_flags: int) -> int:
    """The parametrized guest_memfd flag set, skipped unless offered by ``gmem_vm``."""
    require_gmem_flags(gmem_vm, gmem_flags)
    return gmem_flags


# --- fd-leak check around every module --------------------------------------------------------

def open_fds() -> dict[int, str]:
    """This process's open fds and what they point at (the listing's own fd is dropped)."""
    out: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the directory fd listdir used, closed by now
            continue
    return out


@pytest.fixture(scope="module", autouse=True)
def fd_leak_check(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the module if it leaves fds open (VMs, vCPUs, guest_memfds, memfds...)."""
    before = open_fds()
    yield
    after = open_fds()
    leaked = {fd: t for fd, t in after.items()
              if fd not in SESSION_FDS and before.get(fd) != t}
    if leaked:
        names = ", ".join(f"fd {fd} -> {t}" for fd, t in sorted(leaked.items()))
        pytest.fail(f"fd leak: {request.module.__name__} left {len(leaked)} fd(s) open: {names}",
                    pytrace=False)
