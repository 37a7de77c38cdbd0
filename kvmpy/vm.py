"""The VM object: a KVM_CREATE_VM fd, its memslots, guest_memfds and vCPUs."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from ._call import _describe, checked_ioctl, int_arg, pack
from ._object import FdObject
from .backend import IoctlArg
from .errors import Errno
from .gmem import GuestMemfd
from .system import _cap_name, _vm_type_name
from .uapi import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    Cap,
    Ioctl,
    MemFlag,
    MemoryAttribute,
    kvm_create_guest_memfd,
    kvm_enable_cap,
    kvm_memory_attributes,
    kvm_userspace_memory_region,
    kvm_userspace_memory_region2,
)

if TYPE_CHECKING:
    from .system import Kvm
    from .vcpu import Vcpu


@dataclasses.dataclass(frozen=True)
class Memslot:
    """What kvmpy last successfully installed in a slot (slot includes the as_id in bits 16+)."""

    slot: int
    flags: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    guest_memfd: GuestMemfd | None = None
    guest_memfd_offset: int = 0

    @property
    def end(self) -> int:
        return self.guest_phys_addr + self.memory_size

    def __repr__(self) -> str:
        fl = MemFlag(self.flags).name if 0 < self.flags < 8 else hex(self.flags)
        g = f", gmem fd {self.guest_memfd.fd} +{self.guest_memfd_offset:#x}" if self.guest_memfd else ""
        return (f"Memslot({self.slot}, {fl}, gpa {self.guest_phys_addr:#x}+"
                f"{self.memory_size:#x}, hva {self.userspace_addr:#x}{g})")


def _fd_of(gmem: GuestMemfd | int | None, call: Ioctl) -> int:
    if gmem is None:
        return 0
    if isinstance(gmem, GuestMemfd):
        gmem._check_open(call.name)
        return gmem.fd
    # An int fd stored in the __u32 field as C stores it (-1 becomes 0xffffffff).
    return int_arg(call, "guest_memfd", gmem, -(1 << 31), (1 << 32) - 1) & 0xFFFF_FFFF


class Vm(FdObject):
    """A VM fd. Children (vCPUs, owned guest_memfds) close before it."""

    def __init__(self, kvm: Kvm, fd: int, vm_type: int) -> None:
        self.kvm = kvm
        self.backend = kvm.backend
        self._init_fd(fd)
        self.type = vm_type
        self.memslots: dict[int, Memslot] = {}
        self.vcpus: list[Vcpu] = []
        self._gmems: list[GuestMemfd] = []
        self._has_region2: bool | None = None

    def __repr__(self) -> str:
        return f"<Vm fd {self.fd} {_vm_type_name(self.type)} on {self.backend.name}>"

    # _enter/_leave rather than ``with self._use()``: these carry every VM ioctl (issue 15).
    def _ioctl(self, request: Ioctl, arg: IoctlArg = None, detail: str = "") -> int:
        fd = self._enter(request._name_)
        try:
            return checked_ioctl(self.backend, fd, request, arg, detail)
        finally:
            self._leave()

    def _try_ioctl(self, request: Ioctl, arg: IoctlArg = None) -> tuple[Errno, int]:
        # errno_ioctl() inline: the try_* sweeps of the selftests run this thousands of times.
        if isinstance(arg, int):
            int_arg(request, "arg", arg)
        fd = self._enter(request._name_)
        try:
            ret, err = self.backend.ioctl_errno(fd, request, arg)
        finally:
            self._leave()
        return Errno(err, request._name_, lambda: _describe(arg)), ret

    # --- capabilities -----------------------------------------------------------------
    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (answers for this VM type)."""
        cap = int_arg(Ioctl.KVM_CHECK_EXTENSION, "cap", cap)
        return self._ioctl(Ioctl.KVM_CHECK_EXTENSION, cap, f"cap={_cap_name(cap)}")

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP on the VM fd."""
        self._ioctl(Ioctl.KVM_ENABLE_CAP, self._enable_cap_struct(cap, args, flags))

    def try_enable_cap(self, cap: int, *args: int, flags: int = 0) -> Errno:
        return self._try_ioctl(Ioctl.KVM_ENABLE_CAP, self._enable_cap_struct(cap, args, flags))[0]

    @staticmethod
    def _enable_cap_struct(cap: int, args: tuple[int, ...], flags: int) -> kvm_enable_cap:
        return pack(Ioctl.KVM_ENABLE_CAP, kvm_enable_cap, cap=cap, flags=flags, args=args)

    # --- memslots ---------------------------------------------------------------------
    def set_user_memory_region(self, slot: int, flags: int, gpa: int, size: int,
                               hva: int) -> None:
        """KVM_SET_USER_MEMORY_REGION (v1). size 0 deletes the slot."""
        r = self._region(slot, flags, gpa, size, hva)
        self._ioctl(Ioctl.KVM_SET_USER_MEMORY_REGION, r)
        self._record(Memslot(r.slot, r.flags, gpa, size, hva))

    def try_set_user_memory_region(self, slot: int, flags: int, gpa: int, size: int,
                                   hva: int) -> Errno:
        r = self._region(slot, flags, gpa, size, hva)
        err = self._try_ioctl(Ioctl.KVM_SET_USER_MEMORY_REGION, r)[0]
        if not err:
            self._record(Memslot(r.slot, r.flags, gpa, size, hva))
        return err

    def set_user_memory_region2(self, slot: int, flags: int, gpa: int, size: int, hva: int,
                                guest_memfd: GuestMemfd | int | None = None,
                                guest_memfd_offset: int = 0) -> None:
        """KVM_SET_USER_MEMORY_REGION2. ``guest_memfd`` binds a slot to a guest_memfd (with
        KVM_MEM_GUEST_MEMFD in flags); size 0 deletes the slot."""
        r = self._region2(slot, flags, gpa, size, hva, guest_memfd, guest_memfd_offset)
        self._ioctl(Ioctl.KVM_SET_USER_MEMORY_REGION2, r)
        self._record(self._memslot(r, guest_memfd))

    def try_set_user_memory_region2(self, slot: int, flags: int, gpa: int, size: int, hva: int,
                                    guest_memfd: GuestMemfd | int | None = None,
                                    guest_memfd_offset: int = 0) -> Errno:
        r = self._region2(slot, flags, gpa, size, hva, guest_memfd, guest_memfd_offset)
        err = self._try_ioctl(Ioctl.KVM_SET_USER_MEMORY_REGION2, r)[0]
        if not err:
            self._record(self._memslot(r, guest_memfd))
        return err

    def has_region2(self) -> bool:
        """Whether KVM_SET_USER_MEMORY_REGION2 exists (KVM_CAP_USER_MEMORY2, 6.8+; before it
        the ioctl is ENOTTY and no slot can be a guest_memfd slot). Asked once per VM."""
        if self._has_region2 is None:
            self._has_region2 = bool(self.check_extension(Cap.USER_MEMORY2))
        return self._has_region2

    def delete_memslot(self, slot: int) -> None:
        """Delete ``slot``: KVM_SET_USER_MEMORY_REGION2 with size 0, or the v1 ioctl on a kernel
        without REGION2 (both reach __kvm_set_memory_region(), which deletes on size 0)."""
        if self.has_region2():
            self.set_user_memory_region2(slot, 0, 0, 0, 0)
        else:
            self.set_user_memory_region(slot, 0, 0, 0, 0)

    @staticmethod
    def _region(slot: int, flags: int, gpa: int, size: int,
                hva: int) -> kvm_userspace_memory_region:
        return pack(Ioctl.KVM_SET_USER_MEMORY_REGION, kvm_userspace_memory_region,
                    slot=slot, flags=int(flags), guest_phys_addr=gpa, memory_size=size,
                    userspace_addr=hva)

    @staticmethod
    def _region2(slot: int, flags: int, gpa: int, size: int, hva: int,
                 gmem: GuestMemfd | int | None, off: int) -> kvm_userspace_memory_region2:
        call = Ioctl.KVM_SET_USER_MEMORY_REGION2
        return pack(call, kvm_userspace_memory_region2,
                    slot=slot, flags=int(flags), guest_phys_addr=gpa, memory_size=size,
                    userspace_addr=hva, guest_memfd_offset=off,
                    guest_memfd=_fd_of(gmem, call))

    @staticmethod
    def _memslot(r: kvm_userspace_memory_region2, gmem: GuestMemfd | int | None) -> Memslot:
        g = gmem if isinstance(gmem, GuestMemfd) and r.flags & MemFlag.GUEST_MEMFD else None
        return Memslot(r.slot, r.flags, r.guest_phys_addr, r.memory_size, r.userspace_addr,
                       g, r.guest_memfd_offset if g else 0)

    def _record(self, m: Memslot) -> None:
        if m.memory_size == 0:
            self.memslots.pop(m.slot, None)
        else:
            self.memslots[m.slot] = m

    # --- guest_memfd and attributes ---------------------------------------------------
    def create_guest_memfd(self, size: int, flags: int = 0) -> GuestMemfd:
        """KVM_CREATE_GUEST_MEMFD. The guest_memfd is closed with the VM unless
        :meth:`disown` hands it to the caller."""
        arg = pack(Ioctl.KVM_CREATE_GUEST_MEMFD, kvm_create_guest_memfd, size=size,
                   flags=int(flags))
        fd = self._ioctl(Ioctl.KVM_CREATE_GUEST_MEMFD, arg)
        g = GuestMemfd(self.backend, fd, size, int(flags))
        self._gmems.append(g)
        return g

    def try_create_guest_memfd(self, size: int, flags: int = 0) -> Errno:
        """KVM_CREATE_GUEST_MEMFD returning the errno; on success the fd is closed at once."""
        arg = pack(Ioctl.KVM_CREATE_GUEST_MEMFD, kvm_create_guest_memfd, size=size,
                   flags=int(flags))
        err, fd = self._try_ioctl(Ioctl.KVM_CREATE_GUEST_MEMFD, arg)
        if not err:
            self.backend.close(fd)
        return err

    @property
    def guest_memfds(self) -> tuple[GuestMemfd, ...]:
        """The guest_memfds closed with this VM (created here and not disowned)."""
        return tuple(self._gmems)

    def disown(self, gmem: GuestMemfd) -> GuestMemfd:
        """Stop closing ``gmem`` with this VM (to test that a guest_memfd outlives its VM fd)."""
        if gmem in self._gmems:
            self._gmems.remove(gmem)
        return gmem

    def set_memory_attributes(self, gpa: int, size: int,
                              attributes: int = MemoryAttribute.PRIVATE, flags: int = 0) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES over [gpa, gpa+size)."""
        self._ioctl(Ioctl.KVM_SET_MEMORY_ATTRIBUTES, self._attrs(gpa, size, attributes, flags))

    def try_set_memory_attributes(self, gpa: int, size: int,
                                  attributes: int = MemoryAttribute.PRIVATE,
                                  flags: int = 0) -> Errno:
        return self._try_ioctl(Ioctl.KVM_SET_MEMORY_ATTRIBUTES,
                               self._attrs(gpa, size, attributes, flags))[0]

    @staticmethod
    def _attrs(gpa: int, size: int, attributes: int, flags: int) -> kvm_memory_attributes:
        return pack(Ioctl.KVM_SET_MEMORY_ATTRIBUTES, kvm_memory_attributes, address=gpa,
                    size=size, attributes=int(attributes), flags=flags)

    def guest_mem_fallocate(self, gpa: int, size: int, punch_hole: bool = False) -> None:
        """fallocate (or punch) the guest_memfd pages behind guest-physical [gpa, gpa+size),
        across memslots, as kvm_util's vm_guest_mem_fallocate(); a piece of the range in no
        guest_memfd memslot raises ValueError naming it."""
        mode = FALLOC_FL_KEEP_SIZE | (FALLOC_FL_PUNCH_HOLE if punch_hole else 0)
        end = gpa + size
        while gpa < end:
            m = next((s for s in self.memslots.values()
                      if s.guest_phys_addr <= gpa < s.end and (s.slot >> 16) == 0), None)
            if m is None or m.guest_memfd is None:
                raise ValueError(f"gpa {gpa:#x} is not in a guest_memfd memslot "
                                 f"({'no memslot' if m is None else repr(m)})")
            n = min(end, m.end) - gpa
            m.guest_memfd.fallocate(m.guest_memfd_offset + gpa - m.guest_phys_addr, n, mode)
            gpa += n

    def set_private(self, gpa: int, size: int) -> None:
        self.set_memory_attributes(gpa, size, MemoryAttribute.PRIVATE)

    def set_shared(self, gpa: int, size: int) -> None:
        self.set_memory_attributes(gpa, size, MemoryAttribute.NONE)

    # --- other VM ioctls --------------------------------------------------------------
    def create_irqchip(self) -> None:
        self._ioctl(Ioctl.KVM_CREATE_IRQCHIP)

    def set_nr_mmu_pages(self, n: int) -> None:
        self._ioctl(Ioctl.KVM_SET_NR_MMU_PAGES, int_arg(Ioctl.KVM_SET_NR_MMU_PAGES, "n", n, 0))

    # --- vCPUs ------------------------------------------------------------------------
    def create_vcpu(self, vcpu_id: int | None = None) -> Vcpu:
        """KVM_CREATE_VCPU and mmap of its kvm_run."""
        from .vcpu import Vcpu

        if vcpu_id is None:
            vcpu_id = len(self.vcpus)
        # An unsigned long; KVM refuses ids >= KVM_MAX_VCPU_IDS with EINVAL (kvm_main.c).
        vcpu_id = int_arg(Ioctl.KVM_CREATE_VCPU, "vcpu_id", vcpu_id, 0)
        fd = self._ioctl(Ioctl.KVM_CREATE_VCPU, vcpu_id, f"vcpu_id={vcpu_id}")
        v = Vcpu(self, fd, vcpu_id)
        self.vcpus.append(v)
        return v

    # --- lifetime ---------------------------------------------------------------------
    def close(self) -> None:
        """Close vCPUs and owned guest_memfds, then the VM fd (new calls on the VM are refused
        from the start). A vCPU whose KVM_RUN does not return raises here, and nothing is
        unmapped or closed after it."""
        closing = self._begin_close()
        for v in list(self.vcpus):
            v.close()
        for g in list(self._gmems):
            g.close()
        self._gmems.clear()
        if closing:
            self.backend.close(self.fd)
            self._end_close()
        self.kvm._forget(self)

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["Memslot", "Vm"]
