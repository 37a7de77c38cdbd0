"""The KTAP writer (kvmpy.testing.ktap): kselftest-format lines, plan, totals, under xdist too."""

from __future__ import annotations

import platform
import re

import pytest

from kvmpy.testing.ktap import Result, Results, render

CASES = """
import pytest

@pytest.fixture
def broken():
    raise RuntimeError("fixture exploded")

def test_pass(backend_name):
    pass

def test_skip(backend_name):
    pytest.skip("KVM_CAP_MEMORY_ATTRIBUTES=0x0 on a KVM_X86_DEFAULT_VM")

def test_fail(backend_name):
    assert 1 == 2, "one is not two"

@pytest.mark.xfail(reason="known emulator gap", strict=False)
def test_xfail(backend_name):
    assert 0

@pytest.mark.xfail(reason="fixed upstream", strict=False)
def test_xpass(backend_name):
    pass

def test_error(backend_name, broken):
    pass

def test_second_pass(backend_name):
    pass
"""

RESULT_LINE = re.compile(r"^(ok|not ok) (\d+) (\S+)( # .*)?$")


def parse(text: str) -> tuple[list[str], int, list[tuple[str, int, str, str]], dict[str, int]]:
    lines = text.splitlines()
    assert lines[0] == "TAP version 13"
    plan = next(int(x[3:]) for x in lines if x.startswith("1.."))
    results = []
    for x in lines:
        m = RESULT_LINE.match(x)
        if m:
            results.append((m.group(1), int(m.group(2)), m.group(3), (m.group(4) or "")[3:]))
    totals_line = [x for x in lines if x.startswith("# Totals: ")]
    assert len(totals_line) == 1 and lines[-1] == totals_line[0]
    totals = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", totals_line[0])}
    header = [x for x in lines[1:lines.index(f"1..{plan}")]]
    return header, plan, results, totals


@pytest.mark.parametrize("workers", [["-n", "0"], ["-n", "2"], ["-n", "0", "--isolate"]],
                         ids=["no_xdist", "xdist", "isolate"])
def test_ktap_file(pytester: pytest.Pytester, workers: list[str]) -> None:
    pytester.makeconftest('pytest_plugins = ["kvmpy.testing.plugin", "kvmpy.testing.ktap", '
                          '"kvmpy.testing.isolate"]')
    pytester.makepyfile(test_cases=CASES)
    r = pytester.runpytest_subprocess("--backend", "both", *workers, "--ktap", "out.ktap",
                                      "-p", "no:cacheprovider")
    r.assert_outcomes(passed=4, failed=2, skipped=2, xfailed=2, xpassed=2, errors=2)
    header, plan, results, totals = parse((pytester.path / "out.ktap").read_text())
    assert plan == 14 == len(results)
    assert [n for _, n, _, _ in results] == list(range(1, 15))
    assert any(f"kernel Linux {platform.release()}" in h for h in header)
    assert any("backends kvm, emu" in h for h in header)
    by = {name: (status, directive) for status, _, name, directive in results}
    for b in ("kvm", "emu"):
        assert by[f"test_cases.py::test_pass[{b}]"] == ("ok", "")
        assert by[f"test_cases.py::test_skip[{b}]"] == (
            "ok", "SKIP KVM_CAP_MEMORY_ATTRIBUTES=0x0 on a KVM_X86_DEFAULT_VM")
        assert by[f"test_cases.py::test_fail[{b}]"] == ("not ok", "")
        assert by[f"test_cases.py::test_xfail[{b}]"] == ("ok", "XFAIL known emulator gap")
        assert by[f"test_cases.py::test_xpass[{b}]"] == ("ok", "XPASS fixed upstream")
        status, directive = by[f"test_cases.py::test_error[{b}]"]
        assert status == "not ok" and directive.startswith("error in setup")
    assert totals == {"pass": 4, "fail": 2, "xfail": 2, "xpass": 2, "skip": 2, "error": 2}
    # Every result line names its backend.
    assert all(name.endswith(("[kvm]", "[emu]")) for _, _, name, _ in results)
    # A failure's detail precedes its result line as '# ' diagnostics.
    text = (pytester.path / "out.ktap").read_text()
    assert re.search(r"# E +AssertionError: one is not two.*\n(#.*\n)*not ok \d+ "
                     r"test_cases.py::test_fail\[kvm\]", text)


def test_no_ktap_without_option(pytester: pytest.Pytester) -> None:
    pytester.makeconftest('pytest_plugins = ["kvmpy.testing.plugin", "kvmpy.testing.ktap"]')
    pytester.makepyfile(test_cases="def test_a():\n    pass\n")
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
    assert not list(pytester.path.glob("*.ktap"))


def test_collection_error_is_a_not_ok_line(pytester: pytest.Pytester) -> None:
    pytester.makeconftest('pytest_plugins = ["kvmpy.testing.plugin", "kvmpy.testing.ktap"]')
    pytester.makepyfile(test_ok="def test_a():\n    pass\n",
                        test_broken="import no_such_module_kvmpy\n")
    pytester.runpytest_subprocess("--ktap", "o.ktap", "-p", "no:cacheprovider")
    _, plan, results, totals = parse((pytester.path / "o.ktap").read_text())
    assert plan == len(results) == 2
    got = {n: (s, d) for s, _, n, d in results}
    assert got["test_broken.py"][0] == "not ok"
    assert got["test_broken.py"][1].startswith("collection error")
    # Collection errors stop pytest before any test runs: the collected test is not lost.
    assert got["test_ok.py::test_a"] == ("not ok", "error: did not run")
    assert totals["error"] == 2 and totals["pass"] == 0


def test_render_marks_unrun_tests_and_bail_out() -> None:
    res = Results()
    res.expect(["t.py::a[kvm]", "t.py::b[kvm]"])
    res.by_id["t.py::a[kvm]"].outcome = "pass"
    text = render(res, ["kernel X"], bail_out="run interrupted")
    _, plan, results, totals = parse(text)
    assert plan == 2
    assert results[1] == ("not ok", 2, "t.py::b[kvm]", "error: did not run")
    assert "Bail out! run interrupted" in text
    assert totals["error"] == 1 and totals["pass"] == 1


def test_names_never_contain_a_directive() -> None:
    res = Results()
    res.expect(["t.py::a[x#y-kvm]"])
    res.by_id["t.py::a[x#y-kvm]"].outcome = "pass"
    assert "ok 1 t.py::a[x_y-kvm]\n" in render(res, [])


@pytest.mark.parametrize("nodeid,backend", [
    ("t.py::a[kvm]", "kvm"), ("t.py::a[default-emu]", "emu"), ("t.py::a", ""),
    ("t.py::a[kvmish]", ""),
])
def test_result_backend(nodeid: str, backend: str) -> None:
    assert Result(nodeid).backend == backend
