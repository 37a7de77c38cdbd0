"""Host health on real KVM: a test that taints the kernel or makes it log a WARN/BUG fails.

For every test that ran on the real backend (id ``[kvm]``), the plugin remembers
/proc/sys/kernel/tainted and the kernel log position before the test, and after the test body
and again after its teardown looks at what changed. New taint bits (named as in
Documentation/admin-guide/tainted-kernels.rst) or new kernel log lines matching
:data:`BAD_LINE` (WARNING, BUG, Oops, general protection fault, "KVM internal error", ...)
turn the test into a failure whose report shows those lines. A problem first seen after
teardown makes the teardown an error.

The kernel log is read from /dev/kmsg (each reader has its own position, so this does not
disturb dmesg or other readers). When it is not readable (dmesg_restrict without CAP_SYSLOG,
no /dev/kmsg in a container) the report header says so once and only the taint is checked.
With pytest-xdist, tests run concurrently in several processes: a line is attributed to every
real-KVM test that was running when it appeared, and the message says that.

Environment (used by this plugin's own tests to inject a fake kernel, and by unusual hosts):
  KVMPY_KERNEL_LOG    a kernel log to read instead of /dev/kmsg: a path to a text file that
                      grows (one message per line), or "none"
  KVMPY_TAINT_FILE    instead of /proc/sys/kernel/tainted
Option ``--no-host-health`` turns the checks off.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
from collections.abc import Generator
from typing import Protocol

import pytest

DEFAULT_LOG = "/dev/kmsg"
DEFAULT_TAINT = "/proc/sys/kernel/tainted"

#: Lines that mean the kernel is unhappy (printk formats of WARN(), BUG(), die(), KASAN, UBSAN,
#: and KVM's "KVM internal error" reports).
BAD_LINE = re.compile(
    r"WARNING: |\bBUG: |kernel BUG at|\bOops\b|general protection fault|KVM internal error"
    r"|UBSAN: |KASAN: |Kernel panic|\[ cut here \]|RCU detected stall|soft lockup|hung_task")

#: Taint bits (Documentation/admin-guide/tainted-kernels.rst, "Table for decoding tainted state").
TAINT_FLAGS: dict[int, str] = {
    0: "P (proprietary module loaded)", 1: "F (module force-loaded)",
    2: "S (kernel running on an out of specification system)", 3: "R (module force-unloaded)",
    4: "M (machine check)", 5: "B (bad page referenced)", 6: "U (taint requested by userspace)",
    7: "D (kernel died recently: OOPS or BUG)", 8: "A (ACPI table overridden)",
    9: "W (kernel issued a warning)", 10: "C (staging driver loaded)",
    11: "I (firmware workaround applied)", 12: "O (out-of-tree module loaded)",
    13: "E (unsigned module loaded)", 14: "L (soft lockup occurred)",
    15: "K (kernel live-patched)", 16: "X (auxiliary taint)", 17: "T (built with struct randomization)",
    18: "N (in-kernel test run)", 19: "J (userspace used a mutating debug operation)",
}

#: How many lines of the kernel log a failure shows at most.
MAX_SHOWN = 60


def taint_names(bits: int) -> list[str]:
    return [TAINT_FLAGS.get(b, f"bit {b}") for b in range(bits.bit_length()) if bits >> b & 1]


class KernelLog(Protocol):
    """A source of kernel log lines: ``mark`` starts from now, ``read_new`` returns what came
    since the previous mark/read."""

    def mark(self) -> None: ...

    def read_new(self) -> list[str]: ...


_HEX_ESCAPE = re.compile(r"\\x([0-9a-f]{2})")


class KmsgLog:
    """/dev/kmsg: one record per read(2) ("prio,seq,usec,flags;text" then " KEY=value" lines);
    EPIPE means records were overwritten before we read them (say so and go on)."""

    def __init__(self, path: str = DEFAULT_LOG) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)

    def mark(self) -> None:
        os.lseek(self.fd, 0, os.SEEK_END)

    def read_new(self) -> list[str]:
        out: list[str] = []
        while True:
            try:
                rec = os.read(self.fd, 8192)
            except BlockingIOError:
                return out
            except OSError as e:
                if e.errno == errno.EPIPE:
                    out.append("(kvmpy: kernel log records were overwritten before they were read)")
                    continue
                raise
            if not rec:
                return out
            text = rec.decode("utf-8", "replace").split("\n", 1)[0]
            _, _, msg = text.partition(";")
            # printk escapes unprintable bytes as \xNN in /dev/kmsg records.
            out.append(_HEX_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), msg))

    def close(self) -> None:
        os.close(self.fd)


class FileLog:
    """A text file that grows one message per line (a fake kernel log for tests)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.pos = 0
        with open(path, "rb"):  # fail now, like /dev/kmsg, if it cannot be read
            pass

    def mark(self) -> None:
        self.pos = os.path.getsize(self.path)

    def read_new(self) -> list[str]:
        with open(self.path, "rb") as f:
            f.seek(self.pos)
            data = f.read()
        # Only whole lines: a writer may be in the middle of one.
        end = data.rfind(b"\n") + 1
        self.pos += end
        return data[:end].decode("utf-8", "replace").splitlines()


