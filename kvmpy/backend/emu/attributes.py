"""Per-gfn memory attributes as a range map (KVM keeps an xarray indexed by gfn).

Only KVM_MEMORY_ATTRIBUTE_PRIVATE exists (api.rst 4.140 KVM_SET_MEMORY_ATTRIBUTES), so the map
stores the sorted, disjoint, non-adjacent gfn intervals whose attributes are PRIVATE.
"""

from __future__ import annotations

import bisect


class AttributeMap:
    """Sorted disjoint half-open gfn intervals [start, end) carrying PRIVATE."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def is_private(self, gfn: int) -> bool:
        i = bisect.bisect_right(self._starts, gfn) - 1
        return i >= 0 and gfn < self._ends[i]

    def all_equal(self, start: int, end: int, private: bool) -> bool:
        """Whether every gfn of [start, end) already has the attribute (KVM skips the update
        and the zap then: kvm_range_has_memory_attributes())."""
        i = bisect.bisect_right(self._starts, start) - 1
        if private:
            return i >= 0 and self._ends[i] >= end
        if i >= 0 and self._ends[i] > start:
            return False
        j = bisect.bisect_left(self._starts, start)
        return j >= len(self._starts) or self._starts[j] >= end

    def set(self, start: int, end: int, private: bool) -> None:
        if start >= end:
            return
        # Intervals touching or overlapping [start, end) are merged (private) or cut (shared).
        lo = bisect.bisect_left(self._ends, start)       # first interval ending at/after start
        hi = bisect.bisect_right(self._starts, end)      # first interval starting after end
        new_s: list[int] = []
        new_e: list[int] = []
        if private:
            s, e = start, end
            if lo < hi:
                s = min(s, self._starts[lo])
                e = max(e, self._ends[hi - 1])
            new_s, new_e = [s], [e]
        else:
            for k in range(lo, hi):
                if self._starts[k] < start:
                    new_s.append(self._starts[k])
                    new_e.append(start)
                if self._ends[k] > end:
                    new_s.append(end)
                    new_e.append(self._ends[k])
        self._starts[lo:hi] = new_s
        self._ends[lo:hi] = new_e

    def next_boundary(self, gfn: int) -> int | None:
        """The first gfn > ``gfn`` where the attribute may change (None: never)."""
        i = bisect.bisect_right(self._starts, gfn) - 1
        if i >= 0 and gfn < self._ends[i]:
            return self._ends[i]
        j = i + 1
        return self._starts[j] if j < len(self._starts) else None

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._ends, strict=True))

    def __repr__(self) -> str:
        return "AttributeMap(" + ", ".join(f"[{s:#x},{e:#x})" for s, e in self.ranges()) + ")"
