"""``kvmpy run``: the suite as one command, the way kernel developers run kselftests.

It runs pytest in-process on ``selftests/`` with pytest-xdist (``-n 1``: one forked test process,
kvmpy.testing.isolate), replaces pytest's terminal output with a header (kernel, KVM module and
parameters, VM types and guest_memfd flags of each backend), a live progress line and a summary
naming every failed test, and exits like a kselftest: 0 all passed, 1 something failed, 4
everything was skipped (KSFT_SKIP). Other exits: 5 nothing was collected, 2 usage error/interrupted/internal error.

Everything here is plain pytest underneath; docs/running.md lists the equivalent invocations.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from ..testing.ktap import OUTCOMES, Result, Results
from ..testing.require import NOT_APPLICABLE

EXIT_PASS, EXIT_FAIL, EXIT_ERROR, EXIT_SKIP, EXIT_NO_TESTS = 0, 1, 2, 4, 5

#: Seconds between progress lines when the output is not a terminal.
PROGRESS_EVERY = 30.0

DEFAULT_TIMEOUT = 120  # kvm selftests' own `settings` file: timeout=120


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default=os.environ.get("KVMPY_BACKEND", "auto"),
                   choices=["auto", "kvm", "emu", "both"],
                   help="real KVM, the emulated KVM, auto (real if /dev/kvm opens), or both")
    p.add_argument("--junit", metavar="PATH", help="write JUnit XML (pytest --junitxml)")
    p.add_argument("--ktap", metavar="PATH", help="write KTAP (kselftest format)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                   help=f"per-test timeout in seconds, 0 = none (default {DEFAULT_TIMEOUT})")
    p.add_argument("-n", "--numprocesses", dest="workers", type=int, default=None, metavar="N",
                   help=f"parallel worker processes, 0 = none (default: CPUs up to 8, "
                        f"here {default_workers()})")
    # Everything else on the command line goes to pytest (paths, -k EXPR, -m MARK,
    # --require-kvm, ...): the caller parses with parse_known_args.


def _looks_like_path(arg: str) -> bool:
    return not arg.startswith("-") and Path(arg.split("::")[0]).exists()


#: pytest's settings for the installed suite (pyproject.toml's, which only a checkout has).
SUITE_INI = Path(__file__).resolve().parent.parent / "testing" / "suite.ini"


def suite_dir() -> Path:
    """The suite: the package kvmpy.selftests (installed: in site-packages; an editable install:
    the checkout's selftests/), else selftests/ beside kvmpy (a checkout on sys.path)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("kvmpy.selftests")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        return Path(spec.origin).resolve().parent
    return Path(__file__).resolve().parents[2] / "selftests"


def _local_suite() -> bool:
    """A checkout's suite in the current directory (ids and settings from its pyproject.toml)."""
    return Path("selftests", "conftest.py").is_file()


def default_tests_path() -> str:
    """selftests/ of the current directory (a checkout), else the suite kvmpy carries."""
    return "selftests" if _local_suite() else str(suite_dir())


def _in_suite(arg: str, prev: str, suite: Path) -> str:
    """A ``selftests/...`` file or test id outside a checkout: that file of the suite kvmpy
    carries (not after --deselect, which matches test ids, and ids start with selftests/ anyway)."""
    path = arg.split("::")[0]
    if (prev == "--deselect" or not path.startswith("selftests/") or Path(path).exists()
            or not (suite.parent / path).exists()):
        return arg
    return str(suite.parent / arg)


def pytest_args(args: argparse.Namespace) -> list[str]:
    """The pytest command line ``kvmpy run`` amounts to (minus the terminal replacement)."""
    extra = [a for a in args.pytest_args if a != "--"]
    out: list[str] = []
    local = _local_suite()
    suite = suite_dir()
    if not local:
        extra = [_in_suite(a, prev, suite) for prev, a in zip(["", *extra], extra, strict=False)]
    paths = [a for a in extra if _looks_like_path(a)]
    if not paths:
        out.append(default_tests_path())
    if (not local and not (suite.parent / "pyproject.toml").is_file()
            and all(Path(a.split("::")[0]).resolve().is_relative_to(suite) for a in paths)
            and not any(a.startswith(("-c", "--rootdir", "--config-file")) for a in extra)):
        # The installed suite: ids relative to kvmpy/ (selftests/<file>::<test>, as in a
        # checkout: known_issues.py and --deselect match them) and the suite's own settings,
        # not whatever pytest.ini lies above the current directory.
        out += [f"--rootdir={suite.parent}", "-c", str(SUITE_INI)]
    workers = default_workers() if args.workers is None else args.workers
    out += ["-p", "kvmpy.testing.plugin", "-p", "kvmpy.testing.ktap", "-p", "kvmpy.testing.health",
            "-p", "kvmpy.testing.isolate", "--backend", args.backend, f"--timeout={args.timeout:g}"]
    # One worker is crash isolation only: a forked child (kvmpy.testing.isolate) gives it at a
    # fraction of an xdist worker's per-test cost; 0 runs in this process (for a debugger).
    out += ["-p", "no:xdist", "--isolate"] if workers == 1 else ["-n", str(workers)]
    if not any("bench" in Path(a.split("::")[0]).parts for a in paths):
        # No benchmark among the tests: pytest-benchmark would only run git and hg at start-up
        # for its project name (2.9 s in a TCG VM).
        out += ["-p", "no:benchmark"]
    if not any(a.startswith("--hypothesis") for a in extra):
        # No selftest is a @given test (the model drives hypothesis itself), and the plugin's
        # per-test hook wrappers cost ~0.75 ms a test on the host, ~10 s of a TCG VM's run.
        out += ["-p", "no:hypothesispytest"]
    if args.junit:
        out += [f"--junitxml={args.junit}"]
    if args.ktap:
        out += [f"--ktap={args.ktap}"]
    return out + extra


# -- checking the command line before anything runs ------------------------------------------

def check_output_path(path: str, option: str) -> None:
    """ConfigError unless ``path`` can be written; leaves the filesystem as it found it.

    A report that cannot be written used to fail only after the whole run (exit 1 with every
    test passed); trying it first costs nothing.
    """
    from ..backend.select import ConfigError

    p = Path(path)
    valid = "valid: a file path whose directory can be created and written"
    if p.is_dir():
        raise ConfigError(f"{option} {path}: is a directory; {valid}")
    created: list[Path] = []
    try:
        missing = [d for d in [p.parent, *p.parent.parents] if not d.exists()]
        for d in reversed(missing):  # pytest and the KTAP writer create missing directories
            d.mkdir()
            created.append(d)
        existed = p.exists()
        with open(p, "ab"):  # append: an existing report is not clobbered before the run
            pass
        if not existed:
            p.unlink()
    except OSError as e:
        raise ConfigError(f"{option} {path}: cannot write: {e.strerror}; {valid}") from None
    finally:
        for d in reversed(created):
            d.rmdir()


def check_args(args: argparse.Namespace) -> None:
    """ConfigError (one line) for a bad option of ``kvmpy run``, before the header or pytest."""
    import math

    from ..backend.select import EMU_PROFILES, ConfigError, choice

    if not math.isfinite(args.timeout) or args.timeout < 0:
        raise ConfigError(f"--timeout: invalid value {args.timeout:g}; valid: seconds >= 0 "
                          "(0 = none)")
    if args.workers is not None and args.workers < 0:
        raise ConfigError(f"-n/--numprocesses: invalid value {args.workers}; valid: a worker "
                          "count >= 0 (0 = no workers)")
    # --emu-profile goes through to pytest, but the header probes the emulator with it first.
    profile = _option_value(args.pytest_args, "--emu-profile")
    if profile is not None:
        choice(profile, EMU_PROFILES, "--emu-profile")
    for path, option in ((args.junit, "--junit"), (args.ktap, "--ktap")):
        if path is not None:
            check_output_path(path, option)


# -- header ------------------------------------------------------------------------------------

def _option_value(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def header_lines(backends: list[str], choice: str, emu_profile: str | None = None) -> list[str]:
    """Kernel, KVM module and parameters, and per backend the VM types and guest_memfd flags."""
    from ..backend.select import kvm_summary, make_backend
    from ..caps import _flag_names, probe
    from ..errors import KvmError, KvmUnavailable

    u = platform.uname()
    lines = [f"kernel    Linux {u.release} {u.version} ({u.machine})",
             f"backends  {', '.join(backends)} (--backend {choice})",
             f"KVM       {kvm_summary()}"]
    for name in backends:
        try:
            rep = probe(make_backend(name, emu_profile) if name == "emu" else make_backend(name))
        except (KvmUnavailable, NotImplementedError, KvmError, OSError, ValueError) as e:
            lines.append(f"[{name}]     unavailable: {e}")
            continue
        flags = "|".join(_flag_names(rep.guest_memfd_flags)) or "none"
        lines.append(f"[{name}]     {rep.backend}: VM types {', '.join(rep.vm_types) or 'none'}; "
                     f"guest_memfd flags {rep.guest_memfd_flags:#x} ({flags})")
        if name == "kvm" and "KVM_X86_SW_PROTECTED_VM" not in rep.vm_types:
            lines.append(_NO_PRIVATE_MEM + ("" if "emu" in backends else
                                            " Add the emulated KVM with --backend both."))
    if "kvm" in backends:
        from ..testing.health import describe

        lines.append(describe())
    return lines


_NO_PRIVATE_MEM = (
    "note      this KVM has no KVM_X86_SW_PROTECTED_VM: the private-memory part of the suite "
    "(the sw_protected cases, memory attributes, conversions, KVM_EXIT_MEMORY_FAULT) skips on "
    "real KVM here and runs only on the emulated KVM. For real KVM, boot a kernel with "
    "CONFIG_KVM_SW_PROTECTED_VM in a VM: kvmpy vm --kernel BZIMAGE (the CI's 7.3.4 kernel "
    "has it; docs/running.md, \"QEMU VMs on a kernel under test\").")


# -- live progress -----------------------------------------------------------------------------

class Progress:
    """A pytest plugin living in the controller: counts results and draws the progress line."""

    kvmpy_reports_in_parent = True  # kvmpy.testing.isolate: not in its test process

    def __init__(self, console: Any, live: bool) -> None:
        self.console = console
        self.live = live
        self.results = Results()
        self.total = 0
        self.last = ""
        self.started = time.monotonic()
        self._live: Any = None
        self.noted: set[str] = set()
        self.sink = io.StringIO()
        self.last_printed = self.started

    def _line(self) -> Any:
        from rich.text import Text

        c = self.results.counts()
        done = sum(c[o] for o in OUTCOMES)
        t = Text()
        t.append(f"[{done}/{self.total or '?'}] ")
        t.append(f"pass {c['pass']} ", style="green")
        t.append(f"fail {c['fail'] + c['error']} ", style="red" if c["fail"] + c["error"] else "")
        t.append(f"skip {c['skip'] - c['na']} ", style="yellow")
        if c["na"]:
            t.append(f"n/a {c['na']} ", style="dim")
        if c["xfail"] or c["xpass"]:
            t.append(f"xfail {c['xfail']} xpass {c['xpass']} ")
        t.append(f"{time.monotonic() - self.started:.0f}s  ", style="dim")
        t.append(self.last, style="dim")
        return t

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._line())

    @pytest.hookimpl(trylast=True)
    def pytest_configure(self, config: pytest.Config) -> None:
        # pytest's terminal reporter stays registered (its options, e.g. -ra in addopts, and
        # xdist's use of it keep working) but writes to a sink: this plugin draws the screen.
        tr = config.pluginmanager.getplugin("terminalreporter")
        if tr is not None:
            from _pytest._io import TerminalWriter

            tr._tw = TerminalWriter(file=self.sink)

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        if self.live:
            from rich.live import Live

            self._live = Live(self._line(), console=self.console, refresh_per_second=4,
                              transient=True)
            self._live.start()

    def _collected(self, ids: list[str]) -> None:
        first = not self.results.order
        self.results.expect(ids)
        self.total = len(self.results.order)
        if first:
            # Start-up cost (imports, collection) is worth knowing on slow machines and in VMs.
            self.console.print(f"collected {self.total} tests "
                               f"{time.monotonic() - self.started:.1f} s after start",
                               highlight=False)
        self._refresh()

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self._collected([i.nodeid for i in session.items])

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node: object, ids: list[str]) -> None:
        self._collected(list(ids))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        r = self.results.add(report)
        self.last = report.nodeid
        if report.when == "teardown" or report.failed:
            self._note(r)
        self._refresh()
        if self._live is None and time.monotonic() - self.last_printed > PROGRESS_EVERY:
            # No live line in a log (CI, a VM console): a progress line now and then instead.
            self.last_printed = time.monotonic()
            self.console.print(self._line())

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self._note(self.results.add_collect_error(report))

    def _note(self, r: Result) -> None:
        from rich.markup import escape

        # Failures are printed as they happen (above the live line); in a log, one line each.
        if r.outcome in ("fail", "error") and r.nodeid not in self.noted:
            self.noted.add(r.nodeid)
            self.console.print(f"[red]{r.outcome.upper():5}[/] {escape(r.nodeid)}  "
                               f"{escape(r.reason)}", highlight=False, soft_wrap=True)

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


