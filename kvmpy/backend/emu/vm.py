"""The emulated VM: memslots, memory attributes, guest_memfds, enabled caps, vCPUs.

This is the object the vCPU side (vcpu.py) resolves guest-physical memory through; see
notes in docs/emulator.md. Everything here runs under ``lock``; ``invalidate`` is called after
every change that makes KVM zap SPTEs (memslot changes, attribute changes, guest_memfd
punch-holes), and tells every vCPU to drop its mappings of that GPA range.
"""

from __future__ import annotations

import contextlib
import errno
import threading
from collections.abc import Callable, Iterator
from typing import Protocol

from ...uapi import (
    PAGE_SHIFT,
    PAGE_SIZE,
    Cap,
    ExitReason,
    GuestMemfdFlag,
    MemoryAttribute,
    MemoryExitFlag,
    kvm_run,
)
from .attributes import AttributeMap
from .dispatch import CopyIn, CopyOut
from .gmem import EmuGmem
from .memslots import EmuMemslot, MemslotTable, RegionArgs, is_private_vm, set_memory_region
from .profiles import KVM_MAX_VCPU_IDS, Profile

KVM_MIN_ALLOC_MMU_PAGES = 64
# Plain ints for the hot paths (Enum member access and IntFlag operators are slow).
ATTR_PRIVATE = int(MemoryAttribute.PRIVATE)
CAP_EXIT_HYPERCALL = int(Cap.EXIT_HYPERCALL)
CAP_PRE_FAULT_MEMORY = int(Cap.PRE_FAULT_MEMORY)
CAP_MAX_VCPUS = int(Cap.MAX_VCPUS)
CAP_DISABLE_QUIRKS2 = int(Cap.DISABLE_QUIRKS2)
EHWPOISON = 133  # include/uapi/asm-generic/errno.h
CAP_MULTI_ADDRESS_SPACE = int(Cap.MULTI_ADDRESS_SPACE)


class VcpuLike(Protocol):
    """What the core needs from emu-vcpu's EmuVcpu (docs: emu-contract)."""

    def ioctl(self, request: int, arg: int, cin: CopyIn = ..., cout: CopyOut = ...) -> int: ...
    def invalidate(self, gpa_lo: int, gpa_hi: int) -> None: ...
    def invalidate_hva(self, lo: int, hi: int, wait: bool = True) -> None: ...
    def kick(self) -> None: ...
    def close(self) -> None: ...


