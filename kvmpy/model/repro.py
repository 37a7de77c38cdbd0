"""Turn a recorded ModelHarness sequence into a ready-to-paste pytest test.

A failing hypothesis sequence (selftests/test_model_statemachine.py) is shrunk to a minimal
one; its steps are the harness calls, each a line of Python, so the reproducer is the same
calls against the ``kvm`` fixture of kvmpy's pytest plugin (any test directory whose
conftest loads ``kvmpy.testing.plugin`` runs it, on the same backends as the original).
"""

from __future__ import annotations

import keyword
import re

from ..uapi import VmType

_STEP = re.compile(r"^h\.[a-z_]+\(.*\)$")


def format_reproducer(steps: list[str], *, vm_type: int = 0, name: str = "test_model_reproducer",
                      backend: str = "", failure: str = "") -> str:
    """The pytest source of a test replaying ``steps`` (lines ``h.method(args)``) on a fresh
    :class:`~kvmpy.model.harness.ModelHarness` of ``vm_type``.

    ``backend`` and ``failure`` only go into the docstring (what the sequence broke on).
    Raises ValueError for a step that is not a harness call, or a name that is not a valid
    test function name, so a printed reproducer always compiles.
    """
    if not name.isidentifier() or keyword.iskeyword(name) or not name.startswith("test"):
        raise ValueError(f"{name!r} is not a pytest test function name")
    for s in steps:
        if not _STEP.match(s) or "\n" in s:
            raise ValueError(f"not a harness step: {s!r}")
    try:
        vt = f"VmType.{VmType(vm_type).name}"
    except ValueError:
        vt = str(int(vm_type))
    doc = "Model-based reproducer (shrunk by hypothesis)"
    if backend:
        doc += f" from {backend}"
    lines = [
        "from kvmpy.model.harness import ModelHarness",
        "from kvmpy.system import Kvm",
        "from kvmpy.uapi import VmType",
        "",
        "",
        f"def {name}(kvm: Kvm) -> None:",
        f'    """{doc}.',
    ]
    if failure:
        first = failure.strip().splitlines()[0].replace('"""', "'''").replace("\\", "\\\\")
        lines.append("")
        lines.append(f"    It failed with: {first[:300]}")
    lines.append('    """')
    lines.append(f"    with ModelHarness(kvm, {vt}) as h:")
    body = steps or ["h.check()"]
    lines += [f"        {s}" for s in body]
    return "\n".join(lines) + "\n"


__all__ = ["format_reproducer"]
