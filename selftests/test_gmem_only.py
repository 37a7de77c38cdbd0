"""KVM_MEMSLOT_GMEM_ONLY: a slot bound to an MMAP guest_memfd is served from the guest_memfd,
whatever its userspace_addr points at.

No upstream selftest binds such a slot with userspace_addr at *different* memory
(guest_memfd_test's test_guest_memfd_guest passes NULL). virt/kvm/guest_memfd.c kvm_gmem_bind()
(7.3) sets KVM_MEMSLOT_GMEM_ONLY when the guest_memfd was created with GUEST_MEMFD_FLAG_MMAP, and
arch/x86/kvm/mmu/mmu.c __kvm_mmu_faultin_pfn() / kvm_mmu_max_mapping_level() take the pfn from
the guest_memfd (kvm_mmu_faultin_pfn_gmem()) for every fault on such a slot, private or not
(kvm_memslot_is_gmem_only()). Guest: guests/guest_memfd_guest.c guest_check_aa_write_ff. The
guest_memfd holds 0xaa, the buffer at userspace_addr 0x11: the guest must read 0xaa, and its 0xff
writes land in the guest_memfd while the buffer keeps 0x11.

Where KVM's instruction emulator runs the guest (the insn_emulation vCPU stat grows with every
guest instruction, kvm_pvm with a guest that is not PVM-aware), guest memory is reached through
the slot's hva (kvm_vcpu_read_guest() via __gfn_to_hva_memslot()), i.e. the buffer: that is
pinned as observed, as in test_guest_memfd_guest.py (docs/guests.md "Known limits").
"""

from __future__ import annotations

import pytest

from kvmpy.guest import GuestAssertionError, GuestVm, UcallCmd
from kvmpy.system import Kvm
from kvmpy.testing.errnos import memslot_accepts_guest_memfd
from kvmpy.testing.private_mem import guest_accesses_emulated
from kvmpy.testing.require import where
from kvmpy.uapi import PAGE_SIZE, GuestMemfdFlag

from .conftest import require_gmem_flags

pytestmark = pytest.mark.guest

MMAP_SHARED = int(GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED)
GPA = 1 << 32
SIZE = 2 * PAGE_SIZE


def test_gmem_only_ignores_userspace_addr(kvm: Kvm, vm_type: int, make_vm: object) -> None:
    """The guest reads the guest_memfd's 0xaa, not the userspace_addr buffer's 0x11, and writes
    into the guest_memfd only (KVM_MEMSLOT_GMEM_ONLY, kvm_gmem_bind())."""
    with GuestVm(kvm, "guest_memfd_guest", vm_type=vm_type, timeout=60.0) as g:
        require_gmem_flags(g.vm, MMAP_SHARED)
        if not memslot_accepts_guest_memfd(g.vm):
            pytest.skip(f"KVM_MEM_GUEST_MEMFD memslots not accepted on {where(g.vm)}")
        emulated, fact = guest_accesses_emulated(g, "guest_sync_once")
        print(f"how KVM reaches this guest's memory: {fact}")
        r = g.add_memory(SIZE, gpa=GPA, gmem=True, gmem_flags=MMAP_SHARED, shared="backing")
        assert r.backing is not None and r.gmem_map is not None
        buf, gm = r.backing.mapping, r.gmem_map
        assert r.userspace_addr == buf.addr != gm.addr
        buf.fill(0, SIZE, 0x11)
        gm.fill(0, SIZE, 0xAA)
        vcpu = g.vcpu("guest_check_aa_write_ff", GPA, SIZE)
        if emulated:
            with pytest.raises(GuestAssertionError, match="is 0x11, not 0xaa"):
                g.run(vcpu)
            assert gm.read(0, SIZE) == b"\xaa" * SIZE, "the guest_memfd changed"
            return
        uc = g.run(vcpu)
        assert getattr(uc, "cmd", None) == UcallCmd.DONE, \
            f"{fact}: expected the guest to read the guest_memfd and finish, got {uc}"
        assert gm.read(0, SIZE) == b"\xff" * SIZE, "the guest's 0xff is not in the guest_memfd"
        assert buf.read(0, SIZE) == b"\x11" * SIZE, \
            "the guest wrote the userspace_addr buffer of a GMEM_ONLY slot"
