"""Regression-power self-check: run the selftests against each injected fault.

    .venv/bin/python -m kvmpy.app.faultcheck                 # every fault, default selftests, emu
    .venv/bin/python -m kvmpy.app.faultcheck --faults punch-hole-dropped,mmio-gpa -n 2
    .venv/bin/python -m kvmpy.app.faultcheck --markdown results/faultcheck.md

For each fault of kvmpy.backend.faults.FAULTS, pytest runs the selected selftests in a child
process with ``KVMPY_INJECT_FAULT=<fault>`` (make_backend wraps its backend in FaultBackend),
and the tests that fail are the ones that caught it. A clean run first gives the baseline:
tests failing without any fault are not counted. The child also reports how often the fault
actually fired (``FaultBackend.hits``), so "not caught" and "never triggered" are told apart.
The model state machine runs without shrinking and with more examples (KVMPY_MODEL_SHRINK=0,
KVMPY_MODEL_EXAMPLES): the question is only whether some sequence fails.

Exit status 0 when every fault was caught by at least one test, 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from ..backend.faults import FAULTS

DEFAULT_TESTS = ("selftests",)


@dataclasses.dataclass
class Result:
    fault: str
    caught_by: list[str]
    hits: int
    seconds: float
    returncode: int
    errors: list[str] = dataclasses.field(default_factory=list)

    @property
    def caught(self) -> bool:
        return bool(self.caught_by)


def _failed_tests(junit: Path) -> tuple[list[str], list[str]]:
    """(failed or errored test ids, collection errors) from a JUnit XML file."""
    failed: list[str] = []
    errors: list[str] = []
    if not junit.exists():
        return failed, ["no JUnit XML written (pytest crashed?)"]
    root = ET.parse(junit).getroot()
    for tc in root.iter("testcase"):
        bad = tc.find("failure") is not None or tc.find("error") is not None
        if not bad:
            continue
        cls = tc.get("classname", "")
        name = tc.get("name", "")
        path = cls.replace(".", "/") + ".py" if cls else "?"
        tid = f"{path}::{name}"
        if not name:
            errors.append(cls)
        else:
            failed.append(tid)
    return failed, errors


def run_pytest(tests: list[str], fault: str | None, *, jobs: int, backend: str,
               examples: int, extra: list[str]) -> tuple[list[str], list[str], int, int, float]:
    """One pytest child: (failed test ids, errors, fault hits, return code, seconds)."""
    with tempfile.TemporaryDirectory(prefix="kvmpy-faultcheck-") as tmp:
        junit = Path(tmp) / "junit.xml"
        hits_file = Path(tmp) / "hits"
        env = dict(os.environ)
        env.pop("KVMPY_INJECT_FAULT", None)
        if fault:
            env["KVMPY_INJECT_FAULT"] = fault
            env["KVMPY_FAULT_HITS_FILE"] = str(hits_file)
        env["KVMPY_MODEL_SHRINK"] = "0"
        env["KVMPY_MODEL_EXAMPLES"] = str(examples)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               f"--backend={backend}", f"--junitxml={junit}", "-o", "junit_family=xunit1",
               *(["-n", str(jobs)] if jobs > 1 else []), *extra, *tests]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, check=False)
        secs = time.monotonic() - t0
        failed, errors = _failed_tests(junit)
        hits = 0
        if hits_file.exists():
            hits = sum(int(x) for x in hits_file.read_text().split() if x.strip())
        if proc.returncode not in (0, 1):
            tail = "\n".join(proc.stdout.splitlines()[-15:])
            errors.append(f"pytest exited {proc.returncode}:\n{tail}")
        return failed, errors, hits, proc.returncode, secs


def _by_file(tests: list[str]) -> str:
    """'test_memslots.py x40, test_model_statemachine.py x2' (most first)."""
    counts: dict[str, int] = {}
    for t in tests:
        f = t.split("::", 1)[0].rsplit("/", 1)[-1]
        counts[f] = counts.get(f, 0) + 1
    return ", ".join(f"`{f}` x{n}" for f, n in sorted(counts.items(), key=lambda x: -x[1]))


def markdown_table(results: list[Result], baseline: list[str]) -> str:
    lines = ["| fault | what it breaks | fired | failing tests | in files |",
             "|---|---|---|---|---|"]
    for r in results:
        spec = FAULTS[r.fault]
        if r.caught:
            caught, files = str(len(r.caught_by)), _by_file(r.caught_by)
        else:
            caught, files = "**NOT CAUGHT**" + (" (never fired)" if not r.hits else ""), ""
        lines.append(f"| `{r.fault}` | {spec.description} | {r.hits} | {caught} | {files} |")
    if baseline:
        lines.append("")
        lines.append("Failing without any fault (excluded): " + ", ".join(baseline))
    return "\n".join(lines) + "\n"


def write_json(path: Path, results: list[Result], baseline: list[str]) -> None:
    import json

    path.write_text(json.dumps({"baseline_failures": baseline,
                                "faults": [dataclasses.asdict(r) for r in results]}, indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvmpy.app.faultcheck", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faults", default="", help="comma-separated fault names (default: all)")
    ap.add_argument("--tests", nargs="*", default=list(DEFAULT_TESTS),
                    help="pytest paths (default: selftests)")
    ap.add_argument("-n", "--jobs", type=int, default=1, help="pytest-xdist workers per run")
    ap.add_argument("--backend", default="emu", help="--backend of the runs (default emu)")
    ap.add_argument("--examples", type=int, default=40,
                    help="KVMPY_MODEL_EXAMPLES for the model state machine (default 40)")
    ap.add_argument("--markdown", type=Path, help="also write the table to this file")
    ap.add_argument("--json", type=Path, help="also write every result (all test ids) here")
    ap.add_argument("--list", action="store_true", help="list the faults and exit")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    a = ap.parse_args(argv)
    if a.list:
        for name, spec in FAULTS.items():
            print(f"{name:30} {'[emu only] ' if spec.emu_only else ''}{spec.description}")
        return 0
    names = [f for f in a.faults.split(",") if f] or list(FAULTS)
    unknown = [f for f in names if f not in FAULTS]
    if unknown:
        ap.error(f"unknown fault(s) {', '.join(unknown)}; see --list")

    print(f"baseline: pytest {' '.join(a.tests)} --backend {a.backend} (no fault)", flush=True)
    base_failed, base_errors, _, rc, secs = run_pytest(
        a.tests, None, jobs=a.jobs, backend=a.backend, examples=a.examples, extra=a.pytest_args)
    print(f"  {len(base_failed)} failing, rc {rc}, {secs:.0f} s", flush=True)
    for e in base_errors:
        print(f"  ! {e}", flush=True)
    results: list[Result] = []
    for f in names:
        failed, errors, hits, rc, secs = run_pytest(
            a.tests, f, jobs=a.jobs, backend=a.backend, examples=a.examples, extra=a.pytest_args)
        caught = [t for t in failed if t not in base_failed]
        r = Result(f, caught, hits, secs, rc, errors)
        results.append(r)
        verdict = f"caught by {len(caught)}" if caught else "NOT CAUGHT"
        print(f"{f:30} fired {hits:5}  {verdict:16} {secs:5.0f} s", flush=True)
        for t in caught[:6]:
            print(f"    {t}", flush=True)
        for e in errors:
            print(f"    ! {e}", flush=True)
    table = markdown_table(results, base_failed)
    if a.markdown:
        a.markdown.write_text(table)
    if a.json:
        write_json(a.json, results, base_failed)
    print()
    print(table)
    missed = [r.fault for r in results if not r.caught]
    if missed:
        print(f"NOT CAUGHT: {', '.join(missed)}")
        return 1
    print(f"all {len(results)} faults caught")
    return 0


if __name__ == "__main__":
    sys.exit(main())