def open_log() -> tuple[KernelLog | None, str]:
    """The kernel log source and a description; (None, why) when it cannot be read."""
    path = os.environ.get("KVMPY_KERNEL_LOG") or DEFAULT_LOG
    if path == "none":
        return None, "KVMPY_KERNEL_LOG=none"
    try:
        log: KernelLog = KmsgLog(path) if path == DEFAULT_LOG else FileLog(path)
    except OSError as e:
        return None, f"{path}: {e.strerror}"
    return log, path


#: The taint files read_taint() keeps open (path -> fd): a look is one pread(2) at offset 0,
#: three per test, where open/read/close through a text file cost ~1 ms each in a TCG VM. The
#: first look comes from the report header, before any module's fd-leak check starts.
_taint_fds: dict[str, int] = {}


def read_taint() -> int | None:
    path = os.environ.get("KVMPY_TAINT_FILE") or DEFAULT_TAINT
    try:
        fd = _taint_fds.get(path)
        if fd is None:
            fd = _taint_fds[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        return int(os.pread(fd, 64, 0).strip() or b"0")
    except (OSError, ValueError):
        return None


def describe(config: pytest.Config | None = None) -> str:
    """The one header line: what the health check can see on this host."""
    if config is not None and config.getoption("--no-host-health", False):
        return "host health: off (--no-host-health)"
    taint = read_taint()
    taint_s = (f"{os.environ.get('KVMPY_TAINT_FILE') or DEFAULT_TAINT}={taint:#x}"
               if taint is not None else "kernel taint NOT readable")
    log, where = open_log()
    if log is None:
        return (f"host health: kernel log NOT readable ({where}): WARN/BUG lines are not "
                f"checked, only {taint_s}")
    if isinstance(log, KmsgLog):
        log.close()
    return f"host health: kernel log {where} readable, {taint_s} at start"


@dataclasses.dataclass
class _State:
    taint: int | None
    reported_taint: int = 0
    lines: list[str] = dataclasses.field(default_factory=list)
    reported_bad: int = 0


_state_key = pytest.StashKey[_State]()


def _uses_real_kvm(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    return bool(callspec and callspec.params.get("backend_name") == "kvm")


class HealthChecker:
    def __init__(self, config: pytest.Config) -> None:
        self.log, self.log_where = open_log()
        self.parallel = bool(getattr(config.option, "numprocesses", None)) or hasattr(
            config, "workerinput")

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        if not _uses_real_kvm(item):
            return
        if self.log is not None:
            self.log.mark()
        item.stash[_state_key] = _State(taint=read_taint())

    def _problems(self, st: _State) -> tuple[str, str]:
        """New problems since the last look: (one-line summary, detail), ("", "") if none."""
        short: list[str] = []
        parts: list[str] = []
        if self.log is not None:
            st.lines.extend(self.log.read_new())
        bad = [i for i, line in enumerate(st.lines) if BAD_LINE.search(line)]
        if len(bad) > st.reported_bad:
            first = bad[st.reported_bad]
            # The summary names the WARN/BUG itself, not the "cut here" line before it.
            new_bad = [st.lines[i].strip() for i in bad[st.reported_bad:]]
            short.append("kernel logged "
                         + repr(next((x for x in new_bad if "cut here" not in x), new_bad[0])))
            shown = st.lines[first:first + MAX_SHOWN]
            parts.append(f"the kernel logged {len(bad) - st.reported_bad} WARN/BUG-class "
                         f"line(s) during this test on real KVM:")
            parts.extend(f"    {line}" for line in shown)
            if len(st.lines) > first + MAX_SHOWN:
                parts.append(f"    ... ({len(st.lines) - first - MAX_SHOWN} more lines)")
            if self.parallel:
                parts.append("(tests run in parallel: a concurrent real-KVM test may have "
                             "caused these lines)")
            st.reported_bad = len(bad)
        now = read_taint()
        if st.taint is not None and now is not None:
            new = now & ~st.taint & ~st.reported_taint
            if new:
                names = ", ".join(taint_names(new))
                short.append(f"kernel tainted {names}")
                parts.append(f"the kernel became tainted during this test on real KVM: "
                             f"{st.taint:#x} -> {now:#x}, new: {names}")
                st.reported_taint |= new
        if not parts:
            return "", ""
        return "kvmpy host health: " + "; ".join(short), "\n".join(parts)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]
                                  ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        rep = yield
        st = item.stash.get(_state_key, None)
        if st is None or call.when == "setup":
            return rep
        summary, text = self._problems(st)
        if not text:
            return rep
        if rep.failed:
            # Keep the original failure (and its one-line crash message); add ours below it.
            addsection = getattr(rep.longrepr, "addsection", None)
            if addsection is not None:
                addsection(summary, text)
            else:
                rep.longrepr = f"{rep.longreprtext}\n\n{summary}\n{text}"
        else:
            rep.outcome = "failed"
            rep.longrepr = f"{summary}\n{text}"
            if hasattr(rep, "wasxfail"):
                del rep.wasxfail
        return rep


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("kvmpy").addoption(
        "--no-host-health", action="store_true", default=False,
        help="do not fail real-KVM tests that taint the kernel or make it log WARN/BUG lines")


def pytest_configure(config: pytest.Config) -> None:
    if not config.getoption("--no-host-health"):
        config.pluginmanager.register(HealthChecker(config), "kvmpy-host-health")


def pytest_report_header(config: pytest.Config) -> str | None:
    from .plugin import selected_backends

    if "kvm" in selected_backends(config):
        return describe(config)
    return None
