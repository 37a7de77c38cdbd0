"""``--isolate``: the tests run in a forked child process, so a test that kills its process
(SIGSEGV, SIGBUS, an oops that kills the task, ``os._exit``) fails alone and the rest go on.

This is what one pytest-xdist worker (``-n 1``) gives, without its cost: in a QEMU/TCG VM on 7.3,
300 trivial cases took 21-23 s in-process and 38-79 s with one xdist worker (execnet messages,
report serialisation in both processes, a second collection). Here the process that collected
(the parent) forks after collection; the child runs the tests and sends each report back over a
pipe as pytest's own serialisable form (``pytest_report_to_serializable``); the parent feeds them
to the reporting hooks (terminal, JUnit, KTAP, ``kvmpy run``'s progress), which run only there.
If the child dies, the test it was running gets a failed report naming how it died and in which
phase (its own reports are lost: the child writes once per test), and a new child continues with
the next test (its module and session fixtures are set up again).

Plugins whose reports belong to the parent are muted in the child: the terminal reporter (its
writer goes to stderr), JUnit's LogXML, and any plugin with ``kvmpy_reports_in_parent = True``.
"""

from __future__ import annotations

import json
import mmap
import os
import select
import signal
import struct
import sys
import traceback
import warnings
from typing import IO, Any

import pytest

#: A plugin with this attribute set is unregistered in the child: the parent reports for it.
PARENT_ONLY = "kvmpy_reports_in_parent"

#: Shared between the two processes (an anonymous shared mapping made before the fork): the
#: index of the test the child is running and its phase, for the parent to read if it dies.
WHERE = struct.Struct("<qq")
PHASES = ("setup", "call", "teardown")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("kvmpy").addoption(
        "--isolate", action="store_true", default=False,
        help="run the tests in a forked child: a test that crashes its process fails alone and "
             "a new child runs the rest (what one xdist worker gives, without its cost)")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--isolate") and not hasattr(config, "workerinput"):
        if getattr(config.option, "numprocesses", None):
            raise pytest.UsageError("--isolate is one child process: not with -n N (xdist)")
        if not hasattr(os, "fork"):
            raise pytest.UsageError("--isolate needs os.fork()")
        config.pluginmanager.register(Isolate(config), "kvmpy-isolate")


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = "unknown"
        return f"was killed by signal {sig} ({name})"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


class _Forwarder:
    """In the child: each report and warning, one JSON line on the pipe; where it is, in the
    shared record."""

    def __init__(self, config: pytest.Config, out: IO[str], where: mmap.mmap,
                 nodeids: dict[str, int]) -> None:
        self.config = config
        self.out = out
        self.where = where
        self.nodeids = nodeids
        # Registering replays the parent's historic pytest_warning_recorded calls (those it
        # already reported): only warnings raised in this process are sent.
        self.live = False

    def send(self, flush: bool = True, **msg: Any) -> None:
        # One write per test (at its logfinish): in a TCG VM each write wakes the parent on the
        # other vCPU. A crash loses the running test's lines; the shared record says which
        # test and phase it was.
        self.out.write(json.dumps(msg) + "\n")
        if flush:
            self.out.flush()

    def pytest_runtest_logstart(self, nodeid: str, location: tuple[str, int | None, str]) -> None:
        WHERE.pack_into(self.where, 0, self.nodeids[nodeid], 0)
        self.send(False, ev="start", nodeid=nodeid, location=location)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "teardown":  # what runs next: call after a setup that passed
            WHERE.pack_into(self.where, 0, self.nodeids[report.nodeid],
                            1 if report.when == "setup" and report.passed else 2)
        self.send(False, ev="report", data=self.config.hook.pytest_report_to_serializable(
            config=self.config, report=report))

    def pytest_runtest_logfinish(self, nodeid: str, location: tuple[str, int | None, str]) -> None:
        self.send(ev="finish", nodeid=nodeid, location=location)

    def pytest_warning_recorded(self, warning_message: warnings.WarningMessage, when: str,
                                nodeid: str, location: tuple[str, int, str] | None) -> None:
        if not self.live:
            return
        cat = warning_message.category
        self.send(ev="warning", message=str(warning_message.message),
                  category=f"{cat.__module__}:{cat.__qualname__}",
                  filename=warning_message.filename, lineno=warning_message.lineno,
                  when=when, nodeid=nodeid, location=location)


