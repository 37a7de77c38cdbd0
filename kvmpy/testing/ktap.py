"""KTAP / kselftest-format results for kernel CI (``--ktap PATH``).

The file follows what tools/testing/selftests/kselftest.h and kselftest/runner.sh print::

    TAP version 13
    # kvmpy: kernel Linux 6.12.117 (x86_64); backends kvm, emu (--backend both)
    1..3
    ok 1 selftests/test_memslots.py::test_invalid_flags[kvm]
    ok 2 selftests/test_memslots.py::test_v1_refuses_guest_memfd[kvm] # SKIP KVM_CAP_MEMORY_ATTRIBUTES=0x0 on ...
    # <failure details>
    not ok 3 selftests/test_memslots.py::test_bind_bad_fd[emu]
    # Totals: pass:1 fail:1 xfail:0 xpass:0 skip:1 error:0

Test ids end in ``[kvm]``/``[emu]``, so every result line names its backend. Under pytest-xdist
the file is written by the controller process only, from the reports the workers send back, in
collection order. :class:`Results` (the per-test outcome table) is shared with ``kvmpy run``.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
from pathlib import Path

import pytest

from .require import NOT_APPLICABLE

#: Outcome names, in the order of the kselftest ``# Totals`` line.
OUTCOMES = ("pass", "fail", "xfail", "xpass", "skip", "error")


@dataclasses.dataclass
class Result:
    nodeid: str
    outcome: str = "pass"
    #: skip/xfail reason, or the one-line failure message
    reason: str = ""
    #: failure/error detail (the report's long representation)
    detail: str = ""
    duration: float = 0.0

    @property
    def not_applicable(self) -> bool:
        """A skip that x86 KVM's design rules out on any kernel (kvmpy.testing.require)."""
        return self.outcome == "skip" and self.reason.startswith(NOT_APPLICABLE)

    @property
    def backend(self) -> str:
        """"kvm"/"emu" from the id's last parameter, else "" (a test that uses no backend)."""
        if self.nodeid.endswith("]") and "[" in self.nodeid:
            last = self.nodeid[self.nodeid.rindex("[") + 1:-1].split("-")[-1]
            if last in ("kvm", "emu"):
                return last
        return ""


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    lr = report.longrepr
    if isinstance(lr, tuple) and len(lr) == 3:
        msg = str(lr[2])
    else:
        msg = str(lr or "")
    return msg.removeprefix("Skipped: ").strip()


_XDIST_LINE = re.compile(r"\[gw\d+\] \w+ -- Python ")


