"""The object layer's per-call machinery (issue 15): FdObject._enter/_leave and
Backend.ioctl_errno keep the semantics of the context manager and the raising ioctl they
replaced on the hot path."""

from __future__ import annotations

import dataclasses
import errno
import threading
from typing import Any

import pytest

from kvmpy._call import pack
from kvmpy._object import FdObject
from kvmpy.backend import Backend, IoctlArg
from kvmpy.backend.select import make_backend
from kvmpy.errors import ClosedError, KvmUnavailable
from kvmpy.system import Kvm
from kvmpy.uapi import (
    Cap,
    Ioctl,
    MemFlag,
    kvm_create_guest_memfd,
    kvm_enable_cap,
    kvm_regs,
    kvm_userspace_memory_region,
)
from kvmpy.uapi.structs import build_struct


class _Obj(FdObject):
    def __init__(self) -> None:
        self._init_fd(1000)     # never a syscall: only the bookkeeping is under test

    def __repr__(self) -> str:
        return "<_Obj>"

    def close(self) -> None:
        if self._begin_close():
            self._end_close()


def test_enter_on_closed_or_closing_raises_closed_error() -> None:
    o = _Obj()
    assert o._enter("CALL") == 1000
    o._leave()
    o._closing = True                       # what _begin_close sets before waiting
    with pytest.raises(ClosedError, match=r"CALL failed: EBADF .*<_Obj> is closed"):
        o._enter("CALL")
    o._closing = False
    o.close()
    with pytest.raises(ClosedError):
        o._enter("CALL")
    with pytest.raises(ClosedError), o._use("CALL"):
        pass
    assert o._users == 0


def test_use_leaves_on_exception() -> None:
    o = _Obj()
    with pytest.raises(KeyError), o._use("CALL") as fd:
        assert fd == 1000 and o._users == 1
        raise KeyError("x")
    assert o._users == 0


def test_close_waits_for_the_call_in_progress() -> None:
    o = _Obj()
    o._enter("CALL")                        # a call in progress in "another thread"
    closer = threading.Thread(target=o.close)
    closer.start()
    for _ in range(5000):                   # until close() has marked the object closing
        if o._closing:
            break
        threading.Event().wait(0.001)
    assert o._closing
    with pytest.raises(ClosedError):        # new calls are refused from now on
        o._enter("CALL")
    closer.join(0.2)
    assert closer.is_alive() and o.fd == 1000, "close() did not wait for the call"
    o._leave()
    closer.join(10)
    assert not closer.is_alive() and o.fd == -1


def test_leave_wakes_a_waiting_closer_only() -> None:
    """The last user out notifies the Condition while a close() waits (instead of leaving it
    to the closer's 5 ms poll), and not at all otherwise."""
    o = _Obj()
    woken: list[bool] = []
    cv: Any = threading.Condition(o._lock)
    o._cv = cv                              # as the first close() that has to wait makes it
    real = cv.notify_all
    cv.notify_all = lambda: (woken.append(o._closing), real())
    o._enter("A")
    o._enter("B")
    o._leave()
    o._leave()
    assert woken == []
    o._enter("A")
    o._enter("B")
    o._closing = True
    o._leave()
    assert woken == []                      # one user still inside
    o._leave()
    assert woken == [True]


# --- Backend.ioctl_errno -------------------------------------------------------------------
def test_ioctl_errno_default_honours_a_patched_ioctl() -> None:
    b = make_backend("emu")

    def ioctl(fd: int, request: int, arg: IoctlArg = None) -> int:
        raise OSError(errno.ENOTTY, "patched")

    b.ioctl = ioctl  # type: ignore[method-assign]
    assert Backend.ioctl_errno(b, 3, Ioctl.KVM_GET_API_VERSION) == (-1, errno.ENOTTY)
    assert b.ioctl_errno(3, Ioctl.KVM_GET_API_VERSION) == (-1, errno.ENOTTY)


