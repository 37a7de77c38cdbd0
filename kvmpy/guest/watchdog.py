"""The KVM_RUN watchdog: one daemon thread that kicks vCPUs whose run outlived its deadline.

A kick is :meth:`kvmpy.vcpu.Vcpu.kick`: on real KVM a signal, which makes KVM_RUN return
-1/EINTR with KVM_EXIT_INTR (api.rst 4.10 KVM_RUN); on the emulated KVM the same exit. A fired
watch kicks again every ``KICK_INTERVAL`` seconds until its call returns (a kick is only sent
while a run is in progress).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..vcpu import Vcpu

log = logging.getLogger(__name__)

KICK_INTERVAL = 0.005


class Watch:
    """One KVM_RUN under watch (a context manager around the run)."""

    def __init__(self, dog: Watchdog, vcpu: Vcpu, deadline: float) -> None:
        self.dog = dog
        self.vcpu = vcpu
        self.deadline = deadline
        self.token = 0
        #: Set once the deadline passed and the watchdog started kicking.
        self.fired = False
        self.kicks = 0
        self.error: BaseException | None = None

    def __enter__(self) -> Watch:
        self.dog._add(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.dog._remove(self)


class Watchdog:
    def __init__(self, kick_interval: float = KICK_INTERVAL) -> None:
        self.kick_interval = kick_interval
        self._cv = threading.Condition()
        self._watches: dict[int, Watch] = {}
        self._tokens = itertools.count(1)
        self._wake_at = math.inf
        self._thread: threading.Thread | None = None

    def watch(self, vcpu: Vcpu, deadline: float) -> Watch:
        """Watch the KVM_RUN (or KVM_PRE_FAULT_MEMORY) calls on ``vcpu`` inside the ``with``
        block until ``deadline`` (time.monotonic)."""
        return Watch(self, vcpu, deadline)

    def _add(self, w: Watch) -> None:
        with self._cv:
            w.token = next(self._tokens)
            self._watches[w.token] = w
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="kvmpy-watchdog",
                                                daemon=True)
                self._thread.start()
            # Wake the thread only when this deadline is earlier than its next wake-up:
            # most runs end long before their deadline and cost no thread switch.
            if w.deadline < self._wake_at:
                self._cv.notify()

    def _remove(self, w: Watch) -> None:
        with self._cv:
            self._watches.pop(w.token, None)

    def _loop(self) -> None:
        with self._cv:
            while True:
                now = time.monotonic()
                nxt = math.inf
                for w in list(self._watches.values()):
                    if w.deadline > now:
                        nxt = min(nxt, w.deadline)
                        continue
                    if w.error is not None:
                        continue
                    w.fired = True
                    try:
                        if w.vcpu.kick():
                            w.kicks += 1
                    except BaseException as e:  # reported by the run loop
                        w.error = e
                        log.error("watchdog cannot kick %r: %s", w.vcpu, e)
                        continue
                    nxt = min(nxt, now + self.kick_interval)
                self._wake_at = nxt
                self._cv.wait(None if nxt == math.inf else max(nxt - now, 0.0))


    def _after_fork_in_child(self) -> None:
        # The child has no watchdog thread, and the lock may have been copied held.
        self._cv = threading.Condition()
        self._watches = {}
        self._wake_at = math.inf
        self._thread = None


#: The process-wide watchdog every guest run uses.
WATCHDOG = Watchdog()
os.register_at_fork(after_in_child=WATCHDOG._after_fork_in_child)

__all__ = ["WATCHDOG", "Watch", "Watchdog"]
