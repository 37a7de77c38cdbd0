"""What every fd-owning object shares: an explicit closed state and use tracking.

A method that issues a syscall on the object's fd, or touches memory the object maps, does it
between ``fd = self._enter("CALL")`` and ``self._leave()`` (in a ``finally``), or inside
``with self._use("CALL") as fd:``, the same pair as a context manager. ``close()`` first marks
the object closing (new uses raise :class:`ClosedError`), asks the users still inside (a vCPU
thread in KVM_RUN) to leave, waits for them within a bound, and only then closes the fd and
unmaps: no call ever runs on a closed fd or a number reused by another open, and nothing reads
an unmapped page.

The pair is two acquisitions of a plain lock: every ioctl pays it, and in a TCG VM each Python
call costs 15-18x what it does on the host (issue 15), so no generator or Condition is on this
path; only a closer waits on the Condition, and a leaving user wakes it only while one does.
"""

from __future__ import annotations

import errno
import threading
import time
from types import TracebackType

from .errors import ClosedError, KvmError

#: How long close() waits for calls in progress (a kicked KVM_RUN returns in microseconds).
CLOSE_WAIT = 5.0


class _Use:
    """``with obj._use(call) as fd``: _enter on entry, _leave on exit."""

    __slots__ = ("_call", "_obj")

    def __init__(self, obj: FdObject, call: str) -> None:
        self._obj = obj
        self._call = call

    def __enter__(self) -> int:
        return self._obj._enter(self._call)

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._obj._leave()


class FdObject:
    """Base of Kvm, Vm, Vcpu and GuestMemfd (see the module docstring)."""

    fd: int

    def _init_fd(self, fd: int) -> None:
        self.fd = fd
        self._lock = threading.Lock()
        # The Condition a closer waits on, on _lock; made by the first close() that has to
        # wait (a Condition costs more to build than a guest_memfd's whole Python side).
        self._cv: threading.Condition | None = None
        self._users = 0
        self._closing = False

    @property
    def closed(self) -> bool:
        return self.fd < 0 or self._closing

    def _what(self) -> str:
        return repr(self)

    def _check_open(self, call: str) -> None:
        if self.closed:
            raise ClosedError(self._what(), call)

    def _enter(self, call: str) -> int:
        """Count one more call in progress and return the fd; ClosedError naming ``call`` if
        the object is closed or closing. Every successful _enter needs one _leave."""
        with self._lock:
            if self._closing or self.fd < 0:
                raise ClosedError(self._what(), call)
            self._users += 1
            return self.fd

    def _leave(self) -> None:
        with self._lock:
            self._users -= 1
            # _closing is set (under the lock) before a closer waits, so none can be missed.
            if self._closing and not self._users and self._cv is not None:
                self._cv.notify_all()

    def _use(self, call: str) -> _Use:
        """Hold the object open around one call; ``as`` gives the fd."""
        return _Use(self, call)

    def _evict(self) -> None:
        """Ask users inside a call to return (a vCPU kicks its KVM_RUN); called with _lock
        held."""

    def _begin_close(self, call: str = "close") -> bool:
        """Mark closing and wait for the calls in progress. Returns False if already closed;
        raises KvmError(EBUSY) (leaving the fd and mappings alone) if a call does not return."""
        with self._lock:
            if self.fd < 0:
                return False
            self._closing = True
            if not self._users:
                return True
            if self._cv is None:
                self._cv = threading.Condition(self._lock)
            cv = self._cv
            deadline = time.monotonic() + CLOSE_WAIT
            while self._users:
                self._evict()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise KvmError(errno.EBUSY, call, f"{self._what()}: {self._users} call(s) still in "
                                   f"progress after {CLOSE_WAIT:g} s; fd and mappings kept")
                cv.wait(min(left, 0.005))
            return True

    def _end_close(self) -> None:
        with self._lock:
            self.fd = -1
