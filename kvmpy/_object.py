"""What every fd-owning object shares: an explicit closed state and use tracking.

A method that issues a syscall on the object's fd, or touches memory the object maps, does it
inside ``with self._use("CALL") as fd:``. ``close()`` first marks the object closing (new uses
raise :class:`ClosedError`), asks the users still inside (a vCPU thread in KVM_RUN) to leave,
waits for them within a bound, and only then closes the fd and unmaps: no call ever runs on a
closed fd or a number reused by another open, and nothing reads an unmapped page.
"""

from __future__ import annotations

import contextlib
import errno
import threading
import time
from collections.abc import Iterator

from .errors import ClosedError, KvmError

#: How long close() waits for calls in progress (a kicked KVM_RUN returns in microseconds).
CLOSE_WAIT = 5.0


class FdObject:
    """Base of Kvm, Vm, Vcpu and GuestMemfd (see the module docstring)."""

    fd: int

    def _init_fd(self, fd: int) -> None:
        self.fd = fd
        self._cv = threading.Condition(threading.Lock())
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

    @contextlib.contextmanager
    def _use(self, call: str) -> Iterator[int]:
        """Hold the object open around one call; yields the fd."""
        with self._cv:
            if self.fd < 0 or self._closing:
                raise ClosedError(self._what(), call)
            self._users += 1
            fd = self.fd
        try:
            yield fd
        finally:
            with self._cv:
                self._users -= 1
                if self._users == 0:
                    self._cv.notify_all()

    def _evict(self) -> None:
        """Ask users inside a call to return (a vCPU kicks its KVM_RUN); called with _cv held."""

    def _begin_close(self, call: str = "close") -> bool:
        """Mark closing and wait for the calls in progress. Returns False if already closed;
        raises KvmError(EBUSY) (leaving the fd and mappings alone) if a call does not return."""
        with self._cv:
            if self.fd < 0:
                return False
            self._closing = True
            deadline = time.monotonic() + CLOSE_WAIT
            while self._users:
                self._evict()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise KvmError(errno.EBUSY, call, f"{self._what()}: {self._users} call(s) still in "
                                   f"progress after {CLOSE_WAIT:g} s; fd and mappings kept")
                self._cv.wait(min(left, 0.005))
            return True

    def _end_close(self) -> None:
        with self._cv:
            self.fd = -1
