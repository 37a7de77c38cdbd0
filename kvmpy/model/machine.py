"""The hypothesis RuleBasedStateMachine of the model-based tests (selftests/test_model_statemachine.py).

:func:`make_machine` builds the machine class for one ``Kvm`` and VM type: its rules are the
operations of :class:`~kvmpy.model.harness.ModelHarness`, with arguments drawn so that most
sequences do something valid (and some hit the documented error paths). A failing rule adds
the sequence so far, as a ready-to-paste pytest test, as a note on the exception: after
hypothesis shrinks the sequence, the note of the final (minimal) run is the reproducer.

Environment: KVMPY_MODEL_EXAMPLES (default 12), KVMPY_MODEL_STEPS (default 40),
KVMPY_MODEL_RANDOM=1 (explore new sequences instead of the derandomized ones),
KVMPY_MODEL_SHRINK=0 (report the first failing sequence unshrunk).
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from ..system import Kvm
from .harness import GPA_BASE, WINDOW_PAGES, ModelHarness
from .repro import format_reproducer
from .state import GMEM_FLAG_INIT_SHARED, GMEM_FLAG_MMAP, PAGE

REPRO_HEADER = "Reproducer (paste into selftests/, runs with the kvm fixture):"

EXAMPLES = int(os.environ.get("KVMPY_MODEL_EXAMPLES", "12"))
STEPS = int(os.environ.get("KVMPY_MODEL_STEPS", "40"))
RANDOM = os.environ.get("KVMPY_MODEL_RANDOM", "") not in ("", "0")
#: KVMPY_MODEL_SHRINK=0 reports the first failing sequence unshrunk (the fault self-check only
#: needs to know that a sequence fails; shrinking one can take minutes).
SHRINK = os.environ.get("KVMPY_MODEL_SHRINK", "1") not in ("", "0")

NSLOTS = 4
MAX_GMEMS = 3
QWORDS = (0, 1, 511)           # qword indexes within a page the accesses use
values = st.integers(1, 2**64 - 1)


def make_machine(kvm: Kvm, vm_type: int) -> type[RuleBasedStateMachine]:
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
                return getattr(self.h, name)(*args, **kw)
            except Exception as e:
                e.add_note(REPRO_HEADER + "\n\n"
                           + format_reproducer(self.h.steps, vm_type=vm_type,
                                               backend=kvm.backend.describe(), failure=str(e)))
                raise

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
        @rule(i=st.integers(0, 7))
        def close_gmem(self, i: int) -> None:
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
        @rule(n=st.integers(0, NSLOTS - 1), page=st.integers(0, WINDOW_PAGES - 2),
              npages=st.integers(1, 6), kind=st.sampled_from(["plain", "gmem", "gmem"]),
              i=st.integers(0, 7), gpage=st.integers(0, 7), hva_gmem=st.booleans())
        def set_slot(self, n: int, page: int, npages: int, kind: str, i: int, gpage: int,
                     hva_gmem: bool) -> None:
            npages = min(npages, WINDOW_PAGES - page)
            gpa, size = GPA_BASE + page * PAGE, npages * PAGE
            gmems = self.open_gmems()
            if kind == "plain" or not gmems:
                self._do("set_slot", n, gpa, size)
                return
            gid = self._pick(gmems, i)
            hva = "gmem" if hva_gmem and self.h.mappable(gid) else "backing"
            if real and self.m.gmems[gid].flags & GMEM_FLAG_MMAP:
                if not self.h.mappable(gid):
                    return
                hva = "gmem"   # see the module docstring
            off = gpage * PAGE
            if hva == "gmem" and off + size > self.m.gmems[gid].size:
                off = 0        # the mapping must cover the slot
                if size > self.m.gmems[gid].size:
                    return
            self._do("set_slot", n, gpa, size, gmem=gid, gmem_offset=off, hva=hva)

        @rule(n=st.integers(0, NSLOTS - 1))
        def delete_slot(self, n: int) -> None:
            self._do("delete_slot", n)

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
              near=st.integers(-1, 3))
        def guest_read(self, page: int, q: int, near: int) -> None:
            self._do("guest_read", self._gpa(page, q, near))

        @rule(page=st.integers(0, WINDOW_PAGES - 1), q=st.sampled_from(QWORDS),
              near=st.integers(-1, 3), v=values)
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



__all__ = ["REPRO_HEADER", "machine_settings", "make_machine"]
