"""The reproducer printer (kvmpy.model.repro) and the shrink-to-reproducer path end to end:
a planted fault makes the model state machine fail, hypothesis shrinks the sequence, and the
printed test reproduces the failure on the faulty backend and passes on a correct one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis.stateful import run_state_machine_as_test

from kvmpy.backend.faults import FaultBackend
from kvmpy.backend.select import make_backend
from kvmpy.model.harness import ModelMismatch
from kvmpy.model.machine import REPRO_HEADER, machine_settings, make_machine
from kvmpy.model.repro import format_reproducer
from kvmpy.system import Kvm
from kvmpy.uapi import VmType


def test_format_reproducer_compiles_and_lists_steps() -> None:
    steps = ["h.create_gmem(0x2000, 0)", "h.set_slot(0, 0x100000000, 0x1000, gmem=0)",
             "h.guest_read(0x100000008)"]
    src = format_reproducer(steps, vm_type=VmType.SW_PROTECTED, backend="emu",
                            failure='step 3: guest saw 0x1 "quoted" \\ back')
    compile(src, "<repro>", "exec")
    assert "def test_model_reproducer(kvm: Kvm) -> None:" in src
    assert "ModelHarness(kvm, VmType.SW_PROTECTED) as h:" in src
    body = [ln.strip() for ln in src.splitlines() if ln.startswith("        h.")]
    assert body == steps
    assert "It failed with: step 3" in src


def test_format_reproducer_with_no_steps_still_checks() -> None:
    src = format_reproducer([], name="test_empty")
    compile(src, "<repro>", "exec")
    assert "        h.check()" in src


@pytest.mark.parametrize("bad", ["import os", "h.guest_read(1)\nimport os", "x = 1"])
def test_format_reproducer_rejects_non_steps(bad: str) -> None:
    with pytest.raises(ValueError, match="not a harness step"):
        format_reproducer([bad])


@pytest.mark.parametrize("name", ["class", "reproducer", "test-x", ""])
def test_format_reproducer_rejects_bad_names(name: str) -> None:
    with pytest.raises(ValueError, match="test function name"):
        format_reproducer([], name=name)


def _load(src: str) -> Callable[[Kvm], None]:
    ns: dict[str, Any] = {}
    exec(compile(src, "<reproducer>", "exec"), ns)
    fn: Callable[[Kvm], None] = ns["test_model_reproducer"]
    return fn


@pytest.mark.guest
def test_failing_sequence_shrinks_to_a_pasteable_reproducer() -> None:
    """mmio-gpa (KVM_EXIT_MMIO's phys_addr off by 8) is found, shrunk to a minimal sequence,
    and the printed test fails on the faulty backend and passes on the emulated KVM."""
    faulty = FaultBackend(make_backend("emu"), "mmio-gpa")
    with Kvm(faulty) as kvm, pytest.raises(ModelMismatch) as ei:
        run_state_machine_as_test(make_machine(kvm, VmType.DEFAULT),
                                  settings=machine_settings(examples=30, steps=20, shrink=True))
    notes = [n for n in getattr(ei.value, "__notes__", []) if n.startswith(REPRO_HEADER)]
    assert notes, f"no reproducer note on {ei.value!r}"
    src = notes[-1].split("\n\n", 1)[1]
    steps = [ln.strip() for ln in src.splitlines() if ln.startswith("        h.")]
    # Shrunk: an MMIO access needs no setup at all.
    assert 1 <= len(steps) <= 2, src
    assert steps[-1].startswith(("h.guest_read", "h.guest_write")), src
    test_fn = _load(src)
    with Kvm(FaultBackend(make_backend("emu"), "mmio-gpa")) as kvm2, \
            pytest.raises(ModelMismatch, match=r"KVM_EXIT_MMIO|Mmio"):
        test_fn(kvm2)
    with Kvm(make_backend("emu")) as kvm3:
        test_fn(kvm3)