class EmuVm:
    """One KVM_CREATE_VM instance.

    Public attributes used by the vCPU side: ``lock``, ``type``, ``profile``,
    ``exit_hypercall_mask``, ``vcpus``, ``memory_version``, ``memslots``, ``irqchip``;
    methods ``find_memslot``, ``is_private``, ``invalidate``.
    """

    @property
    def nr_address_spaces(self) -> int:
        """kvm_arch_nr_memslot_as_ids(): the profile's KVM_CAP_MULTI_ADDRESS_SPACE on this VM
        (x86 with CONFIG_KVM_SMM: 2, or 1 for a VM with private memory); a kernel without
        the capability has one address space."""
        return max(1, self.profile.cap(CAP_MULTI_ADDRESS_SPACE, self.type))

    def __init__(self, vm_type: int, profile: Profile,
                 gmem_lookup: Callable[[int], EmuGmem | None]) -> None:
        self.lock = threading.RLock()
        self.type = vm_type
        self.profile = profile
        self.exit_hypercall_mask = 0
        #: kvm->arch.disabled_quirks (KVM_CAP_DISABLE_QUIRKS2). FIX_HYPERCALL_INSN (#UD for the
        #: other vendor's hypercall) and OUT_7E_INC_RIP (exits.py, vcpu.py) act on it; the one
        #: with a memory effect, SLOT_ZAP_ALL, decides whether deleting/moving a slot zaps all SPTEs
        #: (kvm_mmu_zap_all_fast()) or the slot's (kvm_mmu_zap_memslot()); the emulator's
        #: invalidation is exact either way, which differs from a zap-all only in cost.
        self.disabled_quirks = 0
        self.vcpus: list[VcpuLike] = []
        self.vcpu_ids: set[int] = set()
        self.created_vcpus = 0
        self.memory_version = 0
        self.memslots = MemslotTable()
        #: The address-space-0 memslot containing a gpa (the table's ``find``).
        self.find_memslot = self.memslots.find
        self.attributes = AttributeMap()
        self.irqchip = False
        self.nr_mmu_pages = 0
        self.tss_addr: int | None = None
        #: Host ranges being unmapped through the backend (host_unmapping()): slot maps built
        #: meanwhile treat them as gone, as KVM's faults retry while mmu_invalidate_in_progress.
        self.hva_unmapping: list[tuple[int, int]] = []
        self._gmem_lookup = gmem_lookup

    def __repr__(self) -> str:
        return f"<EmuVm type {self.type} profile {self.profile.name}>"

    # --- lookups for the vCPU side -------------------------------------------------------------
    def is_private(self, gpa: int) -> bool:
        """KVM_MEMORY_ATTRIBUTE_PRIVATE set on the gfn of ``gpa`` (kvm_mem_is_private())."""
        return self.attributes.is_private(gpa >> PAGE_SHIFT)

    def invalidate(self, gpa_lo: int, gpa_hi: int) -> None:
        """Zap [gpa_lo, gpa_hi) in every vCPU (what KVM's MMU invalidation does)."""
        with self.lock:
            self.memory_version += 1
            vcpus = list(self.vcpus)
        for v in vcpus:
            v.invalidate(gpa_lo, gpa_hi)

    @contextlib.contextmanager
    def host_unmapping(self, lo: int, hi: int) -> Iterator[None]:
        """Around an munmap of host range [lo, hi): KVM's MMU notifier
        (virt/kvm/kvm_main.c kvm_mmu_notifier_invalidate_range_start()/_end()). Every vCPU drops
        its mappings of slots over the range before the pages go, waiting for one running in
        another thread (its engine holds raw pointers into direct slots); afterwards the next
        access re-resolves the gfn, finds no host page and KVM_RUN fails with EFAULT
        (arch/x86/kvm/mmu/mmu.c kvm_handle_error_pfn(): -EFAULT for KVM_PFN_ERR_FAULT)."""
        with self.lock:
            if not any(s.userspace_addr and s.userspace_addr < hi and
                       lo < s.userspace_addr + s.size for s in self.memslots.values()):
                vcpus: list[VcpuLike] = []
            else:
                self.hva_unmapping.append((lo, hi))
                self.memory_version += 1
                vcpus = list(self.vcpus)
        if not vcpus:
            # No slot over the range (or no vCPU to have mapped it): nothing to zap. A slot
            # created later over the range reads the host mappings then.
            yield
            return
        try:
            for v in vcpus:
                v.invalidate_hva(lo, hi)
            yield
        finally:
            with self.lock:
                self.hva_unmapping.remove((lo, hi))
            # invalidate_range_end(): maps built meanwhile saw the range as gone; rebuild them
            # from the host mappings as they are now (the munmap may have failed).
            for v in vcpus:
                v.invalidate_hva(lo, hi, wait=False)

    # --- memslots ------------------------------------------------------------------------------
    def backend_gmem(self, fd: int) -> EmuGmem | None:
        return self._gmem_lookup(fd)

    def set_memory_region(self, r: RegionArgs, v2: bool) -> None:
        with self.lock:
            set_memory_region(self, r, v2)

    def unbind_gmem(self, gmem: EmuGmem) -> None:
        """kvm_gmem_release(): bound slots keep their flags but lose the file."""
        for key, s in list(gmem.bindings.items()):
            new = EmuMemslot(s.slot, s.as_id, s.flags, s.gpa, s.size, s.userspace_addr,
                             None, s.gmem_offset)
            old = self.memslots.get(key)
            if old is s:
                self.memslots.remove(old)
                self.memslots.add(new)
            self.invalidate(s.gpa, s.end)
        gmem.bindings.clear()

    # --- memory attributes -----------------------------------------------------------------------
    def supported_attributes(self) -> int:
        """kvm_supported_mem_attributes(): PRIVATE for VMs with private memory."""
        return ATTR_PRIVATE if is_private_vm(self.type) else 0

    def set_memory_attributes(self, address: int, size: int, attributes: int,
                              flags: int) -> None:
        """kvm_vm_ioctl_set_mem_attributes() (api.rst 4.140 KVM_SET_MEMORY_ATTRIBUTES)."""
        if not self.profile.memory_attributes_ioctl:
            raise OSError(errno.ENOTTY, "KVM_SET_MEMORY_ATTRIBUTES is not built in this kernel")
        if flags:
            raise OSError(errno.EINVAL, "flags must be 0")
        if attributes & ~self.supported_attributes():
            raise OSError(errno.EINVAL, f"attributes {attributes:#x} not supported by VM type "
                                        f"{self.type}")
        if size == 0 or address + size >= 1 << 64:
            raise OSError(errno.EINVAL, "size 0 or address + size wraps")
        if address % PAGE_SIZE or size % PAGE_SIZE:
            raise OSError(errno.EINVAL, "address/size not page aligned")
        start, end = address >> PAGE_SHIFT, (address + size) >> PAGE_SHIFT
        private = bool(attributes & ATTR_PRIVATE)
        with self.lock:
            if self.attributes.all_equal(start, end, private):
                return
            self.attributes.set(start, end, private)
            self.invalidate(address, address + size)

    # --- guest_memfd ---------------------------------------------------------------------------
    def create_gmem(self, size: int, flags: int) -> EmuGmem:
        """kvm_gmem_create() (api.rst 4.141): flags within the supported set, size > 0 and page
        aligned (size is a loff_t: values with bit 63 set are negative)."""
        valid = self.profile.gmem_flags.get(self.type, 0)
        if flags & ~valid:
            raise OSError(errno.EINVAL, f"guest_memfd flags {flags:#x} not in {valid:#x}")
        if size == 0 or size >= 1 << 63 or size % PAGE_SIZE:
            raise OSError(errno.EINVAL, f"guest_memfd size {size:#x} not > 0 and page aligned")
        return EmuGmem(self, size, flags)

    # --- caps ----------------------------------------------------------------------------------
    def check_extension(self, cap: int) -> int:
        return self.profile.cap(cap, self.type)

    def enable_cap(self, cap: int, flags: int, args: list[int]) -> None:
        """kvm_vm_ioctl_enable_cap() on x86: KVM_CAP_EXIT_HYPERCALL (api.rst 7.37: args[0]
        is a mask of hypercalls that exit, within the cap's value) and KVM_CAP_DISABLE_QUIRKS2
        (EINVAL for a bit outside kvm_caps.supported_quirks; bits accumulate)."""
        if flags:
            raise OSError(errno.EINVAL, "KVM_ENABLE_CAP flags must be 0")
        if cap == CAP_DISABLE_QUIRKS2 and self.check_extension(CAP_DISABLE_QUIRKS2):
            valid = self.check_extension(CAP_DISABLE_QUIRKS2)
            if args[0] & ~valid:
                raise OSError(errno.EINVAL, f"KVM_CAP_DISABLE_QUIRKS2 quirks {args[0]:#x} "
                                            f"outside {valid:#x}")
            with self.lock:
                self.disabled_quirks |= args[0]
            return
        if cap == CAP_EXIT_HYPERCALL and self.check_extension(CAP_EXIT_HYPERCALL):
            valid = self.check_extension(CAP_EXIT_HYPERCALL)
            if args[0] & ~valid:
                raise OSError(errno.EINVAL, f"KVM_CAP_EXIT_HYPERCALL mask {args[0]:#x} "
                                            f"outside {valid:#x}")
            with self.lock:
                self.exit_hypercall_mask = args[0]
            return
        raise OSError(errno.EINVAL, f"KVM_ENABLE_CAP({cap}) is not supported on this VM")

    # --- small VM ioctls -----------------------------------------------------------------------
    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP: EEXIST twice, EINVAL once vCPUs exist. Recorded only: the
        in-kernel LAPIC/IOAPIC/PIC are not emulated (docs/emulator.md)."""
        with self.lock:
            if self.irqchip:
                raise OSError(errno.EEXIST, "irqchip already created")
            if self.created_vcpus:
                raise OSError(errno.EINVAL, "irqchip must be created before vCPUs")
            self.irqchip = True

    def set_nr_mmu_pages(self, n: int) -> None:
        if n < KVM_MIN_ALLOC_MMU_PAGES:
            raise OSError(errno.EINVAL, f"KVM_SET_NR_MMU_PAGES {n} < {KVM_MIN_ALLOC_MMU_PAGES}")
        self.nr_mmu_pages = n

    def set_tss_addr(self, addr: int) -> None:
        if addr > (1 << 32) - 3 * PAGE_SIZE:
            raise OSError(errno.EINVAL, "TSS address must leave 3 pages below 4 GiB")
        self.tss_addr = addr

    def reserve_vcpu_id(self, vcpu_id: int) -> None:
        """kvm_vm_ioctl_create_vcpu()'s checks, before the vCPU object exists."""
        with self.lock:
            if vcpu_id >= KVM_MAX_VCPU_IDS:
                raise OSError(errno.EINVAL, f"vcpu id {vcpu_id} >= KVM_MAX_VCPU_IDS")
            if self.created_vcpus >= self.profile.cap(CAP_MAX_VCPUS):
                raise OSError(errno.EINVAL, "KVM_CAP_MAX_VCPUS reached")
            if vcpu_id in self.vcpu_ids:
                raise OSError(errno.EEXIST, f"vcpu id {vcpu_id} exists")
            self.vcpu_ids.add(vcpu_id)
            self.created_vcpus += 1

    def release_vcpu_id(self, vcpu_id: int) -> None:
        with self.lock:
            self.vcpu_ids.discard(vcpu_id)
            self.created_vcpus -= 1

    # --- KVM_PRE_FAULT_MEMORY ----------------------------------------------------------------
    def pre_fault(self, gpa: int, size: int, flags: int,
                  run_addr: int = 0) -> tuple[int, int, int]:
        """kvm_vcpu_pre_fault_memory() + kvm_arch_vcpu_pre_fault_memory() (api.rst 4.143).

        Returns (errno or 0, gpa, size): the range is advanced past every page mapped; success
        if at least one page was. ENOENT where no memslot covers the GPA, EFAULT (with a
        KVM_EXIT_MEMORY_FAULT in kvm_run) for a private gfn whose slot has no guest_memfd.
        Private pages are allocated in the guest_memfd, as kvm_gmem_get_pfn() does.
        """
        if flags:
            return errno.EINVAL, gpa, size
        if gpa % PAGE_SIZE or size % PAGE_SIZE or size == 0 or gpa + size >= 1 << 64:
            return errno.EINVAL, gpa, size
        if not self.check_extension(CAP_PRE_FAULT_MEMORY):
            return self.profile.pre_fault_absent_errno, gpa, size
        full = size
        err = 0
        with self.lock:
            while size:
                slot = self.find_memslot(gpa)
                if slot is None:
                    err = errno.ENOENT
                    break
                end = min(gpa + size, slot.end)
                private = False
                if is_private_vm(self.type):
                    gfn = gpa >> PAGE_SHIFT
                    private = self.attributes.is_private(gfn)
                    nb = self.attributes.next_boundary(gfn)
                    if nb is not None:
                        end = min(end, nb << PAGE_SHIFT)
                g = slot.gmem
                # A GMEM_ONLY slot (guest_memfd with MMAP) serves shared gfns from the file too.
                if private or (g is not None and g.flags & GuestMemfdFlag.MMAP):
                    if g is None:
                        self._memory_fault(run_addr, gpa)
                        err = errno.EFAULT
                        break
                    off = slot.gmem_offset + gpa - slot.gpa
                    bad = [p for p in g.poisoned()
                           if off <= p * PAGE_SIZE < off + end - gpa]
                    if bad:
                        # __kvm_gmem_get_pfn(): -EHWPOISON; the pages before it are mapped.
                        end = gpa + min(bad) * PAGE_SIZE - off
                        if end == gpa:
                            self._memory_fault(run_addr, gpa, MemoryExitFlag.PRIVATE
                                               if private else 0)
                            err = EHWPOISON
                            break
                    g.allocate(off, end - gpa)
                size -= end - gpa
                gpa = end
        if err and size == full:
            return err, gpa, size
        return 0, gpa, size

    @staticmethod
    def _memory_fault(run_addr: int, gpa: int,
                      flags: int = int(MemoryExitFlag.PRIVATE)) -> None:
        """kvm_mmu_prepare_memory_fault_exit(): fill kvm_run for the fault."""
        if not run_addr:
            return
        run = kvm_run.from_address(run_addr)
        run.exit_reason = ExitReason.MEMORY_FAULT
        run.exit.memory_fault.flags = flags
        run.exit.memory_fault.gpa = gpa & ~(PAGE_SIZE - 1)
        run.exit.memory_fault.size = PAGE_SIZE


__all__ = ["EmuMemslot", "EmuVm", "VcpuLike"]
