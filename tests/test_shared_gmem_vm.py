"""selftests/conftest.py's shared_gmem_vm: a module with SHARED_GMEM_VM = True runs its gmem_vm
cases on one VM per VM type; each case's guest_memfds are closed after it, and a case that
leaves memslots (or closes the VM) gets the VM replaced for the next case."""

from __future__ import annotations

from pathlib import Path

import pytest

SELFTESTS = Path(__file__).resolve().parent.parent / "selftests"

CASES = """
from kvmpy.memory import SharedMemory
from kvmpy.uapi import VmType

SHARED_GMEM_VM = True
SEEN = []

def test_a(gmem_vm, vm_type):
    if vm_type != VmType.SW_PROTECTED:
        return
    assert gmem_vm.guest_memfds == ()
    SEEN.append(gmem_vm)
    gmem_vm.create_guest_memfd(4096)

def test_b_same_vm_no_gmems_left(gmem_vm, vm_type):
    if vm_type != VmType.SW_PROTECTED:
        return
    assert gmem_vm is SEEN[0] and gmem_vm.guest_memfds == ()
    shm = SharedMemory(gmem_vm.backend, 4096)
    gmem_vm.set_user_memory_region(1, 0, 1 << 32, 4096, shm.addr)
    SEEN.append(shm)

def test_c_replaced_after_memslots(gmem_vm, vm_type):
    if vm_type != VmType.SW_PROTECTED:
        return
    SEEN[1].close()
    assert gmem_vm is not SEEN[0] and SEEN[0].closed and not gmem_vm.memslots
"""


def test_shared_gmem_vm(pytester: pytest.Pytester) -> None:
    pytester.makeconftest((SELFTESTS / "conftest.py").read_text())
    pytester.makepyfile(test_shared=CASES)
    r = pytester.runpytest_subprocess("-p", "kvmpy.testing.plugin", "--backend", "emu",
                                      "-p", "no:cacheprovider", "-p", "no:xdist", "-v")
    r.assert_outcomes(passed=6)