class _QuietTerminal:
    """The child's stand-in for the terminal reporter: plugins that write to the terminal
    (pytest-timeout's stack dump) reach stderr; results are drawn by the parent."""

    def __init__(self, config: pytest.Config) -> None:
        from _pytest._io import TerminalWriter

        self.config = config
        self._tw = TerminalWriter(file=sys.stderr)

    def write(self, content: str, **markup: bool) -> None:
        self._tw.write(content, **markup)

    def write_line(self, line: str, **markup: bool) -> None:
        self._tw.line(line, **markup)

    def line(self, msg: str = "", **kw: bool) -> None:
        self._tw.line(msg, **kw)

    def write_sep(self, sep: str, title: str | None = None, **markup: bool) -> None:
        self._tw.sep(sep, title, **markup)

    def section(self, title: str, sep: str = "=", **kw: bool) -> None:
        self._tw.sep(sep, title, **kw)

    def ensure_newline(self) -> None:
        self._tw.line()


def _tuples(data: dict[str, Any]) -> dict[str, Any]:
    """JSON made the report's tuples lists: a skip's longrepr (path, line, reason), location,
    user_properties' pairs; the reporting plugins expect tuples (JUnit asserts it)."""
    for key in ("longrepr", "location"):
        if isinstance(data.get(key), list):
            data[key] = tuple(data[key])
    if isinstance(data.get("user_properties"), list):
        data["user_properties"] = [tuple(p) for p in data["user_properties"]]
    return data


def _category(name: str) -> type[Warning]:
    module, _, qualname = name.partition(":")
    obj: Any = sys.modules.get(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, type) and issubclass(obj, Warning) else UserWarning


