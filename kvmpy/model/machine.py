"""The hypothesis RuleBasedStateMachine of the model-based tests (selftests/test_model_statemachine.py).

:func:`make_machine` builds the machine class for one ``Kvm`` and VM type: its rules are the
operations of :class:`~kvmpy.model.harness.ModelHarness`, with arguments drawn so that most
sequences do something valid (and some hit the documented error paths). A failing rule adds
the sequence so far, as a ready-to-paste pytest test, as a note on the exception: after
hypothesis shrinks the sequence, the note of the final (minimal) run is the reproducer.

Budget (:func:`run_machine`): a time per (backend, VM type), KVMPY_MODEL_BUDGET seconds
(default 15), capped at a third of the per-test timeout, so a slow backend (real KVM in a TCG
VM is ~10x slower than the emulator on the host) runs fewer examples in the same time and never
reaches the timeout. Examples are seeded 0, 1, 2, ... (the same sequences in the same order every
run; how many fit depends on the machine) unless KVMPY_MODEL_RANDOM=1.
KVMPY_MODEL_EXAMPLES=N instead runs exactly N examples, whatever they cost (kvmpy.faultcheck).
KVMPY_MODEL_STEPS (default 40) bounds the steps of one example. KVMPY_MODEL_SHRINK=0/1 turns
shrinking a failing sequence off/on; by default it is on for the emulated KVM and off on real
KVM, where shrinking under TCG can outlast any per-test timeout (the unshrunk sequence is
still reported as a reproducer).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, cast

from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    precondition,
    rule,
    run_state_machine_as_test,
)

from ..system import Kvm
from ..testing.errnos import errname
from .harness import GPA_BASE, WINDOW_PAGES, ModelHarness
from .repro import format_reproducer
from .state import GMEM_FLAG_INIT_SHARED, GMEM_FLAG_MMAP, PAGE, Mem

REPRO_HEADER = "Reproducer (paste into selftests/, runs with the kvm fixture):"

EXAMPLES = int(os.environ.get("KVMPY_MODEL_EXAMPLES", "25"))
#: Set: a count of examples instead of the time budget.
EXAMPLES_SET = bool(os.environ.get("KVMPY_MODEL_EXAMPLES"))
#: Seconds a budgeted run may take per (backend, VM type), declared per backend;
#: KVMPY_MODEL_BUDGET sets both. Real KVM: in a TCG VM (the CI's) an example costs ~0.3-0.5 s,
#: two thirds of it hypothesis's own generation (a 7.3 profile), so 10 s buys ~25-60 examples of
#: ~35 steps and keeps the VM stage within 2x of the C selftests (issue 15); with hardware
#: virtualization it reaches EXAMPLES_CAP first. The emulated KVM runs in-process on the host.
BUDGETS = {"kvm": 10.0, "emu": 15.0}
_BUDGET_ENV = os.environ.get("KVMPY_MODEL_BUDGET")
#: Examples hypothesis may generate in a budgeted run (a fast backend stops here).
EXAMPLES_CAP = 200
STEPS = int(os.environ.get("KVMPY_MODEL_STEPS", "40"))
RANDOM = os.environ.get("KVMPY_MODEL_RANDOM", "") not in ("", "0")
#: KVMPY_MODEL_SHRINK=0 reports the first failing sequence unshrunk (the fault self-check only
#: needs to know that a sequence fails; shrinking one can take minutes).
_SHRINK_ENV = os.environ.get("KVMPY_MODEL_SHRINK", "")
SHRINK = _SHRINK_ENV not in ("0",)

NSLOTS = 4
MAX_GMEMS = 3
QWORDS = (0, 1, 511)           # qword indexes within a page the accesses use
values = st.integers(1, 2**64 - 1)


def make_machine(kvm: Kvm, vm_type: int,
                 stats: Counter[str] | None = None) -> type[RuleBasedStateMachine]:
    """The machine class for ``kvm`` and ``vm_type``; ``stats`` (if given) counts what each
    operation did (``guest_read -> Mem from gmem``, ``set_slot -> EEXIST``...)."""
    real = kvm.backend.is_real

    class MemoryMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.h = ModelHarness(kvm, vm_type)
            self.m = self.h.model
            flags = self.h.config.gmem_flags
            self.flag_sets = [0]
            if flags & GMEM_FLAG_MMAP:
                self.flag_sets.append(GMEM_FLAG_MMAP)
                if flags & GMEM_FLAG_INIT_SHARED:
                    self.flag_sets.append(GMEM_FLAG_MMAP | GMEM_FLAG_INIT_SHARED)

        def teardown(self) -> None:
            self.h.close()

        def _do(self, name: str, *args: Any, **kw: Any) -> Any:
            try:
                self.h.last_errno = 0
                r = getattr(self.h, name)(*args, **kw)
            except Exception as e:
                e.add_note(REPRO_HEADER + "\n\n"
                           + format_reproducer(self.h.steps, vm_type=vm_type,
                                               backend=kvm.backend.describe(), failure=str(e)))
                raise
            # What the sequences covered (pytest --hypothesis-show-statistics).
            if name.startswith("guest_"):
                want = self.m.resolve(int(args[0]), False)[0]
                what = f"Mem from {want.source}" if isinstance(want, Mem) else type(r).__name__
                what = f"{name} -> {what}"
            else:
                what = f"{name} -> {errname(self.h.last_errno).split(' ')[0]}"
            event(what)
            if stats is not None:
                stats[what] += 1
            return r

        # --- helpers ----------------------------------------------------------------------
        def open_gmems(self) -> list[int]:
            return [g for g, x in self.m.gmems.items() if x.open]

        def _pick(self, items: list[int], i: int) -> int:
            return items[i % len(items)]

        # --- guest_memfd --------------------------------------------------------------------
        @precondition(lambda self: self.h.config.guest_memfd
                      and len(self.open_gmems()) < MAX_GMEMS)
        @rule(pages=st.integers(1, 8), fi=st.integers(0, 2),
              bad=st.sampled_from(["", "", "", "", "unaligned", "badflag", "zero"]))
        def create_gmem(self, pages: int, fi: int, bad: str) -> None:
            flags = self.flag_sets[fi % len(self.flag_sets)]
            size = pages * PAGE
            if bad == "unaligned":
                size += 0x800
            elif bad == "zero":
                size = 0
            elif bad == "badflag":
                flags |= 1 << 62
            self._do("create_gmem", size, flags)

        @precondition(lambda self: bool(self.open_gmems()))
        @rule(i=st.integers(0, 7), now=st.sampled_from([False, False, False, True]))
        def close_gmem(self, i: int, now: bool) -> None:
            if not now:      # closing ends a file's useful life: keep it rarer than the rest
                return
            gid = self._pick(self.open_gmems(), i)
            if real and any(s.gmem == gid for s in self.m.slots.values()):
                # Real KVM: which memory backs a slot whose file (and kvmpy's mapping of it)
                # went away is not part of the subset this harness runs there.
                return
            self._do("close_gmem", gid)

        @precondition(lambda self: bool(self.open_gmems()))
        @rule(i=st.integers(0, 7), page=st.integers(0, 9), npages=st.integers(0, 4),
              punch=st.booleans(), misalign=st.sampled_from([False, False, False, True]))
        def fallocate(self, i: int, page: int, npages: int, punch: bool, misalign: bool) -> None:
            gid = self._pick(self.open_gmems(), i)
            self._do("fallocate", gid, page * PAGE + (0x200 if misalign else 0), npages * PAGE,
                     punch=punch)

        # --- memslots -----------------------------------------------------------------------
        # Slots go at one of NSLOTS positions (8 pages apart) so most creations succeed;
        # ``shift`` moves one into its neighbour now and then (EEXIST), ``reuse`` re-sets an
        # existing slot id (EINVAL: only moves and flag changes are allowed).
        @rule(pos=st.integers(0, NSLOTS - 1), npages=st.integers(1, 6),
              kind=st.sampled_from(["plain", "gmem", "gmem", "gmem"]),
              i=st.integers(0, 7), gpage=st.integers(0, 7), hva_gmem=st.booleans(),
              shift=st.sampled_from([0] * 7 + [5]), reuse=st.sampled_from([False] * 7 + [True]))
        def set_slot(self, pos: int, npages: int, kind: str, i: int, gpage: int,
                     hva_gmem: bool, shift: int, reuse: bool) -> None:
            used = sorted(self.m.slots)
            free = [n for n in range(NSLOTS) if n not in used]
            if reuse and used:
                n = self._pick(used, i)
            elif free:
                n = free[0]
            else:
                return
            page = pos * (WINDOW_PAGES // NSLOTS) + shift
            npages = min(npages, WINDOW_PAGES - page)
            gpa, size = GPA_BASE + page * PAGE, npages * PAGE
            gmems = self.open_gmems()
            if kind == "plain" or not gmems:
                self._do("set_slot", n, gpa, size)
                return
            gid = self._pick(gmems, i)
            gpages = self.m.gmems[gid].size // PAGE
            hva = "gmem" if hva_gmem and self.h.mappable(gid) else "backing"
            if real and self.m.gmems[gid].flags & GMEM_FLAG_MMAP:
                if not self.h.mappable(gid):
                    return
                hva = "gmem"   # see the module docstring
            # Mostly a range inside the file; gpage 7 asks for one past its end (EINVAL).
            off = (gpage % gpages) * PAGE if gpage < 7 else gpages * PAGE
            if gpage < 7:
                size = min(size, gpages * PAGE - off)  # fits: most bindings succeed
            if hva == "gmem":
                size = min(size, gpages * PAGE)       # the mapping must cover the slot
                off = min(off, gpages * PAGE - size)
            self._do("set_slot", n, gpa, size, gmem=gid, gmem_offset=off, hva=hva)

        @precondition(lambda self: bool(self.m.slots))
        @rule(i=st.integers(0, 7), missing=st.sampled_from([False] * 7 + [True]))
        def delete_slot(self, i: int, missing: bool) -> None:
            used = sorted(self.m.slots)
            if missing:
                free = [n for n in range(NSLOTS) if n not in used]
                if free:
                    self._do("delete_slot", self._pick(free, i))
                return
            self._do("delete_slot", self._pick(used, i))

        # --- attributes -------------------------------------------------------------------
        @precondition(lambda self: bool(self.h.config.attributes))
        @rule(page=st.integers(0, WINDOW_PAGES - 1), npages=st.integers(0, 6),
              private=st.booleans(), bad=st.sampled_from([False] * 7 + [True]))
        def set_attributes(self, page: int, npages: int, private: bool, bad: bool) -> None:
            if bad:
                self._do("set_attributes", GPA_BASE + page * PAGE, npages * PAGE, attributes=1)
            else:
                self._do("set_attributes", GPA_BASE + page * PAGE, npages * PAGE,
                         private=private)

        # --- host writes --------------------------------------------------------------------
        @precondition(lambda self: bool(self.h.backings))
        @rule(i=st.integers(0, 7), page=st.integers(0, 5), q=st.sampled_from(QWORDS), v=values)
        def host_write(self, i: int, page: int, q: int, v: int) -> None:
            slot = self._pick(sorted(self.h.backings), i)
            npages = self.m.slots[slot].size // PAGE
            self._do("host_write", slot, (page % npages) * PAGE + q * 8, v)

        @precondition(lambda self: bool(self.h.gmem_maps))
        @rule(i=st.integers(0, 7), page=st.integers(0, 7), q=st.sampled_from(QWORDS), v=values)
        def host_write_gmem(self, i: int, page: int, q: int, v: int) -> None:
            gid = self._pick(sorted(self.h.gmem_maps), i)
            npages = self.m.gmems[gid].size // PAGE
            self._do("host_write_gmem", gid, (page % npages) * PAGE + q * 8, v)

        # --- guest accesses -----------------------------------------------------------------
        def _gpa(self, page: int, q: int, near_slot: int) -> int:
            """Mostly inside an installed slot (so accesses hit memory), sometimes anywhere in
            the window (MMIO where no slot is)."""
            slots = list(self.m.slots.values())
            if slots and near_slot >= 0:
                s = slots[near_slot % len(slots)]
                return s.gpa + (page % (s.size // PAGE)) * PAGE + q * 8
            return GPA_BASE + page * PAGE + q * 8

        @rule(page=st.integers(0, WINDOW_PAGES - 1), q=st.sampled_from(QWORDS),
              near=st.sampled_from([0, 1, 2, 3, -1]))
        def guest_read(self, page: int, q: int, near: int) -> None:
            self._do("guest_read", self._gpa(page, q, near))

        @rule(page=st.integers(0, WINDOW_PAGES - 1), q=st.sampled_from(QWORDS),
              near=st.sampled_from([0, 1, 2, 3, -1]), v=values)
        def guest_write(self, page: int, q: int, near: int, v: int) -> None:
            self._do("guest_write", self._gpa(page, q, near), v)

    return MemoryMachine


def machine_settings(examples: int | None = None, steps: int | None = None,
                     shrink: bool | None = None) -> settings:
    """Settings from the environment (arguments override)."""
    examples = EXAMPLES if examples is None else examples
    steps = STEPS if steps is None else steps
    shrink = SHRINK if shrink is None else shrink
    phases = [Phase.explicit, Phase.reuse, Phase.generate] + ([Phase.shrink] if shrink else [])
    return settings(max_examples=examples, stateful_step_count=steps, deadline=None,
                    derandomize=not RANDOM, database=None, phases=phases,
                    suppress_health_check=list(HealthCheck), print_blob=False)



@dataclasses.dataclass
class BudgetRun:
    """What :func:`run_machine` did: examples run, seconds, the budget and why it stopped."""

    examples: int
    seconds: float
    budget: float | None
    stopped: str


def backend_budget(backend: str) -> float:
    """The declared budget of ``backend`` (BUDGETS; KVMPY_MODEL_BUDGET if set)."""
    return float(_BUDGET_ENV) if _BUDGET_ENV else BUDGETS.get(backend, max(BUDGETS.values()))


def model_budget(per_test_timeout: float | None, backend: str) -> float:
    """The backend's budget, capped at a third of the per-test timeout (0/None: no timeout)."""
    budget = backend_budget(backend)
    if per_test_timeout:
        return min(budget, per_test_timeout / 3)
    return budget


