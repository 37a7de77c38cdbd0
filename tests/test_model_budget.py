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


def test_budget_is_declared_per_backend_and_a_third_of_the_per_test_timeout() -> None:
    for backend in ("kvm", "emu"):
        budget = machine.backend_budget(backend)
        assert budget == machine.BUDGETS[backend] or machine._BUDGET_ENV
        assert machine.model_budget(60, backend) == min(budget, 20)
        assert machine.model_budget(12, backend) == min(budget, 4)
        assert machine.model_budget(None, backend) == budget


def test_a_run_stays_near_its_budget(kvm: Kvm, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks fit half of what is left of the budget: when later examples cost more than the
    ones measured so far (longer sequences, a loaded host), the run still ends near its budget.
    A fake clock; each example costs 0.1 s more than the one before."""
    clock = [0.0]
    ran: list[int] = []

    def fake_run(factory: object, settings: object) -> None:
        n = settings.max_examples  # type: ignore[attr-defined]
        for _ in range(n):
            clock[0] += 0.1 * (len(ran) + 1)
            ran.append(n)

    monkeypatch.setattr(machine, "run_state_machine_as_test", fake_run)
    monkeypatch.setattr(machine.time, "monotonic", lambda: clock[0])
    run = machine.run_machine(kvm, VmType.DEFAULT, Counter(), budget=10.0)
    assert run.examples == len(ran) >= 8 and run.seconds <= 10.0 * 1.25, (run, ran)


def test_a_slow_first_chunk_does_not_end_the_run(kvm: Kvm,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The first chunk carries the process's warm-up: its 3 s per example must not stand for
    the 0.1 s ones after it (a fake clock)."""
    clock = [0.0]
    chunks: list[int] = []

    def fake_run(factory: object, settings: object) -> None:
        chunks.append(settings.max_examples)  # type: ignore[attr-defined]
        clock[0] += chunks[-1] * (3.0 if len(chunks) == 1 else 0.1)

    monkeypatch.setattr(machine, "run_state_machine_as_test", fake_run)
    monkeypatch.setattr(machine.time, "monotonic", lambda: clock[0])
    run = machine.run_machine(kvm, VmType.DEFAULT, Counter(), budget=10.0)
    assert run.examples >= 20 and run.seconds <= 10.0 * 1.25, (run, chunks)


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