class Isolate:
    kvmpy_reports_in_parent = True

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> bool | None:
        if (session.testsfailed and not session.config.option.continue_on_collection_errors) \
                or session.config.option.collectonly:
            return None  # pytest's own loop raises or returns
        items = session.items
        nodeids = {item.nodeid: k for k, item in enumerate(items)}
        i = 0
        while i < len(items):
            i = self._run_child(session, items, i, nodeids)
            if session.shouldfail:
                raise session.Failed(session.shouldfail)
            if session.shouldstop:
                raise session.Interrupted(session.shouldstop)
        return True

    # -- parent ---------------------------------------------------------------------------------

    def _run_child(self, session: pytest.Session, items: list[pytest.Item], start: int,
                   nodeids: dict[str, int]) -> int:
        capman = self.config.pluginmanager.getplugin("capturemanager")
        if capman is not None:
            capman.suspend_global_capture()  # the child captures for itself
        sys.stdout.flush()
        sys.stderr.flush()
        r, w = os.pipe()
        where = mmap.mmap(-1, WHERE.size)
        WHERE.pack_into(where, 0, -1, 0)
        with warnings.catch_warnings():
            # Python 3.12+ warns about fork() with threads (a live progress line's): the child
            # only runs tests and writes to the pipe, it never touches what those threads hold.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:
            os.close(r)
            code = 70
            try:
                out = os.fdopen(w, "w", buffering=1 << 20)
                code = self._child(session, items, start, _Forwarder(self.config, out, where,
                                                                     nodeids))
            finally:
                os._exit(code)
        os.close(w)
        with where:
            return self._read_child(session, items, start, nodeids, pid, r, where)

    def _read_child(self, session: pytest.Session, items: list[pytest.Item], start: int,
                    nodeids: dict[str, int], pid: int, r: int, where: mmap.mmap) -> int:
        hook = self.config.hook
        running: int | None = None
        next_i = start
        outcome: dict[str, Any] = {}
        status: int | None = None
        buf = b""
        try:
            while True:
                # A grandchild (kvmpy.testing.child) may hold the pipe open after the child
                # died: EOF or the child's exit, whichever comes first.
                ready = select.select([r], [], [], 1.0)[0]
                chunk = os.read(r, 1 << 16) if ready else b""
                if not ready:
                    done, st = os.waitpid(pid, os.WNOHANG)
                    if done:
                        status = st
                        os.set_blocking(r, False)
                        try:
                            chunk = os.read(r, 1 << 20)
                        except BlockingIOError:
                            chunk = b""
                    else:
                        continue
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    msg = json.loads(line)
                    ev = msg["ev"]
                    if ev == "start":
                        running = nodeids[msg["nodeid"]]
                        hook.pytest_runtest_logstart(nodeid=msg["nodeid"],
                                                     location=tuple(msg["location"]))
                    elif ev == "report":
                        rep = hook.pytest_report_from_serializable(config=self.config,
                                                                   data=_tuples(msg["data"]))
                        hook.pytest_runtest_logreport(report=rep)
                    elif ev == "finish":
                        hook.pytest_runtest_logfinish(nodeid=msg["nodeid"],
                                                      location=tuple(msg["location"]))
                        if running is not None:
                            next_i, running = running + 1, None
                    elif ev == "warning":
                        self._warning(msg)
                    else:
                        outcome = msg
                if status is not None or (not chunk and ready):
                    break
        except KeyboardInterrupt:
            # The child got the same SIGINT; give it a moment to finish its test, then stop it.
            self._reap(pid, grace=5.0)
            raise
        finally:
            os.close(r)
        if status is None:
            status = self._reap(pid, grace=30.0)
        ev = outcome.get("ev")
        if ev == "interrupt":
            raise KeyboardInterrupt
        if ev == "exit":
            pytest.exit(outcome["msg"], outcome.get("returncode"))
        if ev == "stop":
            session.shouldstop = session.shouldstop or outcome.get("shouldstop") or False
            session.shouldfail = session.shouldfail or outcome.get("shouldfail") or False
            return next_i if running is None else running + 1
        if ev == "error":
            raise RuntimeError(f"kvmpy --isolate: the test process failed: {outcome['tb']}")
        if running is None and (next_i >= len(items) or ev == "done"):
            return next_i
        crashed, phase = (int(x) for x in WHERE.unpack_from(where, 0))
        if crashed < next_i:  # died between tests, or before the first
            crashed, phase = next_i, 0
        self._report_crash(items[crashed], describe_status(status), PHASES[phase],
                           started=running == crashed)
        return crashed + 1

    def _reap(self, pid: int, grace: float) -> int:
        import time

        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        return os.waitpid(pid, 0)[1]

    def _report_crash(self, item: pytest.Item, how: str, when: str, started: bool) -> None:
        hook = self.config.hook
        if not started:
            hook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        text = (f"the test process {how} during {when} of {item.nodeid}; the tests after it "
                f"run in a new process (--isolate)")
        keywords = {k: 1 for k in item.keywords}
        for phase, outcome, longrepr in ((when, "failed", text),
                                         *((("teardown", "passed", None),)
                                           if when != "teardown" else ())):
            hook.pytest_runtest_logreport(report=pytest.TestReport(
                item.nodeid, item.location, keywords, outcome, longrepr, phase,  # type: ignore[arg-type]
                user_properties=item.user_properties))
        hook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)

    def _warning(self, msg: dict[str, Any]) -> None:
        cat = _category(msg["category"])
        wm = warnings.WarningMessage(cat(msg["message"]), cat, msg["filename"], msg["lineno"])
        loc = msg["location"]
        self.config.hook.pytest_warning_recorded.call_historic(kwargs=dict(
            warning_message=wm, when=msg["when"], nodeid=msg["nodeid"],
            location=tuple(loc) if loc else None))

    # -- child ----------------------------------------------------------------------------------

    def _child(self, session: pytest.Session, items: list[pytest.Item], start: int,
               fwd: _Forwarder) -> int:
        from _pytest.junitxml import LogXML

        pm = self.config.pluginmanager
        try:
            for plugin in list(pm.get_plugins()):
                if isinstance(plugin, LogXML) or getattr(plugin, PARENT_ONLY, False):
                    pm.unregister(plugin)
            if pm.get_plugin("terminalreporter") is not None:
                pm.unregister(name="terminalreporter")
                pm.register(_QuietTerminal(self.config), "terminalreporter")
            pm.register(fwd, "kvmpy-isolate-forwarder")
            fwd.live = True
            for j in range(start, len(items)):
                nextitem = items[j + 1] if j + 1 < len(items) else None
                items[j].config.hook.pytest_runtest_protocol(item=items[j], nextitem=nextitem)
                if session.shouldfail or session.shouldstop:
                    # pytest's sessionfinish would tear down what is still set up.
                    session._setupstate.teardown_exact(None)
                    fwd.send(ev="stop", shouldfail=session.shouldfail,
                             shouldstop=session.shouldstop)
                    return 0
            fwd.send(ev="done")
            return 0
        except KeyboardInterrupt:
            fwd.send(ev="interrupt")
            return 0
        except pytest.exit.Exception as e:
            fwd.send(ev="exit", msg=e.msg, returncode=e.returncode)
            return 0
        except BaseException:
            fwd.send(ev="error", tb=traceback.format_exc())
            return 70
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
