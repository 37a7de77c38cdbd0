"""Signals during an emulated KVM_RUN (issue 11 item 7).

Real KVM: a signal pending for the vCPU thread ends KVM_RUN with -1/EINTR and exit_reason
KVM_EXIT_INTR (arch/x86/kvm/x86.c vcpu_run() -> kvm_handle_signal_exit()); the Python
handler then runs, and an exception it raises is the caller's. Python runs handlers only in
the main thread, so these tests drive the vCPU from the main thread (pytest's)."""

from __future__ import annotations

import ctypes
import errno
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kvmpy import Kvm
from kvmpy.backend.emu import EmuBackend
from kvmpy.backend.emu.x86.fakevm import (
    CODE,
    LOW_SIZE,
    STACK_TOP,
    Guest,
    asm,
    build_low_memory,
    long_mode_sregs,
)
from kvmpy.memory import SharedMemory
from kvmpy.uapi import ExitReason, Ioctl, kvm_regs

pytestmark = pytest.mark.guest


@pytest.fixture
def alarm() -> Iterator[Callable[[Callable[[int, Any], None], float], None]]:
    """Arm SIGALRM (setitimer) with a handler; restores the previous handler afterwards."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("Python signal handlers run only in the main thread; this test is not in it")
    old = signal.getsignal(signal.SIGALRM)

    def arm(handler: Callable[[int, Any], None], after: float) -> None:
        signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, after)

    yield arm
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


class _Watchdog:
    """Kicks the vCPU if the signal did not end the run, so a failing test does not hang."""

    def __init__(self, kick: Callable[[], None], after: float = 5.0) -> None:
        self.fired = False
        self._stop = threading.Event()

        def body() -> None:
            if not self._stop.wait(after):
                self.fired = True
                while not self._stop.wait(0.05):
                    kick()

        self._t = threading.Thread(target=body, daemon=True)
        self._t.start()

    def stop(self) -> None:
        self._stop.set()
        self._t.join()


def test_signal_with_handler_ends_run_with_eintr(guests: Any, alarm: Any) -> None:
    g: Guest = guests("1: jmp 1b")
    calls: list[int] = []
    alarm(lambda sig, frame: calls.append(sig), 0.05)
    wd = _Watchdog(g.h.vcpu.kick)
    t0 = time.monotonic()
    try:
        with pytest.raises(OSError) as ei:
            g.h.vcpu.ioctl(Ioctl.KVM_RUN, 0)
    finally:
        wd.stop()
    assert not wd.fired, "the signal did not interrupt the run (the watchdog's kick did)"
    assert ei.value.errno == errno.EINTR
    assert g.h.exit_reason == ExitReason.INTR
    assert calls == [signal.SIGALRM]
    assert time.monotonic() - t0 < 2.5
    # The run resumes where it was: the next signal interrupts it again.
    alarm(lambda sig, frame: calls.append(sig), 0.05)
    assert g.h.run() == errno.EINTR and len(calls) == 2


def test_signal_ends_a_halted_wait(alarm: Any) -> None:
    """With an in-kernel irqchip HLT blocks the vCPU; a signal ends that wait too."""
    from kvmpy.backend.emu.x86.fakevm import FakeVm

    g = Guest("hlt\n1: jmp 1b", vm=FakeVm(irqchip=True))
    try:
        alarm(lambda sig, frame: None, 0.05)
        wd = _Watchdog(g.h.vcpu.kick)
        try:
            assert g.h.run() == errno.EINTR
        finally:
            wd.stop()
        assert not wd.fired and g.h.exit_reason == ExitReason.INTR
    finally:
        g.close()


def _raise_timeout(sig: int, frame: Any) -> None:
    raise TimeoutError("test timeout")


def test_handler_exception_propagates_from_backend_ioctl(alarm: Any) -> None:
    """A handler's TimeoutError (an OSError whose errno is None) comes out of
    EmuBackend.ioctl(KVM_RUN) as itself. The guest uses no hooked instruction: a handler
    that runs inside a unicorn hook is test_exception_in_a_hook_is_not_turned_into_an_exit's
    case (and docs/emulator.md's remaining window)."""
    src = "1: mov rax, [0x90000]\ninc rax\njmp 1b"
    with Kvm(EmuBackend()) as kvm:
        b = kvm.backend
        vm = kvm.create_vm(0)
        low = SharedMemory(b, LOW_SIZE)
        try:
            _LowView.build(low, asm(src, CODE))
            vm.set_user_memory_region(0, 0, 0, LOW_SIZE, low.addr)
            vcpu = vm.create_vcpu(0)
            vcpu.set_sregs(long_mode_sregs())
            r = kvm_regs()
            r.rip, r.rsp, r.rflags = CODE, STACK_TOP, 2
            vcpu.set_regs(r)
            for _ in range(5):
                alarm(_raise_timeout, 0.02)
                wd = _Watchdog(lambda: b.kick(vcpu.fd, 0))
                try:
                    with pytest.raises(TimeoutError, match="test timeout"):
                        b.ioctl(vcpu.fd, Ioctl.KVM_RUN)
                finally:
                    wd.stop()
                assert not wd.fired
            # Still usable afterwards: a kick ends the next run as usual.
            t = threading.Timer(0.05, lambda: b.kick(vcpu.fd, 0))
            t.start()
            with pytest.raises(OSError) as ei:
                b.ioctl(vcpu.fd, Ioctl.KVM_RUN)
            t.join()
            assert ei.value.errno == errno.EINTR
        finally:
            vm.close()
            low.close()


class _LowView:
    @staticmethod
    def build(m: SharedMemory, code: bytes) -> None:
        class V:
            def write(self, off: int, data: bytes) -> None:
                m.mapping.write(off, data)

        build_low_memory(V(), code)  # type: ignore[arg-type]


def test_exception_in_a_hook_is_not_turned_into_an_exit(guests: Any,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Unicorn's binding records an exception raised in a hook, but reports the stop's
    UcError instead when the hook had to return a value (unmapped access): the exception must
    still reach the caller, not become an internal-error or memory-fault exit."""
    g: Guest = guests("mov rax, [0x100000000]\nmov dx, 1\nout dx, al\nhlt")
    from kvmpy.backend.emu.x86.fakevm import Memfd

    mem = Memfd(4096, "hi")
    g.vm.set_slot(1, 1 << 32, 4096, mem.addr)
    phys = g.h.vcpu.phys
    real = phys.classify
    n = [0]

    def classify(gpa: int) -> Any:
        n[0] += 1
        if n[0] == 1:
            raise TimeoutError("from a hook")
        return real(gpa)

    monkeypatch.setattr(phys, "classify", classify)
    with pytest.raises(TimeoutError, match="from a hook"):
        g.h.vcpu.ioctl(Ioctl.KVM_RUN, 0)
    # The access is simply re-run: the guest goes on to its OUT.
    assert g.h.run() == 0 and g.h.exit_reason == ExitReason.IO
    mem.close()


def test_exit_recorded_before_the_exception_is_not_lost(guests: Any) -> None:
    """A signal handler that raises just as the engine stopped at an OUT: the OUT already
    retired, so the next KVM_RUN must still report it (not skip to the next one)."""
    g: Guest = guests("mov dx, 1\nout dx, al\nmov dx, 2\nout dx, al\nhlt")
    uc = g.h.vcpu.uc
    real_start = uc.emu_start
    armed = [True]

    def emu_start(*a: Any) -> None:
        real_start(*a)
        if armed[0] and g.h.vcpu._ev is not None:
            armed[0] = False
            raise TimeoutError("right after the stop")

    uc.emu_start = emu_start
    with pytest.raises(TimeoutError):
        g.h.vcpu.ioctl(Ioctl.KVM_RUN, 0)
    assert g.h.run() == 0 and g.h.exit_reason == ExitReason.IO
    assert ctypes.c_uint16.from_address(g.h.runmem.addr + 34).value == 1     # io.port
    assert g.h.run() == 0
    assert ctypes.c_uint16.from_address(g.h.runmem.addr + 34).value == 2


def test_previous_wakeup_fd_is_restored_and_fed(guests: Any, alarm: Any) -> None:
    """An existing wakeup fd (asyncio's) is put back after the run and receives the signal
    numbers that arrived during it."""
    import os

    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    old = signal.set_wakeup_fd(w)
    try:
        g: Guest = guests("1: jmp 1b")
        alarm(lambda sig, frame: None, 0.05)
        wd = _Watchdog(g.h.vcpu.kick)
        try:
            assert g.h.run() == errno.EINTR
        finally:
            wd.stop()
        assert signal.set_wakeup_fd(w) == w
        assert os.read(r, 16) == bytes([signal.SIGALRM])
    finally:
        signal.set_wakeup_fd(old)
        os.close(r)
        os.close(w)
