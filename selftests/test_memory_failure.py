"""Memory failure on a guest_memfd page: MADV_HWPOISON on a page of an MMAP|INIT_SHARED
guest_memfd, then host access, guest access, pre-fault and punch-hole.

No merged upstream selftest covers it (in-flight series do). Kernel paths, 7.3:
* mm/madvise.c madvise_inject_error() -> memory_failure(); the page cache folio goes to
  virt/kvm/guest_memfd.c kvm_gmem_error_folio(), which zaps KVM's mappings of it
  (kvm_gmem_invalidate_start/end) and returns MF_DELAYED: the poisoned folio stays in the file;
* a host access faults through kvm_gmem_fault_user_mapping(), which hands back the poisoned page,
  and mm's fault path turns that into VM_FAULT_HWPOISON: SIGBUS. The other pages are untouched;
* a guest access to the gfn: arch/x86/kvm/mmu/mmu.c kvm_mmu_faultin_pfn_gmem() ->
  kvm_gmem_get_pfn() -> __kvm_gmem_get_pfn() returns -EHWPOISON for a hwpoisoned folio, after
  kvm_mmu_prepare_memory_fault_exit(): KVM_RUN fails with EHWPOISON, exit_reason
  KVM_EXIT_MEMORY_FAULT naming the gfn (the slot is GMEM_ONLY, so shared accesses take the
  same path); KVM_PRE_FAULT_MEMORY of it fails with EHWPOISON as well (kvm_tdp_page_prefault());
* fallocate(PUNCH_HOLE) over the poisoned page (kvm_gmem_punch_hole() ->
  truncate_inode_pages_range()) drops the folio; the next fault allocates a fresh zeroed page,
  for a new host mapping and for the guest. A host mapping that existed at the failure keeps
  SIGBUSing at that address (its hwpoison PTE survives truncation), so it is not read again.
* memory_failure() itself logs "recovery action for dirty unevictable LRU page: Failed" on
  7.3 (the folio is still referenced after kvm_gmem_error_folio()'s MF_DELAYED): the error is
  contained all the same, which is what these tests pin.

Needs root (MADV_HWPOISON is CAP_SYS_ADMIN) and CONFIG_MEMORY_FAILURE (its sysctl
vm.memory_failure_recovery): each skip names the one missing. The private variant is not
possible here: a private guest_memfd page cannot be mapped by the host to inject the error.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import struct
from pathlib import Path

import pytest

from kvmpy.errors import KvmError
from kvmpy.guest import GuestVm
from kvmpy.guest.ucall import Ucall
from kvmpy.system import Kvm
from kvmpy.testing.child import run_in_child
from kvmpy.testing.errnos import expect_errno, memslot_accepts_guest_memfd
from kvmpy.testing.require import where
from kvmpy.testing.sigbus import touch
from kvmpy.uapi import PAGE_SIZE, Cap, ExitReason, GuestMemfdFlag, kvm_pre_fault_memory
from kvmpy.vm import Vm

from .conftest import require_gmem_flags

pytestmark = pytest.mark.guest

P = PAGE_SIZE
NPAGES = 4
POISONED = 1  # the page index poisoned
MADV_HWPOISON = 100
EHWPOISON = 133  # include/uapi/asm-generic/errno.h (Python's errno module lacks it)
MMAP_SHARED = int(GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED)
GPA = 1 << 32


def _require_memory_failure(kvm: Kvm) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"MADV_HWPOISON needs root (CAP_SYS_ADMIN); euid {os.geteuid()}")
    if kvm.backend.name == "emu":
        # The emulated KVM poisons its own guest_memfd pages (never host RAM), per profile.
        if not kvm.backend.profile.memory_failure:  # type: ignore[attr-defined]
            pytest.skip(f"CONFIG_MEMORY_FAILURE is off on {kvm.backend.describe()}")
        return
    knob = Path("/proc/sys/vm/memory_failure_recovery")
    if not knob.exists():
        pytest.skip(f"CONFIG_MEMORY_FAILURE is off on this host ({knob} absent)")


def _page(i: int) -> bytes:
    return bytes([0x40 + i]) * P


def _poison(kvm: Kvm, addr: int) -> None:
    """MADV_HWPOISON from a forked child: memory_failure() with MF_ACTION_REQUIRED kills the
    task that injects (mm/memory-failure.c kill_procs(): BUS_MCEERR_AR to current), so the
    child may die of SIGBUS; other processes mapping the page are left alone unless
    vm.memory_failure_early_kill is set."""
    def inject() -> str:
        faulthandler.disable()
        signal.signal(signal.SIGBUS, signal.SIG_DFL)
        kvm.backend.madvise(addr, P, MADV_HWPOISON)
        return "madvise returned"

    out = run_in_child(inject, timeout=30.0)
    assert out.ok or out.signal == signal.SIGBUS, \
        f"madvise({addr:#x}, {P:#x}, MADV_HWPOISON) in a child: {out.describe()}"


def test_hwpoison_host_access(kvm: Kvm, gmem_vm: Vm) -> None:
    """Host view: the poisoned page SIGBUSes (read and write), the other pages keep their bytes,
    i_size stays; after PUNCH_HOLE the page faults back in zeroed and writable."""
    _require_memory_failure(kvm)
    require_gmem_flags(gmem_vm, MMAP_SHARED)
    g = gmem_vm.create_guest_memfd(NPAGES * P, MMAP_SHARED)
    m = g.mmap()
    for i in range(NPAGES):
        m.write(i * P, _page(i))
    bad = m.addr + POISONED * P
    _poison(kvm, bad)
    for write in (False, True):
        r = touch(bad, P, write=write)
        assert r.sigbus and r.faulted_at == 0, \
            f"{'write' if write else 'read'} of the hwpoisoned page: {r.describe()}; expected SIGBUS"
    for i in range(NPAGES):
        if i != POISONED:
            assert m.read(i * P, P) == _page(i), f"page {i} changed after page {POISONED} was poisoned"
    assert g.fstat().st_size == NPAGES * P
    g.punch_hole(POISONED * P, P)
    # The mapping that had the page keeps a hwpoison entry at that address even after the
    # punch (truncation does not zap hwpoison PTEs: mm/memory.c zap_nonpresent_ptes() with
    # even_cows false): observed on 7.3 as SIGBUS in this process. It is unmapped unread;
    # a new mapping faults the fresh page.
    m.close()
    again = g.mmap()
    r = touch(again.addr + POISONED * P, P, write=False)
    assert r.completed, f"read of the punched, formerly poisoned page: {r.describe()}"
    assert again.read(POISONED * P, P) == b"\0" * P, "the re-faulted page is not zero"
    again.write(POISONED * P, _page(9))
    assert again.read(POISONED * P, P) == _page(9)
    for i in range(NPAGES):
        if i != POISONED:
            assert again.read(i * P, P) == _page(i), f"page {i} changed after the punch"


def test_hwpoison_guest_access(kvm: Kvm) -> None:
    """Guest view (DEFAULT VM, GMEM_ONLY slot): reading the poisoned gfn makes KVM_RUN fail with
    EHWPOISON and a KVM_EXIT_MEMORY_FAULT for that gfn; KVM_PRE_FAULT_MEMORY of it fails the
    same (where offered); another gfn reads fine; after PUNCH_HOLE the guest reads 0. On the
    emulated KVM the vCPU runs in this process and would take the SIGBUS itself, so the case
    runs in a forked child there (kvmpy/testing/child.py)."""
    _require_memory_failure(kvm)
    if kvm.backend.name != "emu":
        _guest_case(kvm)
        return
    out = run_in_child(lambda: _guest_case(kvm), timeout=120.0)
    assert out.ok, f"the guest case in a child: {out.describe()}"


def _guest_case(kvm: Kvm) -> None:
    with GuestVm(kvm, "smoke", timeout=60.0) as g:
        require_gmem_flags(g.vm, MMAP_SHARED)
        if not memslot_accepts_guest_memfd(g.vm):
            pytest.skip(f"KVM_MEM_GUEST_MEMFD memslots not accepted on {where(g.vm)}")
        r = g.add_memory(NPAGES * P, gpa=GPA, gmem=True, gmem_flags=MMAP_SHARED, shared="gmem")
        assert r.gmem is not None and r.gmem_map is not None
        for i in range(NPAGES):
            r.gmem_map.write(i * P, _page(i))
        _poison(kvm, r.gmem_map.addr + POISONED * P)
        bad_gpa = GPA + POISONED * P

        vcpu = g.vcpu("guest_read_addr", bad_gpa)
        try:
            out = g.run(vcpu)
            raise AssertionError(f"guest read of the hwpoisoned gfn {bad_gpa:#x} on "
                                 f"{where(g.vm)}: {out}, expected KVM_RUN to fail EHWPOISON")
        except KvmError as e:
            assert e.errno == EHWPOISON, f"KVM_RUN failed {e}, expected EHWPOISON"
        run = vcpu.run_struct
        assert run.exit_reason == ExitReason.MEMORY_FAULT, \
            f"exit_reason {run.exit_reason} with EHWPOISON, expected KVM_EXIT_MEMORY_FAULT"
        mf = run.exit.memory_fault
        assert (mf.gpa, mf.size) == (bad_gpa, P), \
            f"memory_fault gpa {mf.gpa:#x} size {mf.size:#x}, expected {bad_gpa:#x} {P:#x}"

        if g.vm.check_extension(Cap.PRE_FAULT_MEMORY):
            other = g.vcpu("guest_read_addr", GPA)
            pf = kvm_pre_fault_memory(gpa=bad_gpa, size=P)
            expect_errno(other.try_pre_fault_memory(pf), EHWPOISON, "the poisoned gfn")
        good = g.vcpu("guest_read_addr", GPA + 2 * P)
        uc = g.run(good)
        want = struct.unpack("<Q", _page(2)[:8])[0]
        assert isinstance(uc, Ucall) and uc.args[0] == want, f"read of gfn 2: {uc}"

        r.gmem.punch_hole(POISONED * P, P)
        uc = g.run(vcpu)
        assert isinstance(uc, Ucall) and uc.args[0] == 0, \
            f"the guest's re-read after PUNCH_HOLE: {uc}, expected SYNC(0)"
