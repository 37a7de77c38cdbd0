"""`kvmpy run`: header, summary, JUnit/KTAP files and kselftest exit codes."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from kvmpy.app.run import (
    EXIT_FAIL,
    EXIT_NO_TESTS,
    EXIT_PASS,
    EXIT_SKIP,
    add_arguments,
    exit_code,
    pytest_args,
)

MIXED = """
import pytest

def test_ok(backend_name):
    pass

def test_skipped(backend_name):
    pytest.skip("KVM_CAP_PRE_FAULT_MEMORY=0x0 on a fake KVM")

def test_broken(backend_name):
    assert backend_name == "nothing", "deliberate failure"
"""

ALL_SKIP = """
import pytest

def test_a(backend_name):
    pytest.skip("KVM_X86_SW_PROTECTED_VM not in KVM_CAP_VM_TYPES=0x1")

def test_b(backend_name):
    pytest.skip("KVM_CAP_GUEST_MEMFD=0x0")
"""

ALL_PASS = """
def test_a(backend_name):
    pass

@__import__("pytest").mark.xfail(reason="known", strict=True)
def test_b(backend_name):
    assert False
"""

HANGS = """
import time

def test_sleeps(backend_name):
    time.sleep(30)
"""


def kvmpy_run(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVMPY_", "PYTEST_"))}
    env["KVMPY_KERNEL_LOG"] = "none"
    return subprocess.run([sys.executable, "-m", "kvmpy", "run", *args], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=240)


def test_mixed_run_writes_junit_and_ktap_and_fails(tmp_path: Path) -> None:
    (tmp_path / "test_mixed.py").write_text(MIXED)
    r = kvmpy_run(tmp_path, "--backend", "both", "-n", "2", "--junit", "out/j.xml",
                  "--ktap", "out/k.ktap", "test_mixed.py")
    assert r.returncode == EXIT_FAIL, r.stdout + r.stderr
    out = r.stdout
    # Header: kernel, backends, KVM and what each backend offers.
    assert f"Linux {platform.release()}" in out
    assert "backends  kvm, emu (--backend both)" in out
    assert "KVM       " in out and "[kvm]" in out and "[emu]" in out
    # Summary: every failed test by name with its reason, and the skip reasons.
    assert "2 failed:" in out
    for b in ("kvm", "emu"):
        assert f"test_mixed.py::test_broken[{b}]  AssertionError: deliberate failure" in out
    assert "KVM_CAP_PRE_FAULT_MEMORY=0x0 on a fake KVM" in out
    assert "exit 1 (fail)" in out
    # JUnit: one case per test and backend, the backend recorded as a property.
    cases = list(ET.parse(tmp_path / "out/j.xml").getroot().iter("testcase"))
    assert len(cases) == 6
    props = {c.get("name"): {p.get("name"): p.get("value") for p in c.iter("property")}
             for c in cases}
    assert props["test_ok[kvm]"]["backend"] == "kvm"
    assert props["test_ok[emu]"]["backend"] == "emu"
    ktap = (tmp_path / "out/k.ktap").read_text()
    assert ktap.startswith("TAP version 13\n")
    assert "1..6\n" in ktap
    assert ktap.rstrip().endswith("# Totals: pass:2 fail:2 xfail:0 xpass:0 skip:2 error:0")


def test_all_skipped_is_ksft_skip(tmp_path: Path) -> None:
    (tmp_path / "test_skips.py").write_text(ALL_SKIP)
    r = kvmpy_run(tmp_path, "--backend", "emu", "-n", "0", "test_skips.py")
    assert r.returncode == EXIT_SKIP, r.stdout + r.stderr
    assert "exit 4 (all skipped (KSFT_SKIP))" in r.stdout


def test_pass_with_xfail_is_zero(tmp_path: Path) -> None:
    (tmp_path / "test_pass.py").write_text(ALL_PASS)
    r = kvmpy_run(tmp_path, "--backend", "emu", "-n", "0", "test_pass.py")
    assert r.returncode == EXIT_PASS, r.stdout + r.stderr
    assert "collected 2 tests" in r.stdout


def test_no_tests_is_five(tmp_path: Path) -> None:
    (tmp_path / "test_empty.py").write_text("X = 1\n")
    r = kvmpy_run(tmp_path, "--backend", "emu", "-n", "0", "test_empty.py")
    assert r.returncode == EXIT_NO_TESTS, r.stdout + r.stderr
    assert "no tests were collected" in r.stdout


def test_timeout_fails_the_test(tmp_path: Path) -> None:
    (tmp_path / "test_hang.py").write_text(HANGS)
    r = kvmpy_run(tmp_path, "--backend", "emu", "-n", "0", "--timeout", "2", "test_hang.py")
    assert r.returncode == EXIT_FAIL, r.stdout + r.stderr
    assert "Timeout (>2.0s) from pytest-timeout" in r.stdout


CRASHES = """
import os, signal

def test_before(backend_name):
    pass

def test_crashes(backend_name):
    os.kill(os.getpid(), signal.SIGBUS)

def test_after(backend_name):
    pass
