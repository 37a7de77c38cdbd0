"""Suite wall time: serial vs pytest-xdist, and the kernel's C selftests side by side.

    .venv/bin/pytest bench/bench_suite.py -m bench --backend emu      # suite on the emulator
    .venv/bin/pytest bench/bench_suite.py -m bench --backend kvm \\
        --c-selftests ~/linux/tools/testing/selftests/kvm              # C vs kvmpy, real KVM

Each benchmark runs pytest (or a C binary) in a child process, one round (a suite run takes
tens of seconds); the child's exit status and pass/fail counts go into extra_info. The backend
of the child runs is the one of this run (``--backend``; one per benchmark id).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.bench

ROOT = Path(__file__).resolve().parent.parent

#: kernel selftest binary (relative to the kvm selftests directory; x86 tests live in x86/,
#: x86_64/ before 6.13) -> the kvmpy file that covers it.
C_TESTS: dict[str, str] = {
    "guest_memfd_test": "selftests/test_guest_memfd.py",
    "set_memory_region_test": "selftests/test_memslots.py",
    "pre_fault_memory_test": "selftests/test_pre_fault_memory.py",
    "x86/private_mem_conversions_test": "selftests/test_private_mem_conversions.py",
    "x86/private_mem_kvm_exits_test": "selftests/test_private_mem_kvm_exits.py",
}


def _pytest(paths: list[str], backend: str, extra: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           f"--backend={backend}", *extra, *paths]
    env = {k: v for k, v in os.environ.items() if k != "KVMPY_INJECT_FAULT"}
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    out = {"seconds": round(time.monotonic() - t0, 2), "rc": p.returncode}
    last = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""
    for n, what in re.findall(r"(\d+) (passed|failed|skipped|xfailed|error)", last):
        out[what] = int(n)
    return out


def _suite(request: pytest.FixtureRequest) -> list[str]:
    return [p for p in str(request.config.getoption("--suite")).split(",") if p]


@pytest.mark.parametrize("workers", [0, 2], ids=["serial", "xdist-n2"])
def test_suite_wall_time(benchmark: Any, backend_name: str, workers: int,
                         request: pytest.FixtureRequest) -> None:
    """The suite (``--suite``, default selftests) on this run's backend, serial and -n 2."""
    paths = _suite(request)
    extra = ["-n", str(workers)] if workers else ["-p", "no:xdist"]
    res: dict[str, Any] = {}

    def run() -> None:
        res.update(_pytest(paths, backend_name, extra))

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(res)
    benchmark.extra_info["suite"] = ",".join(paths)
    assert res["rc"] in (0, 1), f"pytest child exited {res['rc']}"


def _c_binary(request: pytest.FixtureRequest, name: str) -> Path:
    d = str(request.config.getoption("--c-selftests"))
    if not d:
        pytest.skip("no --c-selftests DIR (the kernel's built tools/testing/selftests/kvm)")
    base = Path(d).expanduser()
    if not base.is_dir():
        pytest.skip(f"--c-selftests directory {base} does not exist")
    cands = [base / name]
    if name.startswith("x86/"):
        cands.append(base / "x86_64" / name.split("/", 1)[1])
    for c in cands:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    pytest.skip(f"C selftest {name} not built in {base} (looked for "
                f"{', '.join(str(c) for c in cands)})")


@pytest.mark.parametrize("c_test", list(C_TESTS), ids=[n.split("/")[-1] for n in C_TESTS])
def test_c_selftest(benchmark: Any, c_test: str, request: pytest.FixtureRequest) -> None:
    """The kernel's C selftest binary on this host (exit 4 = KSFT_SKIP is recorded as such)."""
    exe = _c_binary(request, c_test)
    res: dict[str, Any] = {}

    def run() -> None:
        t0 = time.monotonic()
        p = subprocess.run([str(exe)], capture_output=True, text=True, check=False,
                           timeout=600)
        res.update(seconds=round(time.monotonic() - t0, 2), rc=p.returncode,
                   result={0: "pass", 4: "skip"}.get(p.returncode, "fail"))

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(res)
    benchmark.extra_info["kvmpy_counterpart"] = C_TESTS[c_test]


@pytest.mark.parametrize("c_test", list(C_TESTS), ids=[n.split("/")[-1] for n in C_TESTS])
def test_kvmpy_counterpart(benchmark: Any, backend_name: str, c_test: str,
                           request: pytest.FixtureRequest) -> None:
    """The kvmpy file covering ``c_test``, serial, on this run's backend (timed only when the
    C binary is there too, so the two columns come from the same host and run)."""
    _c_binary(request, c_test)
    res: dict[str, Any] = {}

    def run() -> None:
        res.update(_pytest([C_TESTS[c_test]], backend_name, ["-p", "no:xdist"]))

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(res)
    assert res["rc"] in (0, 1), f"pytest child exited {res['rc']}"
