"""--isolate (kvmpy.testing.isolate): a test that kills its process fails alone, named with how
the process died; the rest run in a new process and every result reaches JUnit and the terminal."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

CASES = """
import os, signal, warnings
import pytest

@pytest.fixture(scope="module")
def pid():
    return os.getpid()

def test_first(pid):
    print("first-out")

def test_segv(pid):
    os.kill(os.getpid(), signal.SIGSEGV)

def test_after_segv(pid):
    assert pid == os.getpid()  # the module fixture was set up again in the new process

def test_fails(pid):
    assert 1 == 2, "one is not two"

def test_warns(pid):
    warnings.warn(UserWarning("isolated warning"))

def test_exits(pid):
    os._exit(3)

@pytest.fixture
def dies_in_setup():
    os.kill(os.getpid(), signal.SIGABRT)

@pytest.fixture
def dies_in_teardown():
    yield
    os._exit(4)

def test_setup_dies(dies_in_setup):
    pass

def test_teardown_dies(dies_in_teardown):
    pass

@pytest.mark.skip(reason="a reason")
def test_skipped():
    pass

def test_last():
    print("last-out")
"""


@pytest.fixture
def cases(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest('pytest_plugins = ["kvmpy.testing.isolate"]')
    pytester.makepyfile(test_cases=CASES)
    return pytester


def test_crashes_are_results(cases: pytest.Pytester) -> None:
    r = cases.runpytest_subprocess("--isolate", "-p", "no:cacheprovider", "-p", "no:xdist",
                                   "-rA", "--junitxml=out.xml")
    # test_teardown_dies is one error: the reports of a test whose process died are lost.
    r.assert_outcomes(passed=4, failed=3, errors=2, skipped=1, warnings=1)
    for line in ("the test process was killed by signal 11 (SIGSEGV) during call of "
                 "test_cases.py::test_segv; the tests after it run in a new process*",
                 "the test process exited with status 3 during call of test_cases.py::test_exits;*",
                 "the test process was killed by signal 6 (SIGABRT) during setup of "
                 "test_cases.py::test_setup_dies;*",
                 "the test process exited with status 4 during teardown of "
                 "test_cases.py::test_teardown_dies;*"):
        r.stdout.fnmatch_lines([line])
    out = r.stdout.str()
    assert "one is not two" in out and "isolated warning" in out and "last-out" in out
    cases_xml = {c.get("name"): c for c in ET.parse(cases.path / "out.xml").iter("testcase")}
    assert len(cases_xml) == 10
    segv = cases_xml["test_segv"].find("failure")
    assert segv is not None and "during call of test_cases.py::test_segv" in segv.get("message", "")
    assert cases_xml["test_skipped"].find("skipped") is not None
    assert cases_xml["test_after_segv"].find("failure") is None
    fails = cases_xml["test_fails"].find("failure")
    assert fails is not None and "one is not two" in fails.get("message", "")


def test_maxfail_stops_after_a_crash(cases: pytest.Pytester) -> None:
    r = cases.runpytest_subprocess("--isolate", "-x", "-p", "no:cacheprovider", "-p", "no:xdist")
    r.assert_outcomes(passed=1, failed=1)  # test_first, test_segv
    assert r.ret == pytest.ExitCode.TESTS_FAILED


def test_not_with_xdist(cases: pytest.Pytester) -> None:
    r = cases.runpytest_subprocess("--isolate", "-n", "2", "-p", "no:cacheprovider")
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    r.stderr.fnmatch_lines(["*--isolate is one child process: not with -n N (xdist)*"])
