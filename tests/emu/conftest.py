"""Fixtures shared by the emulated-vCPU tests."""

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kvmpy.backend.emu.x86.fakevm import Guest


@pytest.fixture
def guests() -> Iterator[Callable[..., Guest]]:
    """Make hand-assembled guests on a stand-in VM; all are closed after the test."""
    made: list[Guest] = []

    def make(src: str, **kw: Any) -> Guest:
        g = Guest(src, **kw)
        made.append(g)
        return g

    yield make
    for g in made:
        g.close()
