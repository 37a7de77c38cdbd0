"""The model state machine's time budget (kvmpy.model.machine.run_machine), on the emulated KVM."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator

import pytest

from kvmpy.backend.emu import EmuBackend
from kvmpy.model import harness, machine
from kvmpy.system import Kvm
from kvmpy.uapi import VmType


@pytest.fixture
def kvm() -> Iterator[Kvm]:
    with Kvm(EmuBackend()) as k:
        yield k


def test_budget_bounds_the_run_and_reports_coverage(kvm: Kvm) -> None:
    stats: Counter[str] = Counter()
    t = time.monotonic()
    run = machine.run_machine(kvm, VmType.DEFAULT, stats, budget=2.0)
    took = time.monotonic() - t
    assert run.budget == 2.0 and run.examples >= 1 and stats
    # The example in progress at the deadline finishes; nothing starts after it.
    assert took < 2.0 + 10, (took, run)
    assert "budget" in run.stopped or "all" in run.stopped


def test_budget_is_a_third_of_the_per_test_timeout() -> None:
    assert machine.model_budget(60) == min(machine.BUDGET, 20)
    assert machine.model_budget(12) == 4
    assert machine.model_budget(None) == machine.BUDGET


def test_failure_found_after_the_deadline_is_reported(kvm: Kvm,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A sequence that fails is reported (not swallowed by the budget's rejections), even
    when hypothesis finds it after the deadline and replays it to shrink it."""
    orig = harness.ModelHarness.guest_read

    def bad(self: harness.ModelHarness, gpa: int) -> object:
        if gpa >= harness.GPA_BASE + 20 * 4096:        # deterministic per sequence
            raise harness.ModelMismatch("injected")
        return orig(self, gpa)

    monkeypatch.setattr(harness.ModelHarness, "guest_read", bad)
    with pytest.raises(harness.ModelMismatch, match="injected"):
        machine.run_machine(kvm, VmType.DEFAULT, Counter(), budget=0.2, shrink=True)
