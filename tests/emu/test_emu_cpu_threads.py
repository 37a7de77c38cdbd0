"""Kicks, several vCPUs and robustness of the emulated vCPU.

Several vCPUs run serialized with time slices (x86/sched.py) because parallel unicorn engines
break guest atomics; a spin-wait between vCPUs must still make progress, and lock-prefixed
increments from two vCPUs must not lose updates."""

from __future__ import annotations

import errno
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy.backend.emu.x86.fakevm import DATA, FakeVm, Guest, VcpuHarness, long_mode_sregs
from kvmpy.uapi import ExitReason, kvm_regs

pytestmark = pytest.mark.guest


def _in_thread(fn, *args):
    out: dict[str, object] = {}

    def body() -> None:
        try:
            out["ret"] = fn(*args)
        except BaseException as e:  # reported to the test
            out["exc"] = e

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t, out


def test_kick_stops_a_spinning_guest_with_eintr():
    g = Guest("1: jmp 1b")
    t, out = _in_thread(g.h.run)
    time.sleep(0.2)
    assert t.is_alive()
    t0 = time.monotonic()
    g.h.vcpu.kick()
    t.join(5)
    assert not t.is_alive(), "kick did not stop the guest"
    assert time.monotonic() - t0 < 2.0
    assert out["ret"] == errno.EINTR
    assert g.h.exit_reason == ExitReason.INTR
    assert g.h.get_regs().rip == 0x10000
    g.close()


def test_close_while_another_thread_runs_does_not_hang():
    """Closing a vCPU whose KVM_RUN spins in another thread returns; the run ends (EINTR) and
    the engine's mappings are released by whoever finishes last."""
    g = Guest("1: jmp 1b")
    t, out = _in_thread(g.h.run)
    time.sleep(0.1)
    t0 = time.monotonic()
    g.h.vcpu.close()
    assert time.monotonic() - t0 < 3.0
    t.join(5)
    assert not t.is_alive() and out["ret"] == errno.EINTR
    assert not g.h.vcpu.phys.slots
    g.low.close()
    g.h.runmem.close()


def test_kick_outside_run_is_lost():
    """As a signal that arrives outside KVM_RUN: the next run is not interrupted."""
    g = Guest("hlt")
    g.h.vcpu.kick()
    assert g.h.run() == 0 and g.h.exit_reason == ExitReason.HLT
    g.close()


def test_hlt_with_irqchip_blocks_until_kick():
    """With an in-kernel irqchip KVM does not exit on HLT: the vCPU blocks as HALTED until an
    event; no interrupt source is modelled, so a kick ends the wait with EINTR."""
    import ctypes

    from kvmpy.uapi import Ioctl, MpState

    g = Guest("hlt", vm=FakeVm(irqchip=True))
    t, out = _in_thread(g.h.run)
    time.sleep(0.2)
    assert t.is_alive()
    g.h.vcpu.kick()
    t.join(5)
    assert out["ret"] == errno.EINTR and g.h.exit_reason == ExitReason.INTR
    st = ctypes.c_uint32()
    g.h.vcpu.ioctl(Ioctl.KVM_GET_MP_STATE, ctypes.addressof(st))
    assert st.value == MpState.HALTED
    g.close()


def _second_vcpu(vm: FakeVm, rip: int) -> VcpuHarness:
    h = VcpuHarness(vm, 1)
    h.set_sregs(long_mode_sregs())
    r = kvm_regs()
    r.rip, r.rsp, r.rflags = rip, 0x70000, 2
    h.set_regs(r)
    return h


def test_two_vcpus_spin_wait_and_atomic_increments():
    """vCPU 0 waits for a flag vCPU 1 sets; both then do 20k lock-incs on one counter and the
    total is exact (serialized engines keep guest atomics atomic)."""
    n = 20000
    src = f"""
    mov rbx, {DATA}
    1: pause
       cmp qword ptr [rbx], 1
       jne 1b
    jmp 3f
    vcpu1:
    mov rbx, {DATA}
    mov qword ptr [rbx], 1
    3: mov rcx, {n}
    2: lock inc qword ptr [rbx + 8]
       dec rcx
       jnz 2b
    hlt
    """
    from kvmpy.backend.emu.x86.fakevm import CODE, code_offset

    g = Guest(src)
    h1 = _second_vcpu(g.vm, CODE + code_offset(src, "vcpu1"))
    t0, o0 = _in_thread(g.h.run)
    time.sleep(0.05)
    t1, o1 = _in_thread(h1.run)
    t0.join(30)
    t1.join(30)
    assert not t0.is_alive() and not t1.is_alive()
    assert (o0.get("ret"), o1.get("ret")) == (0, 0), (o0, o1)
    assert g.h.exit_reason == ExitReason.HLT and h1.exit_reason == ExitReason.HLT
    assert int.from_bytes(g.low.read(DATA + 8, 8), "little") == 2 * n
    h1.close()
    g.close()


