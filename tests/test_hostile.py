"""Hostile use of the object layer and the guest runner: every misuse gets a clean Python
exception, never a crash, a hang or a silently truncated argument (docs/design.md, "Failure
behaviour"). Each case runs on real KVM (when /dev/kvm opens) and on the emulated KVM; the ones
that could crash the process run in a forked child, so a crash is a failure, not the end."""

from __future__ import annotations

import errno
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kvmpy import GuestMemfd, Kvm, KvmError
from kvmpy.backend import Backend
from kvmpy.errors import ClosedError
from kvmpy.guest import GuestVm
from kvmpy.testing.child import run_in_child
from kvmpy.uapi import Cap, GuestMemfdFlag, kvm_pre_fault_memory
from tests.conftest import backend_or_skip

P = 4096
BACKENDS = ["kvm", "emu"]


@pytest.fixture
def hkvm(each_backend: Backend) -> Iterator[Kvm]:
    with Kvm(each_backend) as k:
        yield k


def _gmem(vm: Any) -> GuestMemfd:
    if not vm.check_extension(Cap.GUEST_MEMFD):
        pytest.skip(f"KVM_CAP_GUEST_MEMFD=0 on {vm.backend.describe()}")
    flags = vm.check_extension(Cap.GUEST_MEMFD_FLAGS) & GuestMemfdFlag.MMAP
    return vm.create_guest_memfd(4 * P, flags)  # type: ignore[no-any-return]


# --- 1. every call on a closed object raises ClosedError ------------------------------------
# (object to close, call) -> ClosedError. Before: a segfault for the kvm_run rows.
CLOSED_CALLS: list[tuple[str, str, Callable[[Any], object]]] = [
    ("vcpu", "run", lambda o: o["vcpu"].run()),
    ("vcpu", "try_run", lambda o: o["vcpu"].try_run()),
    ("vcpu", "immediate_exit_get", lambda o: o["vcpu"].immediate_exit),
    ("vcpu", "immediate_exit_set", lambda o: setattr(o["vcpu"], "immediate_exit", True)),
    ("vcpu", "io_data", lambda o: o["vcpu"].io_data()),
    ("vcpu", "run_struct", lambda o: o["vcpu"].run_struct),
    ("vcpu", "get_regs", lambda o: o["vcpu"].get_regs()),
    ("vcpu", "pre_fault", lambda o: o["vcpu"].try_pre_fault_memory(kvm_pre_fault_memory())),
    ("vm", "vcpu_run", lambda o: o["vcpu"].run()),
    ("vm", "vcpu_io_data", lambda o: o["vcpu"].io_data()),
    ("vm", "create_vcpu", lambda o: o["vm"].create_vcpu(5)),
    ("vm", "set_user_memory_region", lambda o: o["vm"].set_user_memory_region(0, 0, 0, P, 0)),
    ("vm", "check_extension", lambda o: o["vm"].check_extension(Cap.USER_MEMORY)),
    ("kvm", "create_vm", lambda o: o["kvm"].create_vm()),
    ("kvm", "vm_create_vcpu", lambda o: o["vm"].create_vcpu(5)),
    ("kvm", "check_extension", lambda o: o["kvm"].check_extension(Cap.USER_MEMORY)),
]


@pytest.mark.parametrize("close,call", [(c, f) for c, _, f in CLOSED_CALLS],
                         ids=[f"{c}-{n}" for c, n, _ in CLOSED_CALLS])
def test_call_after_close_raises_closed_error(each_backend: Backend, close: str,
                                              call: Callable[[Any], object]) -> None:
    def child() -> None:
        k = Kvm(each_backend)
        vm = k.create_vm()
        objs = {"kvm": k, "vm": vm, "vcpu": vm.create_vcpu()}
        objs[close].close()
        with pytest.raises(ClosedError) as ei:
            call(objs)
        assert ei.value.errno == errno.EBADF and "is closed" in str(ei.value)

    out = run_in_child(child)
    assert out.ok, out.describe()


