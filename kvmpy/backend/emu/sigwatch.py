"""Noticing signals during an emulated KVM_RUN, so it ends as real KVM's does.

Real KVM leaves the guest when a signal is pending for the vCPU thread and KVM_RUN fails with
EINTR, exit_reason KVM_EXIT_INTR (arch/x86/kvm/x86.c vcpu_run(): kvm_handle_signal_exit() on
__xfer_to_guest_mode_work_pending()). The emulator runs guest code in slices; Python's C-level
signal handler runs in whatever thread the kernel picked and the Python handler later runs in
the main thread, between bytecodes. Neither tells the emulator that a signal came, so during a
run in the main thread a private pipe is the process's wakeup fd (signal.set_wakeup_fd: the C
handler writes the signal number to it for every signal with a Python-level handler) and the
vCPU checks it between slices.

set_wakeup_fd is process-wide and main-thread-only: runs in other threads are not watched (a
process-directed signal goes to the main thread unless it blocks it, kernel/signal.c
complete_signal(), so real KVM would rarely see it there either); a wakeup fd someone else
installed (asyncio's loop) is restored afterwards and gets every byte that arrived meanwhile.
"""

from __future__ import annotations

import os
import select
import signal
import threading

_pipe: tuple[int, int] | None = None
_pipe_lock = threading.Lock()
# A poll of the pipe's read end: an empty pipe answers poll(0) with [] (~0.4 us), where a read
# raises BlockingIOError (~1.4 us), and every KVM_RUN looks at least three times.
_poller: tuple[int, select.poll] | None = None


def _forget_pipe() -> None:
    # The child of a fork() must not share the parent's pipe (each would read the other's): it
    # gets its own at once, so the pipe still predates the child's tests (a forked test process,
    # kvmpy.testing.isolate, counts fds a module leaves open).
    global _pipe, _poller
    old, _pipe, _poller = _pipe, None, None
    if old is not None:
        for fd in old:
            os.close(fd)
        _pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)


os.register_at_fork(after_in_child=_forget_pipe)
# Made at import (with the backend), not during the first run: it lives as long as the process.


def _get_pipe() -> tuple[int, int]:
    global _pipe
    p = _pipe
    if p is not None:       # made once per process: no lock needed to read it
        return p
    with _pipe_lock:
        if _pipe is None:
            _pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        return _pipe


def _drain(fd: int) -> bytes:
    global _poller
    pl = _poller
    if pl is None or pl[0] != fd:
        po = select.poll()
        po.register(fd, select.POLLIN)
        _poller = pl = (fd, po)
    if not pl[1].poll(0):
        return b""
    out = b""
    while True:
        try:
            chunk = os.read(fd, 512)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


class SignalWatch:
    """Context manager around one KVM_RUN: ``fired()`` says whether a signal was delivered
    since it was entered (always False outside the main thread)."""

    __slots__ = ("_active", "_old", "_rfd", "_seen")

    def __init__(self) -> None:
        self._active = False
        self._old = -1
        self._seen = b""
        self._rfd = -1

    def __enter__(self) -> SignalWatch:
        if threading.current_thread() is not threading.main_thread():
            return self
        rfd, wfd = _get_pipe()
        _drain(rfd)
        self._old = signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
        self._rfd = rfd
        self._active = True
        return self

    def fired(self) -> bool:
        if not self._active:
            return False
        got = _drain(self._rfd)
        if got:
            self._seen += got
        return bool(self._seen)

    def __exit__(self, *exc: object) -> None:
        if not self._active:
            return
        self._active = False
        self._seen += _drain(self._rfd)
        try:
            signal.set_wakeup_fd(self._old)
        except (ValueError, OSError):
            # The previous wakeup fd was closed meanwhile: leave none, as Python would.
            signal.set_wakeup_fd(-1)
            return
        if self._old >= 0 and self._seen:
            try:
                os.write(self._old, self._seen)
            except OSError as e:
                if e.errno is None:
                    raise           # a signal handler's exception (TimeoutError), not write's
                # Its buffer is full: Python's own handler drops the byte then too.


_get_pipe()
