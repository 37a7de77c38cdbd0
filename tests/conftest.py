import pytest

from kvmpy.backend import Backend
from kvmpy.backend.select import kvm_available, make_backend

pytest_plugins = ["pytester"]


def backend_or_skip(name: str) -> Backend:
    if name == "kvm":
        ok, why = kvm_available()
        if not ok:
            pytest.skip(f"real KVM unavailable: {why}")
    return make_backend(name)


@pytest.fixture(params=["kvm", "emu"])
def each_backend(request: pytest.FixtureRequest) -> Backend:
    """Each backend, whatever --backend says (tests/ otherwise runs on one). Tests that fork
    make their Kvm in the child: KVM refuses VM and vCPU ioctls from another mm
    (kvm_vm_ioctl: -EIO)."""
    return backend_or_skip(request.param)
