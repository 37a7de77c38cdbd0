"""Run a function in a forked child, so that a crash (SIGSEGV, SIGBUS) is a result, not the end
of the test process: hostile-use tests and the API fuzz test use it."""

from __future__ import annotations

import dataclasses
import os
import select
import signal
import time
import traceback
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class ChildOutcome:
    signal: int | None
    exitcode: int | None
    #: The child's exception (type name and message) or return text.
    text: str
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.exitcode == 0 and not self.timed_out

    def describe(self) -> str:
        if self.timed_out:
            return "child timed out (killed)"
        if self.signal is not None:
            return f"child killed by {signal.Signals(self.signal).name}"
        return f"child exited {self.exitcode}: {self.text}".rstrip(": ")


def run_in_child(fn: Callable[[], str | None], timeout: float = 60.0) -> ChildOutcome:
    """fork; the child runs ``fn`` and exits 0 (its return text reported) or 1 with the
    exception's ``Type: message`` and traceback; the parent waits at most ``timeout`` s."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        code = 0
        try:
            text = fn() or ""
        except BaseException as e:
            text = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
            code = 1
        try:
            os.write(w, text.encode(errors="replace")[:1 << 16])
        finally:
            os._exit(code)
    os.close(w)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    timed_out = False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                os.kill(pid, signal.SIGKILL)
                break
            ready, _, _ = select.select([r], [], [], left)
            if not ready:
                continue
            b = os.read(r, 1 << 16)
            if not b:
                break
            chunks.append(b)
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    text = b"".join(chunks).decode(errors="replace")
    if os.WIFSIGNALED(status) and not timed_out:
        return ChildOutcome(os.WTERMSIG(status), None, text)
    return ChildOutcome(None, os.WEXITSTATUS(status) if os.WIFEXITED(status) else None, text,
                        timed_out)


__all__ = ["ChildOutcome", "run_in_child"]
