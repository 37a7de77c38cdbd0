"""One thread per vCPU, with failure propagation to the joining test."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..vcpu import Vcpu


class VcpuThread(threading.Thread):
    """Runs ``fn(vcpu, *args)``; :meth:`result` returns its value or re-raises its error."""

    def __init__(self, vcpu: Vcpu, fn: Callable[..., Any], *args: Any) -> None:
        super().__init__(name=f"kvmpy-vcpu{vcpu.id}", daemon=True)
        self.vcpu = vcpu
        self.fn = fn
        self.args = args
        self.value: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.value = self.fn(self.vcpu, *self.args)
        except BaseException as e:  # handed to the joining thread
            self.error = e

    def result(self, timeout: float | None = None) -> Any:
        self.join(timeout)
        if self.is_alive():
            raise TimeoutError(f"vCPU {self.vcpu.id} thread still running after {timeout} s "
                               "(its run loop has a watchdog; is the host thread stuck "
                               "outside KVM_RUN?)")
        if self.error is not None:
            raise self.error
        return self.value


def join_all(threads: list[VcpuThread], timeout: float) -> list[Any]:
    """Join every thread (``timeout`` each); raise the first failure, noting the others."""
    for t in threads:
        t.join(timeout)
    errors: list[tuple[VcpuThread, BaseException]] = []
    for t in threads:
        if t.is_alive():
            errors.append((t, TimeoutError(f"vCPU {t.vcpu.id} thread did not finish within "
                                           f"{timeout} s")))
        elif t.error is not None:
            errors.append((t, t.error))
    if errors:
        first = errors[0][1]
        for t, e in errors[1:]:
            first.add_note(f"also vCPU {t.vcpu.id}: {type(e).__name__}: {e}")
        raise first
    return [t.value for t in threads]


__all__ = ["VcpuThread", "join_all"]
