"""The KVM system object: the /dev/kvm fd."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from ._call import checked_ioctl, errno_ioctl, int_arg
from ._object import FdObject
from .backend import Backend
from .errors import Errno, KvmError, KvmUnavailable
from .uapi import Cap, Ioctl, VmType, kvm_cpuid_entry2, make_cpuid2

if TYPE_CHECKING:
    from .vm import Vm


class Kvm(FdObject):
    """An open KVM device (``/dev/kvm``, or the emulated one) and the VMs created from it."""

    def __init__(self, backend: Backend | None = None) -> None:
        if backend is None:
            from .backend.host import HostBackend

            backend = HostBackend()
        self.backend = backend
        self._init_fd(backend.open_kvm())
        self._vms: list[Vm] = []
        self._mmap_size: int | None = None
        # A device that is not KVM (KVMPY_DEVICE=/dev/null, a file) answers the first ioctl with
        # ENOTTY; say so here rather than at some later call. KVM_API_VERSION is 12 (kvm.h).
        try:
            version = self.backend.ioctl(self.fd, Ioctl.KVM_GET_API_VERSION)
        except OSError as e:
            self.close()
            if e.errno is None:  # raised by a signal handler, not the kernel
                raise
            raise KvmUnavailable(f"{getattr(backend, 'device', backend.name)} is not a KVM "
                                 f"device: KVM_GET_API_VERSION failed: {e.strerror}") from None
        if version != 12:
            self.close()
            raise KvmUnavailable(f"{getattr(backend, 'device', backend.name)}: "
                                 f"KVM_GET_API_VERSION is {version}, not 12")

    def __repr__(self) -> str:
        return f"<Kvm fd {self.fd} {self.backend.name}>"

    # --- queries ----------------------------------------------------------------------
    def get_api_version(self) -> int:
        """KVM_GET_API_VERSION (always 12)."""
        with self._use("KVM_GET_API_VERSION") as fd:
            return checked_ioctl(self.backend, fd, Ioctl.KVM_GET_API_VERSION)

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on /dev/kvm: 0 when the capability is absent."""
        # The argument is a long (kvm_vm_ioctl_check_extension_generic).
        cap = int_arg(Ioctl.KVM_CHECK_EXTENSION, "cap", cap)
        with self._use("KVM_CHECK_EXTENSION") as fd:
            return checked_ioctl(self.backend, fd, Ioctl.KVM_CHECK_EXTENSION, cap,
                                 f"cap={_cap_name(cap)}")

    def get_vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE: bytes to mmap from a vCPU fd (kvm_run and the PIO page)."""
        if self._mmap_size is None:
            with self._use("KVM_GET_VCPU_MMAP_SIZE") as fd:
                self._mmap_size = checked_ioctl(self.backend, fd, Ioctl.KVM_GET_VCPU_MMAP_SIZE)
        return self._mmap_size

    def get_supported_cpuid(self) -> list[kvm_cpuid_entry2]:
        """KVM_GET_SUPPORTED_CPUID, growing the buffer on E2BIG."""
        nent = 64
        while True:
            buf = make_cpuid2(nent)
            with self._use("KVM_GET_SUPPORTED_CPUID") as fd:
                err, _ = errno_ioctl(self.backend, fd, Ioctl.KVM_GET_SUPPORTED_CPUID, buf)
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

        vm_type = int_arg(Ioctl.KVM_CREATE_VM, "type", vm_type)
        with self._use("KVM_CREATE_VM") as kfd:
            fd = checked_ioctl(self.backend, kfd, Ioctl.KVM_CREATE_VM, vm_type,
                               f"type={_vm_type_name(vm_type)}")
        vm = Vm(self, fd, vm_type)
        self._vms.append(vm)
        return vm

    def try_create_vm(self, vm_type: int) -> Errno:
        """KVM_CREATE_VM returning the errno (0 on success; the VM is closed at once)."""
        vm_type = int_arg(Ioctl.KVM_CREATE_VM, "type", vm_type)
        with self._use("KVM_CREATE_VM") as kfd:
            err, fd = errno_ioctl(self.backend, kfd, Ioctl.KVM_CREATE_VM, vm_type)
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
        if self._begin_close():
            self.backend.close(self.fd)
            self._end_close()

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
