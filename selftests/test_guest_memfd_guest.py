"""guest_memfd_test's test_guest_memfd_guest (tools/testing/selftests/kvm/guest_memfd_test.c).

Guest: guests/guest_memfd_guest.c. A MMAP|INIT_SHARED guest_memfd bound as a memslot with
userspace_addr NULL (KVM_SET_USER_MEMORY_REGION2, slot 1, gpa 4 GiB, one page): the host fills it
with 0xaa through a mapping it then unmaps, the guest checks every byte and writes 0xff, and the
host sees 0xff through a fresh mapping (Documentation/virt/kvm/api.rst 4.141
KVM_CREATE_GUEST_MEMFD: GUEST_MEMFD_FLAG_MMAP, GUEST_MEMFD_FLAG_INIT_SHARED; a slot whose
guest_memfd can be mmap'd is served from the guest_memfd for shared accesses).

The expectation follows observable facts, not the host's name: where KVM's instruction
emulator runs the guest (the vCPU stat insn_emulation grows with every guest instruction, as
with kvm_pvm and a guest that is not PVM-aware), the emulator reaches guest memory through
userspace_addr, which is NULL here, so the first guest read becomes KVM_EXIT_MMIO at the slot's
gpa and the guest_memfd keeps 0xaa. Everywhere else the upstream result must hold.
(test_guest_smoke.py covers the variant with userspace_addr = the guest_memfd's own mapping.)
"""

from __future__ import annotations

import pytest

from kvmpy.guest import GuestVm, UcallCmd
from kvmpy.system import Kvm
from kvmpy.testing.private_mem import guest_accesses_emulated
from kvmpy.testing.require import require_cap, where
from kvmpy.uapi import PAGE_SIZE, Cap, ExitReason, GuestMemfdFlag, MemFlag, VmType
from kvmpy.vcpu import Exit

pytestmark = pytest.mark.guest

MMAP_SHARED = GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED
GMEM_GPA = 1 << 32
GMEM_SLOT = 1


def test_guest_memfd_guest(kvm: Kvm) -> None:
    """A guest reads and writes a guest_memfd-only memslot (userspace_addr NULL)."""
    with GuestVm(kvm, "guest_memfd_guest", vm_type=VmType.DEFAULT, timeout=60.0) as g:
        # The C test asserts the default VM offers both flags once GUEST_MEMFD_FLAGS exists.
        require_cap(g.vm, Cap.GUEST_MEMFD)
        require_cap(g.vm, Cap.GUEST_MEMFD_FLAGS, int(MMAP_SHARED))
        emulated, fact = guest_accesses_emulated(g, "guest_sync_once")
        print(f"how KVM reaches this guest's memory: {fact}")

        gmem = g.vm.create_guest_memfd(PAGE_SIZE, MMAP_SHARED)
        g.vm.set_user_memory_region2(GMEM_SLOT, MemFlag.GUEST_MEMFD, GMEM_GPA, PAGE_SIZE, 0,
                                     gmem, 0)
        with gmem.mmap(PAGE_SIZE) as m:
            m.fill(0, PAGE_SIZE, 0xAA)
        g.map(GMEM_GPA, GMEM_GPA, PAGE_SIZE)
        vcpu = g.vcpu("guest_check_aa_write_ff", GMEM_GPA, PAGE_SIZE)
        r = g.run(vcpu)
        with gmem.mmap(PAGE_SIZE) as m:
            seen = m.read(0, PAGE_SIZE)
        if emulated:
            assert isinstance(r, Exit) and r.reason == ExitReason.MMIO, \
                f"{fact}: the emulated guest reaches memory through userspace_addr (NULL), " \
                f"so its first read must be KVM_EXIT_MMIO; got {r}"
            assert r.mmio is not None
            assert (r.mmio.phys_addr, r.mmio.is_write, r.mmio.len) == (GMEM_GPA, False, 1), r
            assert seen == b"\xaa" * PAGE_SIZE, "an MMIO read must not change the guest_memfd"
        else:
            assert not isinstance(r, Exit), \
                f"{fact}: a guest_memfd-only slot on {where(g.vm)} must be served from the " \
                f"guest_memfd, got {r}"
            assert r.cmd == UcallCmd.DONE, r
            assert seen == b"\xff" * PAGE_SIZE, \
                f"the guest's 0xff writes are not in the guest_memfd: first bytes {seen[:8]!r}"