# -- summary and exit code ---------------------------------------------------------------------

def exit_code(counts: dict[str, int], pytest_rc: int) -> int:
    if pytest_rc == pytest.ExitCode.NO_TESTS_COLLECTED:
        return EXIT_NO_TESTS
    if counts["fail"] or counts["error"]:
        return EXIT_FAIL
    if pytest_rc in (pytest.ExitCode.INTERRUPTED, pytest.ExitCode.INTERNAL_ERROR,
                     pytest.ExitCode.USAGE_ERROR):
        return EXIT_ERROR
    if pytest_rc == pytest.ExitCode.TESTS_FAILED:
        return EXIT_FAIL
    if counts["pass"] + counts["xfail"] + counts["xpass"] == 0 and counts["skip"]:
        return EXIT_SKIP
    return EXIT_PASS


_WHERE = re.compile(r" on (a KVM_X86_\w+_VM on )?(real KVM|emulated KVM)\b.*$")


def _what_is_missing(reason: str) -> str:
    """A skip reason without where it happened (the VM type and backend are in the test id),
    so skips group by what is missing."""
    return _WHERE.sub("", reason)


def _kind(missing: str) -> str:
    return ("capability of this kernel" if missing.startswith(("KVM_", "GUEST_MEMFD_"))
            else "machine resource or other")


