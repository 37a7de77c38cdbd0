"""Model-based conversion testing: random sequences checked against kvmpy.model.

A hypothesis RuleBasedStateMachine drives random sequences of guest_memfd creation and close,
fallocate and punch-hole, memslot binding and deletion, KVM_SET_MEMORY_ATTRIBUTES, host writes to
shared memory and guest reads/writes (guests/model_access.c) against the backend, and
ModelHarness compares every observable with the reference model (kvmpy/model/state.py cites
api.rst for each rule): errnos, every host mapping byte for byte, and what each guest access
observes (memory, KVM_EXIT_MMIO, KVM_EXIT_MEMORY_FAULT).

A failing sequence is shrunk by hypothesis (on the emulated KVM; on real KVM with
KVMPY_MODEL_SHRINK=1), and the failure carries the sequence as a ready-to-paste pytest test
(kvmpy.model.repro.format_reproducer), as a note on the exception.

Budget: time, not a count (kvmpy.model.machine.run_machine), declared per backend
(machine.BUDGETS: 10 s on real KVM, 15 s on the emulated KVM; KVMPY_MODEL_BUDGET sets both) for
each VM type, capped at a third of the per-test timeout, so real KVM in a TCG VM (~10x slower)
runs fewer examples rather than running into the timeout; examples of at
most KVMPY_MODEL_STEPS steps (default 40), seeded 0, 1, 2, ... unless KVMPY_MODEL_RANDOM=1.
KVMPY_MODEL_EXAMPLES=N runs exactly N examples instead. The test prints how many examples ran
and what they covered.
On real KVM the sequences are restricted to what the kernel offers (probed, never the host):
no attributes without KVM_CAP_MEMORY_ATTRIBUTES, only the VM types in KVM_CAP_VM_TYPES, guest
accesses to a GUEST_MEMFD_FLAG_MMAP file only through its own mapping as userspace_addr; and the
model expects the known stale-MMIO-SPTE behaviour there (kvmpy.testing.known_issues).
"""

from __future__ import annotations

from collections import Counter

import pytest

from kvmpy.system import Kvm
from kvmpy.testing.require import require_vm_type
from kvmpy.uapi import VmType

pytestmark = pytest.mark.guest


def per_test_timeout(request: pytest.FixtureRequest) -> float | None:
    """pytest-timeout's limit for this test (its marker, else --timeout, else the ini value)."""
    m = request.node.get_closest_marker("timeout")
    if m is not None and m.args:
        return float(m.args[0])
    try:
        value = request.config.getoption("timeout") or request.config.getini("timeout")
    except ValueError:
        return None
    return float(value) if value else None


def test_model_statemachine(kvm: Kvm, vm_type: VmType, request: pytest.FixtureRequest) -> None:
    """Random sequences of guest_memfd / memslot / attribute / host and guest memory operations
    agree with the reference model on every observable (kvmpy/model/state.py, api.rst).
    ``vm_type`` is parametrized by selftests/conftest.py (default, sw_protected, ...)."""
    require_vm_type(kvm, vm_type)
    from kvmpy.model.machine import model_budget, run_machine  # hypothesis: not at collection

    stats: Counter[str] = Counter()
    timeout = per_test_timeout(request)
    budget = model_budget(timeout, kvm.backend.name)

    def reached_memory() -> bool:
        # A guest write that reached memory counts too: the harness compares every host mapping
        # with the model after it. (On 6.1 in a loaded TCG VM, 2 examples in the 40 s limit had
        # 9 such writes and no read of memory: a kernel without guest_memfd has only plain slots.)
        return sum(stats[f"guest_{op} -> Mem from {where}"]
                   for op in ("read", "write") for where in ("shared", "gmem")) > 0

    # Past the budget, a slow host goes on until the sequences reached guest memory, within
    # two thirds of the per-test timeout.
    run = run_machine(kvm, vm_type, stats, budget=None if run_uses_count() else budget,
                      until=reached_memory, limit=timeout * 2 / 3 if timeout else None)
    print(f"\n{kvm.backend.name} {vm_type.name}: {run.examples} examples in {run.seconds:.1f} s "
          f"(budget {run.budget if run.budget is not None else '-'} s; stopped: {run.stopped}); "
          + ", ".join(f"{k}: {v}" for k, v in sorted(stats.items())))
    request.node.user_properties.append(("model_examples", str(run.examples)))
    request.node.user_properties.append(("model_coverage", ", ".join(
        f"{k}: {v}" for k, v in sorted(stats.items()))))
    # The sequences must have reached guest memory, or they checked little.
    assert reached_memory(), stats


def run_uses_count() -> bool:
    from kvmpy.model import machine

    return machine.EXAMPLES_SET
