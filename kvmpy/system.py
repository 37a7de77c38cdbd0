"""The KVM system object: the /dev/kvm fd."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from ._call import checked_ioctl, errno_ioctl
from .backend import Backend
from .errors import KvmError
from .uapi import Cap, Ioctl, VmType, kvm_cpuid_entry2, make_cpuid2

if TYPE_CHECKING:
    from .vm import Vm


class Kvm:
    """An open KVM device (``/dev/kvm``, or the emulated one) and the VMs created from it."""

    def __init__(self, backend: Backend | None = None) -> None:
        if backend is None:
            from .backend.host import HostBackend

            backend = HostBackend()
        self.backend = backend
        self.fd = backend.open_kvm()
        self._vms: list[Vm] = []
        self._mmap_size: int | None = None

    # --- queries ----------------------------------------------------------------------
    def get_api_version(self) -> int:
        """KVM_GET_API_VERSION (always 12)."""
        return checked_ioctl(self.backend, self.fd, Ioctl.KVM_GET_API_VERSION)

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on /dev/kvm: 0 when the capability is absent."""
        return checked_ioctl(self.backend, self.fd, Ioctl.KVM_CHECK_EXTENSION, int(cap),
                             f"cap={_cap_name(cap)}")

    def get_vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE: bytes to mmap from a vCPU fd (kvm_run and the PIO page)."""
        if self._mmap_size is None:
            self._mmap_size = checked_ioctl(self.backend, self.fd, Ioctl.KVM_GET_VCPU_MMAP_SIZE)
        return self._mmap_size

    def get_supported_cpuid(self) -> list[kvm_cpuid_entry2]:
        """KVM_GET_SUPPORTED_CPUID, growing the buffer on E2BIG."""
        nent = 64
        while True:
            buf = make_cpuid2(nent)
            err, _ = errno_ioctl(self.backend, self.fd, Ioctl.KVM_GET_SUPPORTED_CPUID, buf)
            if err == errno.E2BIG and nent < 4096:
                nent *= 2
                continue
            if err:
                raise KvmError(err, "KVM_GET_SUPPORTED_CPUID", f"nent={nent}")
            return [kvm_cpuid_entry2.from_buffer_copy(buf.entries[i])
                    for i in range(buf.nent)]

    def vm_types(self) -> list[VmType]:
        """VM types from KVM_CAP_VM_TYPES (DEFAULT alone when the capability is absent)."""
        mask = self.check_extension(Cap.VM_TYPES)
        return VmType.from_mask(mask) if mask else [VmType.DEFAULT]

    # --- VMs --------------------------------------------------------------------------
    def create_vm(self, vm_type: int = VmType.DEFAULT) -> Vm:
        """KVM_CREATE_VM(type)."""
        from .vm import Vm

        fd = checked_ioctl(self.backend, self.fd, Ioctl.KVM_CREATE_VM, int(vm_type),
                           f"type={_vm_type_name(vm_type)}")
        vm = Vm(self, fd, vm_type)
        self._vms.append(vm)
        return vm

    def try_create_vm(self, vm_type: int) -> int:
        """KVM_CREATE_VM returning the errno (0 on success; the VM is closed at once)."""
        err, fd = errno_ioctl(self.backend, self.fd, Ioctl.KVM_CREATE_VM, int(vm_type))
        if not err:
            self.backend.close(fd)
        return err

    def _forget(self, vm: Vm) -> None:
        if vm in self._vms:
            self._vms.remove(vm)

    # --- lifetime ---------------------------------------------------------------------
    def close(self) -> None:
        """Close every VM created here, then the system fd."""
        for vm in list(self._vms):
            vm.close()
        if self.fd >= 0:
            self.backend.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _cap_name(cap: int) -> str:
    try:
        return f"KVM_CAP_{Cap(cap).name}"
    except ValueError:
        return str(cap)


def _vm_type_name(t: int) -> str:
    try:
        return f"KVM_X86_{VmType(t).name}_VM"
    except ValueError:
        return str(t)
