"""Docs meta-test: every repository path named in the docs, README, comments and docstrings
exists, no reference points at a file outside the repository (the design notes the project
started from live outside it and are not shipped), and every test id a doc names exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOP = ("kvmpy", "selftests", "tests", "guests", "ci", "docs", "bench", ".ci")
PATH = re.compile(r"(?<![\w./-])((?:\.\./)?(?:" + "|".join(re.escape(t) for t in TOP)
                  + r")/[\w./*-]*[\w*/])")
#: Files outside the repository that references may not point at.
OUTSIDE = re.compile(r"\b(uapi-facts|selftests-catalog|emulator-notes|DESIGN)\.md\b")
#: The kernel images under test are the one outside resource, passed in by path.
ALLOWED_OUTSIDE = "../shared/kernels/"
#: tests/ builds fake paths on purpose (e.g. guests/x.c for a decode test).
SCANNED = ["README.md", "docs", "kvmpy", "selftests", "guests", "ci", ".ci", "bench"]
SUFFIXES = {".md", ".py", ".c", ".h", ".S", ".ld", ".sh", ".toml", ".yml", ".config", ""}


def _files() -> list[Path]:
    out: list[Path] = []
    for s in SCANNED:
        p = REPO / s
        if p.is_file():
            out.append(p)
            continue
        out += [f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES
                and "__pycache__" not in f.parts and ".build" not in f.parts]
    return out


def _exists(path: str) -> bool:
    path = path.split("::")[0].rstrip("/.")
    if "*" in path:
        return any(REPO.glob(path))
    return (REPO / path).exists()


def test_named_paths_exist() -> None:
    missing = []
    for f in _files():
        for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            for m in PATH.finditer(line):
                p = m.group(1)
                if p.startswith("../"):
                    continue
                if not _exists(p):
                    missing.append(f"{f.relative_to(REPO)}:{n}: {p}")
    assert not missing, "paths named but not in the repository:\n" + "\n".join(missing)


def test_no_references_outside_the_repository() -> None:
    outside = []
    for f in _files():
        for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line) or ("../shared/" in line and ALLOWED_OUTSIDE not in line):
                outside.append(f"{f.relative_to(REPO)}:{n}: {line.strip()[:100]}")
    assert not outside, "references to files outside the repository:\n" + "\n".join(outside)


TEST_ID = re.compile(r"\b((?:selftests|tests)/[\w/]+\.py)::(test_\w+)")


def test_named_test_ids_exist() -> None:
    """``selftests/test_x.py::test_y`` in a doc or comment names a test function that exists."""
    missing = []
    for f in _files():
        for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            for m in TEST_ID.finditer(line):
                path, name = REPO / m.group(1), m.group(2)
                if path.exists() and not re.search(rf"^\s*(async )?def {name}\b",
                                                   path.read_text(), re.M):
                    missing.append(f"{f.relative_to(REPO)}:{n}: {m.group(0)}")
    assert not missing, "test ids named but not defined:\n" + "\n".join(missing)


def test_a_missing_path_is_found(tmp_path: Path) -> None:
    """The scanner itself: a made-up path is reported, a real one is not."""
    line = "see kvmpy/no_such_module.py and kvmpy/vm.py"
    found = [m.group(1) for m in PATH.finditer(line)]
    assert found == ["kvmpy/no_such_module.py", "kvmpy/vm.py"]
    assert not _exists(found[0]) and _exists(found[1])
