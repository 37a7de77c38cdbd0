"""A map from page-number intervals to values (runs), for per-gfn state of a memslot."""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Generic, TypeVar

V = TypeVar("V")


class RunMap(Generic[V]):
    """Sorted, disjoint, half-open intervals [start, end) each carrying a value; adjacent
    intervals with equal values are merged. Positions not covered have no value (None)."""

    def __init__(self) -> None:
        self._s: list[int] = []
        self._e: list[int] = []
        self._v: list[V] = []

    def set(self, start: int, end: int, value: V | None) -> None:
        """Give [start, end) ``value`` (None removes it)."""
        if start >= end:
            return
        lo = bisect.bisect_right(self._e, start)       # first run ending after start
        hi = bisect.bisect_left(self._s, end)          # first run starting at/after end
        ns: list[int] = []
        ne: list[int] = []
        nv: list[V] = []
        if lo < hi and self._s[lo] < start:
            ns.append(self._s[lo])
            ne.append(start)
            nv.append(self._v[lo])
        if value is not None:
            ns.append(start)
            ne.append(end)
            nv.append(value)
        if lo < hi and self._e[hi - 1] > end:
            ns.append(end)
            ne.append(self._e[hi - 1])
            nv.append(self._v[hi - 1])
        self._s[lo:hi] = ns
        self._e[lo:hi] = ne
        self._v[lo:hi] = nv
        # Merge with equal neighbours around the touched area.
        i = max(lo - 1, 0)
        stop = min(lo + len(ns) + 1, len(self._s))
        while i < stop - 1 and i < len(self._s) - 1:
            if self._e[i] == self._s[i + 1] and self._v[i] == self._v[i + 1]:
                self._e[i] = self._e[i + 1]
                del self._s[i + 1], self._e[i + 1], self._v[i + 1]
                stop -= 1
            else:
                i += 1

    def get(self, pos: int) -> V | None:
        i = bisect.bisect_right(self._s, pos) - 1
        if i >= 0 and pos < self._e[i]:
            return self._v[i]
        return None

    def runs(self, start: int | None = None, end: int | None = None) -> Iterator[tuple[int, int, V]]:
        """The runs intersecting [start, end), clipped to it."""
        if start is None:
            yield from zip(self._s, self._e, self._v, strict=True)
            return
        hi = end if end is not None else 1 << 64
        i = max(bisect.bisect_right(self._s, start) - 1, 0)
        while i < len(self._s) and self._s[i] < hi:
            s, e = max(self._s[i], start), min(self._e[i], hi)
            if s < e:
                yield s, e, self._v[i]
            i += 1

    def __len__(self) -> int:
        return len(self._s)

    def __repr__(self) -> str:
        return "RunMap(" + ", ".join(f"[{s:#x},{e:#x})={v!r}" for s, e, v in self.runs()) + ")"