def test_gmem_views_after_close_raise_or_read_zero(each_backend: Backend) -> None:
    """A view of a guest_memfd mapping is released by close (ValueError on use); a slice of it
    still alive reads the zero pages that replaced the mapping (before: SIGSEGV)."""
    want = GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED
    with Kvm(each_backend) as k, k.create_vm() as vm:
        have = vm.check_extension(Cap.GUEST_MEMFD_FLAGS)
    if have & want != want:
        pytest.skip(f"KVM_CAP_GUEST_MEMFD_FLAGS={have:#x} on {each_backend.describe()}: host "
                    "access to a guest_memfd needs MMAP|INIT_SHARED")

    def child() -> None:
        k = Kvm(each_backend)
        g = k.create_vm().create_guest_memfd(4 * P, want)
        m = g.mmap()
        m.view()[0] = 0xAB
        v = m.view()
        s = v[0:8]
        g.close()
        with pytest.raises(ValueError, match="released"):
            v[0]
        assert bytes(s) == b"\0" * 8
        with pytest.raises(ClosedError):
            m.read(0, 8)

    out = run_in_child(child)
    assert out.ok, out.describe()


# --- 2. closing while another thread is in KVM_RUN ------------------------------------------
@pytest.mark.guest
@pytest.mark.parametrize("what", ["vcpu", "vm", "guestvm"])
def test_close_while_running_stops_the_run(each_backend: Backend, what: str) -> None:
    """The teardown of a failed test: the guest spins, join times out, close() kicks the run,
    waits for it and unmaps; the vCPU thread ends with ClosedError (before: SIGSEGV)."""

    def child() -> str:
        g = GuestVm(Kvm(each_backend), "smoke", timeout=30)
        v = g.vcpu("guest_spin")
        t = g.start(v)
        with pytest.raises(TimeoutError):
            g.join([t], timeout=0.3)
        t0 = time.monotonic()
        {"vcpu": v.close, "vm": g.vm.close, "guestvm": g.close}[what]()
        took = time.monotonic() - t0
        t.join(5)
        assert not t.is_alive(), "vCPU thread still running after close"
        assert isinstance(t.error, ClosedError), repr(t.error)
        g.close()
        return f"close took {took:.3f} s"

    out = run_in_child(child)
    assert out.ok, out.describe()


# --- 3. integers that do not fit their uapi field -------------------------------------------
U64 = 1 << 64
INTEGER_CASES: list[tuple[str, Callable[[Any], object], type[Exception]]] = [
    ("memslot_size_2_64", lambda vm: vm.set_user_memory_region(0, 0, 0, U64, 0), OverflowError),
    ("memslot_slot_2_32_plus_1", lambda vm: vm.set_user_memory_region(2**32 + 1, 0, 0, P, 0),
     OverflowError),
    ("memslot2_gpa_2_64", lambda vm: vm.try_set_user_memory_region2(1, 0, U64, P, 0),
     OverflowError),
    ("gmem_fd_2_32_plus", lambda vm: vm.try_set_user_memory_region2(1, 4, 0, P, 0, 2**32 + 3),
     OverflowError),
    ("create_vcpu_2_64", lambda vm: vm.create_vcpu(U64), OverflowError),
    ("create_vcpu_str", lambda vm: vm.create_vcpu("x"), TypeError),
    ("create_gmem_2_64_plus", lambda vm: vm.create_guest_memfd(U64 + P), OverflowError),
    ("try_create_gmem_neg", lambda vm: vm.try_create_guest_memfd(-P), OverflowError),
    ("attributes_size_2_64", lambda vm: vm.try_set_memory_attributes(0, U64), OverflowError),
    ("enable_cap_5_args", lambda vm: vm.enable_cap(1, 1, 2, 3, 4, 5), ValueError),
    ("vm_check_extension_2_64_plus_3", lambda vm: vm.check_extension(U64 + 3), OverflowError),
    ("create_vm_2_64", lambda vm: vm.kvm.create_vm(U64), OverflowError),
    ("kvm_check_extension_2_64_plus_3", lambda vm: vm.kvm.check_extension(U64 + 3),
     OverflowError),
]


@pytest.mark.parametrize("call,exc", [(c, e) for _, c, e in INTEGER_CASES],
                         ids=[i for i, _, _ in INTEGER_CASES])
def test_out_of_range_integers_are_refused(hkvm: Kvm, call: Callable[[Any], object],
                                           exc: type[Exception]) -> None:
    """Before: packed modulo the field width and sent (size 2**64 deleted slot 0)."""
    with hkvm.create_vm() as vm:
        vm.set_user_memory_region(0, 0, 0, P, 0)
        before = dict(vm.memslots)
        with pytest.raises(exc) as ei:
            call(vm)
        assert "KVM_" in str(ei.value) or "fallocate" in str(ei.value), str(ei.value)
        assert vm.memslots == before
        # The kernel still has slot 0: moving it to an overlapping size would be EINVAL
        # (size change of an existing slot), creating it anew succeeds.
        assert vm.try_set_user_memory_region(0, 0, 0, 2 * P, 0) == errno.EINVAL


