"""The emulator's VM core imports in one direction: vm -> memslots -> gmem (issue 13 item 4).

Imports under ``if TYPE_CHECKING:`` count too: a circle there is still a circle to a reader."""

from __future__ import annotations

import ast
from pathlib import Path

EMU = Path(__file__).resolve().parents[2] / "kvmpy" / "backend" / "emu"
CORE = ("vm", "memslots", "gmem")


def _emu_imports(name: str) -> set[str]:
    """Sibling modules of kvmpy/backend/emu/<name>.py that it imports (``from .x import``)."""
    out = set()
    for node in ast.walk(ast.parse((EMU / f"{name}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_vm_memslots_gmem_have_no_import_circle() -> None:
    deps = {m: _emu_imports(m) & set(CORE) for m in CORE}
    assert deps == {"vm": {"memslots", "gmem"}, "memslots": {"gmem"}, "gmem": set()}
