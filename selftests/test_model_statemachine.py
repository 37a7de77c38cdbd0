"""Model-based conversion testing: random sequences checked against kvmpy.model.

A hypothesis RuleBasedStateMachine drives random sequences of guest_memfd creation and close,
fallocate and punch-hole, memslot binding and deletion, KVM_SET_MEMORY_ATTRIBUTES, host writes to
shared memory and guest reads/writes (guests/model_access.c) against the backend, and
ModelHarness compares every observable with the reference model (kvmpy/model/state.py cites
api.rst for each rule): errnos, every host mapping byte for byte, and what each guest access
observes (memory, KVM_EXIT_MMIO, KVM_EXIT_MEMORY_FAULT).

A failing sequence is shrunk by hypothesis, and the failure carries the minimal sequence as a
ready-to-paste pytest test (kvmpy.model.repro.format_reproducer), as a note on the exception.

Budget: KVMPY_MODEL_EXAMPLES examples (default 12) of at most KVMPY_MODEL_STEPS steps (default
40) per (backend, VM type); derandomized (same sequences every run) unless KVMPY_MODEL_RANDOM=1.
On real KVM the sequences are restricted to what the kernel offers (probed, never the host):
no attributes without KVM_CAP_MEMORY_ATTRIBUTES, only the VM types in KVM_CAP_VM_TYPES, guest
accesses to a GUEST_MEMFD_FLAG_MMAP file only through its own mapping as userspace_addr.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis.stateful import run_state_machine_as_test

from kvmpy.model.machine import machine_settings, make_machine
from kvmpy.system import Kvm
from kvmpy.testing.require import require_vm_type
from kvmpy.uapi import VmType

pytestmark = pytest.mark.guest


def test_model_statemachine(kvm: Kvm, vm_type: VmType) -> None:
    """Random sequences of guest_memfd / memslot / attribute / host and guest memory operations
    agree with the reference model on every observable (kvmpy/model/state.py, api.rst).
    ``vm_type`` is parametrized by selftests/conftest.py (default, sw_protected, ...)."""
    require_vm_type(kvm, vm_type)
    stats: Counter[str] = Counter()
    run_state_machine_as_test(make_machine(kvm, vm_type, stats), settings=machine_settings())
    print(f"\n{kvm.backend.name} {vm_type.name}: " +
          ", ".join(f"{k}: {v}" for k, v in sorted(stats.items())))
    # The sequences must have reached guest memory, or they checked little.
    assert stats["guest_read -> Mem from shared"] + stats["guest_read -> Mem from gmem"] > 0, stats
