"""Touch memory in a forked child and report how it died (the selftests' TEST_EXPECT_SIGBUS).

A guest_memfd mapping raises SIGBUS for pages past the end of the file and for pages that are not
shared (guest_memfd without GUEST_MEMFD_FLAG_INIT_SHARED); catching that in-process is unsafe from
Python, so the access runs in a child. The child reports each page offset before it touches it, so
the parent learns exactly where the fault happened. Writes through MAP_SHARED mappings made before
the fault are visible to the parent afterwards.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import faulthandler
import os
import signal
import struct
import time

from ..uapi import PAGE_SIZE

_DONE = 2**64 - 1


@dataclasses.dataclass(frozen=True)
class ChildResult:
    """How the child ended: the terminating signal or exit code, and the offsets it reached."""

    signal: int | None
    exitcode: int | None
    #: offsets announced before each access; the last one is where a fatal signal hit.
    reached: tuple[int, ...]
    completed: bool
    timed_out: bool = False

    @property
    def sigbus(self) -> bool:
        return self.signal == signal.SIGBUS

    @property
    def faulted_at(self) -> int | None:
        """The offset whose access killed the child (None if it was not killed by a signal)."""
        if self.signal is None or not self.reached:
            return None
        return self.reached[-1]

    def describe(self) -> str:
        if self.timed_out:
            how = "timed out (killed)"
        elif self.signal is not None:
            how = f"killed by {signal.Signals(self.signal).name}"
        else:
            how = f"exited {self.exitcode}"
        where = f" at offset {self.faulted_at:#x}" if self.faulted_at is not None else ""
        done = "all accesses completed" if self.completed else \
            f"{len(self.reached)} access(es) started"
        return f"child {how}{where}; {done}"


def touch(addr: int, length: int, *, write: bool, value: int = 0xAA, step: int = PAGE_SIZE,
          timeout: float = 20.0) -> ChildResult:
    """Access [addr, addr+length) in ``step`` chunks from a forked child.

    write=True memsets each chunk to ``value``; write=False reads it. Returns how the child ended.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: nothing but syscalls and ctypes, then _exit
        code = 0
        try:
            os.close(r)
            faulthandler.disable()
            for sig in (signal.SIGBUS, signal.SIGSEGV, signal.SIGALRM):
                signal.signal(sig, signal.SIG_DFL)
            signal.alarm(max(1, int(timeout)))
            for off in range(0, length, step):
                n = min(step, length - off)
                os.write(w, struct.pack("<Q", off))
                if write:
                    ctypes.memset(addr + off, value, n)
                else:
                    ctypes.string_at(addr + off, n)
            os.write(w, struct.pack("<Q", _DONE))
        except BaseException:
            code = 3
        finally:
            os._exit(code)
    os.close(w)
    os.set_blocking(r, False)
    data = bytearray()
    deadline = time.monotonic() + timeout + 5
    status = 0
    timed_out = False
    while True:
        _drain(r, data)
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            timed_out = True
            break
        time.sleep(0.002)
    _drain(r, data)
    os.close(r)
    offs = [struct.unpack_from("<Q", data, i)[0] for i in range(0, len(data) - 7, 8)]
    completed = bool(offs) and offs[-1] == _DONE
    if completed:
        offs.pop()
    killed_by = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    exitcode = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    return ChildResult(killed_by, exitcode, tuple(offs), completed, timed_out)


def _drain(fd: int, into: bytearray) -> None:
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                return
            raise
        if not chunk:
            return
        into += chunk


__all__ = ["ChildResult", "touch"]