def test_ioctl_errno_lets_a_signal_handler_exception_through() -> None:
    """An OSError without an errno (TimeoutError from a SIGALRM handler) is not an errno."""
    b = make_backend("emu")

    def ioctl(fd: int, request: int, arg: IoctlArg = None) -> int:
        raise TimeoutError("from a handler")

    b.ioctl = ioctl  # type: ignore[method-assign]
    with pytest.raises(TimeoutError, match="from a handler"):
        b.ioctl_errno(3, Ioctl.KVM_GET_API_VERSION)


def _answer(b: Backend, fd: int, request: int, arg: IoctlArg) -> tuple[int, int]:
    try:
        return b.ioctl(fd, request, arg), 0
    except OSError as e:
        return -1, int(e.errno or 0)


@pytest.mark.parametrize("backend", ["kvm", "emu"])
def test_ioctl_errno_answers_as_ioctl(backend: str) -> None:
    """Each backend's ioctl_errno (the host's own fast path, the emulator's default) gives
    what its ioctl gives: no argument, an integer, a struct; success and refusal."""
    try:
        k = Kvm(make_backend(backend))
    except KvmUnavailable as e:  # no /dev/kvm here
        pytest.skip(f"{backend}: {e}")
    with k, k.create_vm() as vm:
        b = k.backend
        cases: list[tuple[int, int, IoctlArg]] = [
            (k.fd, Ioctl.KVM_GET_API_VERSION, None),
            (k.fd, Ioctl.KVM_CHECK_EXTENSION, int(Cap.USER_MEMORY)),
            (k.fd, Ioctl.KVM_CHECK_EXTENSION, -1),
            (vm.fd, Ioctl.KVM_CREATE_GUEST_MEMFD, kvm_create_guest_memfd(size=1)),
            (vm.fd, 0xAE00 | 0x7F, None),               # no such KVM ioctl
            (9999, Ioctl.KVM_GET_API_VERSION, None),    # not an open fd: EBADF
        ]
        for fd, request, arg in cases:
            assert b.ioctl_errno(fd, request, arg) == _answer(b, fd, request, arg), \
                (hex(request), arg)
        assert b.ioctl_errno(9999, Ioctl.KVM_GET_API_VERSION) == (-1, errno.EBADF)


# --- Vcpu.run's decoding (built without the frozen dataclasses' __init__) --------------------
@pytest.mark.guest
def test_run_exits_are_the_dataclasses_they_stand_for() -> None:
    """Exit/IoExit made by Vcpu._decode equal, field for field, the ones their __init__ makes,
    stay frozen, and carry what kvm_run holds."""
    from kvmpy.backend.emu.x86.fakevm import (
        CODE,
        LOW_SIZE,
        asm,
        build_low_memory,
        start_in_long_mode,
    )
    from kvmpy.memory import SharedMemory
    from kvmpy.uapi import ExitReason, IoDirection
    from kvmpy.vcpu import Exit, IoExit

    with Kvm(make_backend("emu")) as k, k.create_vm() as vm, \
            SharedMemory(k.backend, LOW_SIZE) as low:
        build_low_memory(low.mapping, asm("mov dx, 0x1234\nmov al, 0xab\nout dx, al\n"
                                          "in ax, dx\nhlt", CODE))
        vm.set_user_memory_region(0, 0, 0, LOW_SIZE, low.addr)
        v = vm.create_vcpu(0)
        start_in_long_mode(k, v)
        seen = []
        for want in (IoDirection.OUT, IoDirection.IN):
            ex = v.run()
            io = v.run_struct.exit.io
            assert ex.io == IoExit(want, io.size, 0x1234, 1, io.data_offset,
                                   b"\xab" if want == IoDirection.OUT else b"")
            assert type(ex.io.direction) is IoDirection and type(ex.reason) is ExitReason
            seen.append(ex)
            if want == IoDirection.IN:
                v.complete_io()
        ex = v.run()
        assert ex == Exit(ExitReason.HLT) and v.last_exit is ex
        seen.append(ex)
        for ex in seen:
            assert vars(ex) == vars(dataclasses.replace(ex)) and ex == dataclasses.replace(ex)
            if ex.io is not None:
                assert vars(ex.io) == vars(dataclasses.replace(ex.io))
                with pytest.raises(dataclasses.FrozenInstanceError):
                    ex.io.port = 1  # type: ignore[misc]
            with pytest.raises(dataclasses.FrozenInstanceError):
                ex.errno = 1  # type: ignore[misc]
            assert hash(ex) == hash(dataclasses.replace(ex))