@pytest.mark.parametrize("offset,length", [(U64, P), (0, U64), (-(U64 // 2) - 1, P)],
                         ids=["offset_2_64", "len_2_64", "offset_below_s64"])
def test_fallocate_refuses_what_loff_t_cannot_hold(hkvm: Kvm, offset: int, length: int) -> None:
    """Before: real KVM got offset 0 (ctypes C long) and succeeded; the emulator said EFBIG."""
    with hkvm.create_vm() as vm:
        g = _gmem(vm)
        with pytest.raises(OverflowError, match="fallocate"):
            g.try_fallocate(offset, length)


# --- 4. signals ---------------------------------------------------------------------------
_SPIN_SCRIPT = """
import signal, sys, threading, time
from kvmpy import Kvm
from kvmpy.backend.select import make_backend
from kvmpy.guest import GuestVm
from kvmpy.guest.ucall import GuestTimeout
{setup}
def go():
    k = Kvm(make_backend({backend!r}))
    g = GuestVm(k, "smoke", timeout=1.0)
    v = g.vcpu("guest_spin")
    t0 = time.monotonic()
    try:
        g.run(v)
    except GuestTimeout as e:
        print(f"stopped after {{time.monotonic() - t0:.2f}} s: {{e}}")
    g.close(); k.close()
{call}
"""


@pytest.mark.guest
@pytest.mark.parametrize("which", BACKENDS)
@pytest.mark.parametrize("setup,call", [
    ("signal.signal(signal.SIGUSR1, signal.SIG_IGN)", "go()"),
    ("", "t = threading.Thread(target=go); t.start(); t.join()"),
    ("signal.signal(signal.SIGUSR1, signal.SIG_IGN)",
     "t = threading.Thread(target=go); t.start(); t.join()"),
], ids=["sigusr1_ignored", "off_main_thread", "ignored_and_off_main_thread"])
def test_watchdog_stops_a_spinning_guest(which: str, setup: str, call: str) -> None:
    """The watchdog must stop a 1 s guest whatever SIGUSR1's disposition and whichever thread
    made the backend (before, on real KVM: a silent hang)."""
    backend_or_skip(which)
    script = _SPIN_SCRIPT.format(setup=setup, call=call, backend=which)
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and "stopped after" in p.stdout, p.stdout + p.stderr
    took = float(p.stdout.split("stopped after ")[1].split(" s")[0])
    assert took < 5, p.stdout


@pytest.mark.guest
def test_signal_handler_exception_propagates_from_run(each_backend: Backend) -> None:
    """A handler that raises during KVM_RUN: the exception leaves run() (before: swallowed
    into Exit(INTR) on real KVM, Exit(UNKNOWN) on the emulator)."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can be installed only in the main thread")

    def child() -> None:
        g = GuestVm(Kvm(each_backend), "smoke", timeout=20)
        v = g.vcpu("guest_spin")

        def boom(signum: int, frame: object) -> None:
            raise TimeoutError("from the SIGALRM handler")

        signal.signal(signal.SIGALRM, boom)
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(TimeoutError, match="SIGALRM handler"):
            g.run(v)
        g.close()

    out = run_in_child(child)
    assert out.ok, out.describe()


def test_non_kvm_device_is_refused_at_open(tmp_path: Any) -> None:
    """KVMPY_DEVICE=/dev/null: Kvm() says it is not a KVM device (before: ENOTTY later)."""
    from kvmpy.backend.host import HostBackend
    from kvmpy.errors import KvmUnavailable

    for dev in ("/dev/null", "/dev/zero"):
        with pytest.raises(KvmUnavailable, match="not a KVM device"):
            Kvm(HostBackend(dev))


def test_checked_call_keeps_the_errno(hkvm: Kvm) -> None:
    """The range checks do not mask kernel errors: an in-range bad value is the kernel's."""
    with hkvm.create_vm() as vm:
        with pytest.raises(KvmError) as ei:
            vm.set_user_memory_region(0, 0, 0x1001, P, 0)
        assert ei.value.errno == errno.EINVAL

