"""Serialized time slices for the vCPUs of one VM.

Unicorn engines that share memory must not run in parallel: lock-prefixed read-modify-write
and xchg are not atomic across engines (docs/emulator.md, "Unicorn 2.1.4 facts"). So one vCPU runs
at a time. A waiting vCPU preempts the running one (emu_stop) once its slice is over, and the
lock is handed over in FIFO order, so spin-waits between vCPUs make progress.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from typing import Any, Protocol

SLICE_S = 0.002


class Preemptible(Protocol):
    def preempt(self) -> None: ...


class RunScheduler:
    def __init__(self) -> None:
        # Entered through its lock: Condition.__enter__ is a Python-level call (~0.3 us) on
        # every KVM_RUN's acquire and release; holding the lock is holding the condition.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._owner: Preemptible | None = None
        self._since = 0.0
        self._queue: deque[object] = deque()

    def acquire(self, who: Preemptible) -> None:
        with self._lock:
            if self._owner is None and not self._queue:      # uncontended: no hand-over
                self._owner = who
                self._since = time.monotonic()
                return
            ticket = object()
            self._queue.append(ticket)
            preempted = False
            while self._owner is not None or self._queue[0] is not ticket:
                owner = self._owner
                if owner is not None:
                    left = self._since + SLICE_S - time.monotonic()
                    if left <= 0 and not preempted:
                        owner.preempt()
                        preempted = True
                        left = SLICE_S
                    elif left <= 0:
                        # The stop may have landed between two emu_start calls: repeat it.
                        owner.preempt()
                        left = SLICE_S / 2
                    self._cond.wait(left)
                else:
                    self._cond.wait(0.001)
            self._queue.popleft()
            self._owner = who
            self._since = time.monotonic()
            self._cond.notify_all()

    def release(self) -> None:
        with self._lock:
            self._owner = None
            if self._queue:
                self._cond.notify_all()

    @property
    def contended(self) -> bool:
        return bool(self._queue)


_schedulers: weakref.WeakKeyDictionary[Any, RunScheduler] = weakref.WeakKeyDictionary()
_sched_lock = threading.Lock()


def scheduler_for(vm: Any) -> RunScheduler:
    """The one scheduler of ``vm`` (created on first use)."""
    with _sched_lock:
        s = _schedulers.get(vm)
        if s is None:
            s = RunScheduler()
            _schedulers[vm] = s
        return s