def _factory(cls: type[RuleBasedStateMachine]) -> type[RuleBasedStateMachine]:
    """A function making ``cls`` instances, for run_state_machine_as_test(), which accepts any
    factory: it digests the factory's source per run, and for a class defined in a function
    that is an ast walk of this whole module (~0.2 s a chunk under TCG); a function's own lines
    are a few."""
    def machine() -> RuleBasedStateMachine:
        return cls()

    return cast("type[RuleBasedStateMachine]", machine)


def run_machine(kvm: Kvm, vm_type: int, stats: Counter[str] | None = None, *,
                budget: float | None = None, examples: int | None = None,
                steps: int | None = None, shrink: bool | None = None,
                until: Callable[[], bool] | None = None,
                limit: float | None = None) -> BudgetRun:
    """Run the state machine for ``kvm`` / ``vm_type`` within ``budget`` seconds, or exactly
    ``examples`` examples when given (or KVMPY_MODEL_EXAMPLES is set).

    With a budget the examples come in hypothesis runs ("chunks") seeded 0, 1, 2, ...: the
    first of 2 examples measures what one costs on this backend, each next one at most doubles
    the examples so far and fits half of what is left of the budget at the latest chunk's rate
    (one example while one fits; at most EXAMPLES_CAP examples in all): examples vary in cost,
    and a chunk cannot stop early, so the halves keep a run near its budget. The clock is read
    only between hypothesis runs: inside one, generation and the replays of a failing example stay
    deterministic (hypothesis calls time-dependent behaviour flaky). A failure propagates with
    the sequence as a reproducer note (shrunk by hypothesis when ``shrink``).

    ``until``: a coverage goal; when the budget is spent before it is met (a slow host ran a
    chunk or two), chunks of 2 go on until it is met or ``limit`` seconds have passed."""
    if shrink is None:
        shrink = SHRINK if _SHRINK_ENV else not kvm.backend.is_real
    if examples is None and budget is None and EXAMPLES_SET:
        examples = EXAMPLES
    t0 = time.monotonic()
    if examples is not None:
        run_state_machine_as_test(_factory(make_machine(kvm, vm_type, stats)),
                                  settings=machine_settings(examples, steps, shrink))
        return BudgetRun(examples, time.monotonic() - t0, None, f"{examples} examples")
    budget = backend_budget(kvm.backend.name) if budget is None else budget
    done, chunk, per_example = 0, 0, 0.0
    why = f"all {EXAMPLES_CAP} examples within the budget"
    while done < EXAMPLES_CAP:
        left = budget - (time.monotonic() - t0)
        # Chunks at most double the examples so far, so the estimate catches up with costlier
        # (longer, later) examples before a big chunk is committed.
        fits = left / max(per_example, 1e-3)
        n = 2 if not done else min(EXAMPLES_CAP - done, 2 * done,
                                   max(int(fits / 2), 1 if fits >= 1 else 0))
        if n < 1 or left <= 0:
            why = (f"budget of {budget:g} s spent ({per_example:.2f} s per example on "
                   f"{kvm.backend.name})")
            spent = time.monotonic() - t0
            if until is None or until() or limit is None or \
                    spent + 2 * per_example > limit:
                break
            n, why = 2, why + "; went on for the coverage goal"
        machine = _factory(make_machine(kvm, vm_type, stats))
        if not RANDOM:
            # hypothesis.seed() on the factory (run_state_machine_as_test copies it).
            machine._hypothesis_internal_use_seed = chunk
        t = time.monotonic()
        run_state_machine_as_test(machine, settings=settings(
            machine_settings(n, steps, shrink), derandomize=False))
        took = time.monotonic() - t
        # The latest chunk's rate: the first one's carries the process's warm-up (hypothesis's
        # scan of local modules, the first guest image), which made a 7.3 TCG run stop after 2
        # examples in 8 of its 10 s.
        per_example = took / n
        done += n
        chunk += 1
    return BudgetRun(done, time.monotonic() - t0, budget, why)


__all__ = ["BUDGETS", "REPRO_HEADER", "BudgetRun", "backend_budget", "machine_settings",
           "make_machine", "model_budget", "run_machine"]