def test_invalidate_from_another_thread_reaches_a_running_guest():
    """A conversion while the vCPU spins: the guest sees the new backing without leaving
    KVM_RUN (here it exits with OUT when it sees the new value)."""
    from kvmpy.backend.emu.x86.fakevm import Memfd

    gpa = 1 << 32
    g = Guest(f"mov rbx, {gpa}\n1: cmp qword ptr [rbx], 7\njne 1b\nmov dx, 9\nout dx, al\nhlt")
    a, b = Memfd(4096, "a"), Memfd(4096, "b")
    b.write(0, (7).to_bytes(8, "little"))
    g.vm.set_slot(1, gpa, 4096, a.addr)
    t, out = _in_thread(g.h.run)
    time.sleep(0.1)
    assert t.is_alive()
    g.vm.set_slot(1, gpa, 4096, b.addr)
    t.join(5)
    assert not t.is_alive(), "the guest never saw the new memslot"
    assert out["ret"] == 0 and g.h.exit_reason == ExitReason.IO
    a.close()
    b.close()
    g.close()


def test_invalidate_is_synchronous_for_a_running_vcpu():
    """Once a conversion (and its invalidation) returns, the running guest never sees the old
    backing again: KVM zaps and flushes before KVM_SET_MEMORY_ATTRIBUTES returns. The private
    (guest_memfd) page holds 1, the shared one 2; the guest counts reads of 1 (without the
    synchronous wait the count keeps growing for the rest of the vCPU's time slice)."""
    import os

    from kvmpy.backend.emu.x86.fakevm import FakeGmem, Memfd

    gpa = 1 << 32
    g = Guest(f"""
    mov rbx, {gpa}
    mov rsi, {DATA}
    1: cmp qword ptr [rbx], 1
       jne 1b
       inc qword ptr [rsi]
       jmp 1b
    """)
    shared = Memfd(4096, "shared")
    shared.write(0, (2).to_bytes(8, "little"))
    fd = os.memfd_create("gmem")
    os.ftruncate(fd, 4096)
    os.pwrite(fd, (1).to_bytes(8, "little"), 0)
    g.vm.set_slot(1, gpa, 4096, shared.addr, gmem=FakeGmem(fd, 4096))
    g.vm.set_private(gpa, 4096, True)
    t, out = _in_thread(g.h.run)
    time.sleep(0.1)
    assert int.from_bytes(g.low.read(DATA, 8), "little") > 0
    for _ in range(20):
        g.vm.set_private(gpa, 4096, False)
        c1 = int.from_bytes(g.low.read(DATA, 8), "little")
        time.sleep(0.01)
        c2 = int.from_bytes(g.low.read(DATA, 8), "little")
        # One increment may be in flight: its read happened before the conversion.
        assert c2 - c1 <= 1, "the guest read the private page after the conversion returned"
        g.vm.set_private(gpa, 4096, True)
        time.sleep(0.005)
    g.h.vcpu.kick()
    t.join(5)
    assert out["ret"] == errno.EINTR, out
    shared.close()
    os.close(fd)
    g.close()


# --- robustness: random code never crashes or hangs the process -------------------------------
_fuzz_guest: list[Guest] = []


def _fuzz_target() -> Guest:
    if not _fuzz_guest:
        _fuzz_guest.append(Guest("hlt", idt_limit=0xFFF))
    return _fuzz_guest[0]


KNOWN_EXITS = {ExitReason.IO, ExitReason.MMIO, ExitReason.HLT, ExitReason.SHUTDOWN,
               ExitReason.INTERNAL_ERROR, ExitReason.HYPERCALL, ExitReason.MEMORY_FAULT,
               ExitReason.INTR}


@pytest.mark.slow
@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(code=st.binary(min_size=1, max_size=64))
def test_random_code_ends_in_a_kvm_like_exit(code: bytes) -> None:
    """Random bytes at RIP (with an IDT whose gates are empty, so any exception escalates)
    end in a KVM exit or a clear OSError within a watchdog, never a crash or a hang."""
    from kvmpy.backend.emu.x86.fakevm import CODE, build_low_memory

    g = _fuzz_target()
    g.low.write(0, bytes(0x20000))
    build_low_memory(g.low, code + b"\xf4")
    g.h.vcpu.phys.invalidate(0, 0x200000)
    g.h.set_sregs(long_mode_sregs())
    r = kvm_regs()
    r.rip, r.rsp, r.rflags = CODE, 0x80000, 2
    g.h.set_regs(r)
    timer = threading.Timer(0.25, g.h.vcpu.kick)
    timer.start()
    try:
        for _ in range(8):
            try:
                ret = g.h.run()
            except OSError as e:            # pragma: no cover - a clear error is acceptable
                assert e.errno
                return
            assert ret in (0, errno.EINTR, errno.EFAULT, errno.EINVAL, errno.ENOSYS)
            if ret == errno.EINTR:
                assert g.h.exit_reason in KNOWN_EXITS or g.h.exit_reason == ExitReason.INTR
                return
            if ret:
                return
            assert g.h.exit_reason in KNOWN_EXITS, g.h.exit_reason
            if g.h.exit_reason in (ExitReason.HLT, ExitReason.SHUTDOWN,
                                   ExitReason.INTERNAL_ERROR):
                return
    finally:
        timer.cancel()