"""


def test_one_worker_is_a_forked_child_a_crash_fails_alone(tmp_path: Path) -> None:
    (tmp_path / "test_crash.py").write_text(CRASHES)
    r = kvmpy_run(tmp_path, "--backend", "emu", "-n", "1", "--junit", "j.xml", "test_crash.py")
    assert r.returncode == EXIT_FAIL, r.stdout + r.stderr
    assert "--isolate" in r.stdout  # the pytest command line it ran
    assert ("test_crash.py::test_crashes[emu]  the test process was killed by signal 7 (SIGBUS)"
            in r.stdout), r.stdout
    assert "kvmpy: 2 passed, 1 failed, 0 skipped" in r.stdout
    assert len(list(ET.parse(tmp_path / "j.xml").getroot().iter("testcase"))) == 3


def test_pytest_args_and_defaults() -> None:
    p = argparse.ArgumentParser()
    add_arguments(p)
    a = p.parse_args(["--backend", "kvm", "--ktap", "k", "--junit", "j", "-n", "3"])
    a.pytest_args = ["-k", "memslot", "--require-kvm"]
    argv = pytest_args(a)
    assert argv[0].endswith("selftests")  # no path given: the suite
    for want in (["--backend", "kvm"], ["-n", "3"], ["--timeout=120"], ["--ktap=k"],
                 ["--junitxml=j"], ["-k", "memslot", "--require-kvm"]):
        assert any(argv[i:i + len(want)] == want for i in range(len(argv))), (want, argv)
    a.pytest_args = [__file__]  # a path given: no default path
    assert not pytest_args(a)[0].endswith("selftests")
    a.workers = 1  # one worker: a forked child, not xdist
    argv = pytest_args(a)
    assert "-n" not in argv and "--isolate" in argv and "no:xdist" in argv
    assert "no:benchmark" in argv and "no:hypothesispytest" in argv
    a.pytest_args = ["bench/bench_emu.py"]  # benchmarks need their plugin
    assert "no:benchmark" not in pytest_args(a)
    a.pytest_args = ["--hypothesis-show-statistics"]  # hypothesis' own options need its plugin
    assert "no:hypothesispytest" not in pytest_args(a)


@pytest.mark.parametrize("counts,rc,want", [
    ({"pass": 3}, 0, EXIT_PASS),
    ({"pass": 3, "fail": 1}, 1, EXIT_FAIL),
    ({"pass": 3, "error": 1}, 1, EXIT_FAIL),
    ({"skip": 5}, 0, EXIT_SKIP),
    ({"skip": 5, "xfail": 1}, 0, EXIT_PASS),
    ({}, 5, EXIT_NO_TESTS),
    ({"pass": 1}, 2, 2),  # interrupted
    ({"pass": 1, "fail": 1}, 2, EXIT_FAIL),
])
def test_exit_code(counts: dict[str, int], rc: int, want: int) -> None:
    full = dict.fromkeys(("pass", "fail", "xfail", "xpass", "skip", "error"), 0) | counts
    assert exit_code(full, rc) == want


def test_cli_help_lists_run() -> None:
    r = subprocess.run([sys.executable, "-m", "kvmpy", "run", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0
    assert "--ktap" in r.stdout and "--junit" in r.stdout and "Exit: 0 pass" in r.stdout


NOT_APPLICABLE = """
import pytest
from kvmpy.testing.require import NOT_APPLICABLE

def test_na(backend_name):
    pytest.skip(NOT_APPLICABLE + "ruled out by design; KVM_CAP_X=0x0")

def test_real_skip(backend_name):
    pytest.skip("KVM_CAP_PRE_FAULT_MEMORY=0x0 on a KVM_X86_DEFAULT_VM on emulated KVM (fake)")

def test_resource(backend_name):
    pytest.skip("host has 1 NUMA node(s)")

def test_ok(backend_name):
    pass
"""


def test_not_applicable_is_counted_apart(tmp_path: Path) -> None:
    """A not-applicable skip is not a skip in the summary's closing line; the real skips are
    grouped by what is missing, without the where; KTAP and JUnit carry the same split."""
    (tmp_path / "test_na.py").write_text(NOT_APPLICABLE)
    r = kvmpy_run(tmp_path, "--backend", "emu", "-n", "0", "--junit", "j.xml", "--ktap",
                  "k.ktap", "test_na.py")
    assert r.returncode == EXIT_PASS, r.stdout + r.stderr
    out = r.stdout
    assert out.rstrip().splitlines()[-1] == "kvmpy: 1 passed, 0 failed, 2 skipped", out
    assert "kvmpy: 1 not applicable (counted apart from the skips)" in out
    assert "missing capability of this kernel" in out and "missing machine resource" in out
    assert "   1  KVM_CAP_PRE_FAULT_MEMORY=0x0\n" in out, out
    ktap = (tmp_path / "k.ktap").read_text()
    assert "# kvmpy: of the skips, 1 not applicable" in ktap and "skip:3" in ktap
    props = [(p.get("name"), p.get("value")) for p in ET.parse(tmp_path / "j.xml").iter("property")]
    assert props.count(("outcome", "not_applicable")) == 1, props


@pytest.mark.parametrize("types,noted", [(["KVM_X86_DEFAULT_VM"], True),
                                         (["KVM_X86_DEFAULT_VM", "KVM_X86_SW_PROTECTED_VM"], False)],
                         ids=["no_private_mem", "sw_protected"])
def test_header_says_what_only_the_emulator_covers(monkeypatch: pytest.MonkeyPatch,
                                                   types: list[str], noted: bool) -> None:
    from kvmpy import caps
    from kvmpy.app import run as run_mod
    from kvmpy.backend import select

    rep = caps.CapReport("real KVM (fake)", "6.x", 12, {}, {}, types, 0)
    monkeypatch.setattr(caps, "probe", lambda backend: rep)
    monkeypatch.setattr(select, "make_backend", lambda *a: None)
    monkeypatch.setattr(select, "kvm_available", lambda *a: (False, "fake"))
    lines = run_mod.header_lines(["kvm"], "kvm")
    note = [ln for ln in lines if ln.startswith("note ")]
    assert bool(note) == noted, lines
    if noted:
        assert "kvmpy vm --kernel" in note[0] and "--backend both" in note[0]