# --- pack(): build_struct is cls(**fields) ---------------------------------------------------
@pytest.mark.parametrize("fields", [
    {"slot": 1, "flags": MemFlag.READONLY, "guest_phys_addr": 1 << 32, "memory_size": 4096,
     "userspace_addr": (1 << 64) - 1},
    {"slot": 0, "memory_size": 1 << 64},                    # does not fit: OverflowError
    {"slot": -1},
    {"slot": True},                                         # a bool is not an int here
    {"slot": "1"},
    {"slot": 2, "flags": 1 << 32},
])
def test_build_struct_is_the_constructor(fields: dict[str, Any]) -> None:
    def outcome(make: Any) -> tuple[Any, ...]:
        try:
            return ("ok", make().to_bytes())
        except (OverflowError, TypeError, ValueError) as e:
            return (type(e), str(e))

    cls = kvm_userspace_memory_region
    want = outcome(lambda: cls(**fields))
    assert outcome(lambda: build_struct(cls, fields)) == want
    got = outcome(lambda: pack(Ioctl.KVM_SET_USER_MEMORY_REGION, cls, **fields))
    assert got == (want if want[0] == "ok" else
                   (want[0], f"KVM_SET_USER_MEMORY_REGION: {want[1]}"))


def test_build_struct_arrays_and_enums() -> None:
    f: dict[str, Any] = {"cap": Cap.USER_MEMORY, "args": (1, 2, (1 << 64) - 1)}
    assert build_struct(kvm_enable_cap, f).to_bytes() == kvm_enable_cap(**f).to_bytes()
    with pytest.raises(ValueError, match="holds 4 values, got 5"):
        build_struct(kvm_enable_cap, {"args": (1, 2, 3, 4, 5)})
    with pytest.raises(OverflowError, match=r"kvm_enable_cap.args\[1\]=-1 does not fit"):
        build_struct(kvm_enable_cap, {"args": (1, -1)})


# --- the emulator's register moves (raw libunicorn calls, pairs) ----------------------------
def test_fast_register_moves_match_the_binding() -> None:
    from unicorn import x86_const as X

    from kvmpy.backend.emu.x86 import engine as E

    uc = E.new_engine()
    regs = E.FastRegs(uc)
    regs.write(X.UC_X86_REG_RAX, -1)                     # stored modulo 2**64, as before
    assert uc.reg_read(X.UC_X86_REG_RAX) == (1 << 64) - 1 == regs.read(X.UC_X86_REG_RAX)
    regs.rax_rip.write(0x1122334455667788, 0x10000)
    assert (uc.reg_read(X.UC_X86_REG_RAX), uc.reg_read(X.UC_X86_REG_RIP)) == \
        (0x1122334455667788, 0x10000)
    assert regs.rip_rax.read() == (0x10000, 0x1122334455667788)
    uc.reg_write(X.UC_X86_REG_CR3, 0x5000)
    assert regs.cr3_rip.read() == (0x5000, 0x10000)
    vals = list(range(1, 19))
    regs.write_gprs(vals)
    assert regs.read_gprs() == vals and regs.gprs_bytes() == kvm_regs(*vals).to_bytes()