def _crash_message(report: pytest.TestReport | pytest.CollectReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return str(crash.message).splitlines()[0] if crash.message else ""
    # A string longrepr (the health check's): its first line, past xdist's "[gw0] linux" line.
    lines = [ln for ln in report.longreprtext.strip().splitlines() if not _XDIST_LINE.match(ln)]
    return lines[0] if lines else ""


class Results:
    """Per-test outcomes from setup/call/teardown reports, in the order tests were collected.

    The mapping follows pytest's own accounting: a failed setup or teardown is an ``error``,
    ``xfail`` is an expected failure, a non-strict unexpected pass is ``xpass`` (a strict one
    is a ``fail``, as pytest reports it).
    """

    def __init__(self) -> None:
        self.order: list[str] = []
        self.by_id: dict[str, Result] = {}

    def expect(self, nodeids: list[str]) -> None:
        """Record the collection order (the KTAP plan)."""
        for n in nodeids:
            if n not in self.by_id:
                self.order.append(n)
                self.by_id[n] = Result(n, outcome="")

    def _get(self, nodeid: str) -> Result:
        if nodeid not in self.by_id:
            self.order.append(nodeid)
            self.by_id[nodeid] = Result(nodeid, outcome="")
        return self.by_id[nodeid]

    def add(self, report: pytest.TestReport) -> Result:
        r = self._get(report.nodeid)
        r.duration += getattr(report, "duration", 0.0) or 0.0
        xfail = getattr(report, "wasxfail", None)
        if report.when == "setup":
            if report.failed:
                r.outcome, r.reason = "error", f"error in setup: {_crash_message(report)}"
                r.detail = report.longreprtext
            elif report.skipped:
                if xfail is not None:
                    r.outcome, r.reason = "xfail", str(xfail)
                else:
                    r.outcome, r.reason = "skip", _skip_reason(report)
        elif report.when == "call":
            if report.failed:
                r.outcome, r.reason = "fail", _crash_message(report)
                r.detail = report.longreprtext
            elif report.skipped:
                if xfail is not None:
                    r.outcome, r.reason = "xfail", str(xfail)
                else:
                    r.outcome, r.reason = "skip", _skip_reason(report)
            elif xfail is not None:
                r.outcome, r.reason = "xpass", str(xfail)
            else:
                r.outcome = "pass"
        elif report.failed:  # teardown
            if r.outcome != "fail":
                r.outcome, r.reason = "error", f"error in teardown: {_crash_message(report)}"
                r.detail = report.longreprtext
            else:
                r.detail += "\n" + report.longreprtext
        elif r.outcome == "":
            # A teardown report with no setup/call outcome: setup passed, call never ran.
            r.outcome = "pass"
        return r

    def add_collect_error(self, report: pytest.CollectReport) -> Result:
        """A module that failed to import is an error result of its own."""
        r = self._get(report.nodeid or "<collection>")
        r.outcome, r.reason = "error", f"collection error: {_crash_message(report)}"
        r.detail = report.longreprtext
        return r

    def finished(self) -> list[Result]:
        return [self.by_id[n] for n in self.order if self.by_id[n].outcome]

    def counts(self, backend: str | None = None) -> dict[str, int]:
        """Outcome counts; ``skip`` includes the not-applicable ones, also counted in ``na``."""
        c = dict.fromkeys((*OUTCOMES, "na"), 0)
        for r in self.finished():
            if backend is None or r.backend == backend:
                c[r.outcome] += 1
                c["na"] += r.not_applicable
        return c


def totals_line(counts: dict[str, int]) -> str:
    return "# Totals: " + " ".join(f"{k}:{counts[k]}" for k in OUTCOMES)


def _name(nodeid: str) -> str:
    # '#' starts a directive in TAP and a newline ends the line: neither may appear in a name.
    return nodeid.replace("#", "_").replace("\n", " ")


def _directive_text(s: str) -> str:
    return " ".join(s.split())


def render(results: Results, header: list[str], unfinished: list[str] | None = None,
           bail_out: str = "") -> str:
    """The KTAP document: every collected test gets a line (one that never ran is ``not ok``
    with ``# error: did not run``), so the plan always matches the lines."""
    done = results.finished()
    missing = unfinished if unfinished is not None else [
        n for n in results.order if not results.by_id[n].outcome]
    lines = ["TAP version 13", *(f"# {h}" for h in header), f"1..{len(done) + len(missing)}"]
    n = 0
    for r in done:
        n += 1
        name = _name(r.nodeid)
        if r.outcome == "pass":
            lines.append(f"ok {n} {name}")
        elif r.outcome == "skip":
            lines.append(f"ok {n} {name} # SKIP {_directive_text(r.reason)}")
        elif r.outcome == "xfail":
            lines.append(f"ok {n} {name} # XFAIL {_directive_text(r.reason)}")
        elif r.outcome == "xpass":
            lines.append(f"ok {n} {name} # XPASS {_directive_text(r.reason)}")
        else:
            # kselftest prints a failing test's output as '# ' lines before its result line.
            detail = [ln for ln in r.detail.strip().splitlines()
                      if not _XDIST_LINE.match(ln)][-40:] or [r.reason]
            lines.extend(f"# {d}".rstrip() for d in detail)
            suffix = f" # {r.reason.split(':')[0]}" if r.outcome == "error" else ""
            lines.append(f"not ok {n} {name}{suffix}")
    counts = results.counts()
    for nodeid in missing:
        n += 1
        counts["error"] += 1
        lines.append(f"not ok {n} {_name(nodeid)} # error: did not run")
    if bail_out:
        lines.append(f"Bail out! {_directive_text(bail_out)}")
    # kselftest's Totals has no such outcome: the split is a comment line before it.
    lines.append(f"# kvmpy: of the skips, {counts['na']} not applicable (ruled out by x86 KVM's "
                 f"design on any kernel), {counts['skip'] - counts['na']} for a missing "
                 "capability or resource")
    lines.append(totals_line(counts))
    return "\n".join(lines) + "\n"


def run_header(config: pytest.Config) -> list[str]:
    """Which kernel and backends produced these results (the lines start the KTAP file)."""
    from ..backend.host import kvm_module, kvm_module_params
    from .plugin import selected_backends

    uname = platform.uname()
    lines = [f"kvmpy: kernel Linux {uname.release} ({uname.machine}) {uname.version}",
             f"kvmpy: backends {', '.join(selected_backends(config))} "
             f"(--backend {config.getoption('--backend')})"]
    if "emu" in selected_backends(config):
        profile = config.getoption("--emu-profile", None) or os.environ.get(
            "KVMPY_EMU_PROFILE", "upstream")
        lines.append(f"kvmpy: emulated KVM profile {profile}")
    if "kvm" in selected_backends(config):
        params = " ".join(f"{k}={v}" for k, v in kvm_module_params().items())
        lines.append(f"kvmpy: real KVM module {kvm_module()} {params}".rstrip())
        from .health import describe

        lines.append(f"kvmpy: {describe(config)}")
    return lines


class KtapWriter:
    """Collects reports in the process that sees them all, writes the file at session end."""

    kvmpy_reports_in_parent = True  # kvmpy.testing.isolate: not in its test process

    def __init__(self, config: pytest.Config, path: str) -> None:
        self.config = config
        self.path = Path(path)
        self.results = Results()
        self.header = run_header(config)

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.results.expect([i.nodeid for i in session.items])

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node: object, ids: list[str]) -> None:
        self.results.expect(list(ids))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.results.add(report)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.results.add_collect_error(report)

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        bail = ""
        if exitstatus == pytest.ExitCode.INTERRUPTED:
            bail = "run interrupted"
        elif exitstatus == pytest.ExitCode.INTERNAL_ERROR:
            bail = "pytest internal error"
        text = render(self.results, self.header, bail_out=bail)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        tmp.write_text(text)
        tmp.replace(self.path)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("kvmpy").addoption(
        "--ktap", metavar="PATH", default=None,
        help="write results as KTAP (kselftest format: ok/not ok N id # SKIP reason, # Totals)")


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("--ktap", None)
    # Under xdist only the controller (no workerinput) sees every worker's reports.
    if path and not hasattr(config, "workerinput"):
        config.pluginmanager.register(KtapWriter(config, path), "kvmpy-ktap-writer")