def print_summary(console: Any, results: Results, pytest_rc: int, elapsed: float,
                  outputs: list[str]) -> None:
    from rich.markup import escape
    from rich.table import Table

    done = results.finished()
    failed = [r for r in done if r.outcome in ("fail", "error")]
    for r in failed:
        console.rule(f"[red]{r.outcome.upper()}[/] {escape(r.nodeid)}", style="red")
        detail = r.detail.strip().splitlines()
        if len(detail) > 60:
            detail = [f"... ({len(detail) - 60} lines above)", *detail[-60:]]
        console.print("\n".join(detail) or r.reason, markup=False, highlight=False)
    na = Counter(_what_is_missing(r.reason.removeprefix(NOT_APPLICABLE)) for r in done
                 if r.not_applicable)
    if na:
        console.rule("not applicable: ruled out by x86 KVM's design on any kernel (count)",
                     style="dim")
        for reason, n in na.most_common():
            console.print(f"{n:4}  {reason}", markup=False, highlight=False)
    skips = Counter(_what_is_missing(r.reason) for r in done
                    if r.outcome == "skip" and not r.not_applicable)
    if skips:
        for kind in ("capability of this kernel", "machine resource or other"):
            rows = [(m, n) for m, n in skips.most_common() if _kind(m) == kind]
            if rows:
                console.rule(f"skipped: missing {kind} (count)", style="yellow")
                for reason, n in rows:
                    console.print(f"{n:4}  {reason}", markup=False, highlight=False)

    backends = sorted({r.backend for r in done}, key=lambda b: (b == "", b))
    t = Table(title=f"results ({elapsed:.1f} s)", title_justify="left")
    t.add_column("backend")
    cols = (*OUTCOMES, "n/a")
    for o in cols:
        t.add_column(o, justify="right")

    def row(c: dict[str, int]) -> list[str]:
        return [str(c[o] - (c["na"] if o == "skip" else 0)) if o != "n/a" else str(c["na"])
                for o in cols]

    for b in backends:
        t.add_row(escape(f"[{b}]") if b else "(no backend)", *row(results.counts(b)))
    if len(backends) > 1:
        t.add_row("all", *row(results.counts()))
    if done:
        console.print(t)
    if failed:
        console.print(f"[red bold]{len(failed)} failed:[/]")
        for r in failed:
            console.print(f"  {escape(r.nodeid)}  [dim]{escape(r.reason)}[/]", highlight=False,
                          soft_wrap=True)
    not_run = [n for n in results.order if not results.by_id[n].outcome]
    if not_run:
        console.print(f"[red]{len(not_run)} collected test(s) did not run "
                      f"(pytest exit {int(pytest_rc)})[/]")
    if pytest_rc == pytest.ExitCode.NO_TESTS_COLLECTED:
        console.print("[red]no tests were collected[/]")
    for o in outputs:
        console.print(f"wrote {o}", highlight=False)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..backend.select import kvm_available

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    argv = pytest_args(args)
    # Header before pytest starts: a broken KVM should be visible even if collection fails.
    # (The same choice as kvmpy.testing.plugin.selected_backends.)
    if args.backend == "both":
        backends = ["kvm", "emu"]
    elif args.backend == "auto":
        backends = ["kvm" if kvm_available()[0] or "--require-kvm" in argv else "emu"]
    else:
        backends = [args.backend]
    console.rule("kvmpy run")
    for line in header_lines(backends, args.backend, _option_value(argv, "--emu-profile")):
        console.print(line, markup=False, highlight=False)
    console.print("pytest " + " ".join(argv), markup=False, highlight=False, style="dim")

    progress = Progress(console, live=console.is_terminal)
    start = time.monotonic()
    try:
        rc = pytest.main(["-p", "no:cacheprovider", *argv], plugins=[progress])
    finally:
        progress.stop()
    elapsed = time.monotonic() - start
    outputs = [p for p in (args.junit, args.ktap) if p]
    print_summary(console, progress.results, rc, elapsed, outputs)
    code = exit_code(progress.results.counts(), rc)
    if rc in (pytest.ExitCode.USAGE_ERROR, pytest.ExitCode.INTERNAL_ERROR) or (
            rc == pytest.ExitCode.INTERRUPTED and not progress.results.order):
        # Nothing of ours explains it: show what pytest would have printed.
        console.print(progress.sink.getvalue()[-4000:], markup=False, highlight=False)
    console.print(f"exit {code} ({_meaning(code)})", highlight=False)
    # The plain closing line CI log readers understand ("N passed, N failed, N skipped"); xfail and
    # xpass are in the table above.
    c = progress.results.counts()
    if c["na"]:
        console.print(f"kvmpy: {c['na']} not applicable (counted apart from the skips)",
                      markup=False, highlight=False)
    console.print(f"kvmpy: {c['pass']} passed, {c['fail'] + c['error']} failed, "
                  f"{c['skip'] - c['na']} skipped",
                  markup=False, highlight=False)
    return code


def _meaning(code: int) -> str:
    return {EXIT_PASS: "pass", EXIT_FAIL: "fail", EXIT_SKIP: "all skipped (KSFT_SKIP)",
            EXIT_NO_TESTS: "no tests collected",
            EXIT_ERROR: "interrupted, internal or usage error"}.get(code, "?")
