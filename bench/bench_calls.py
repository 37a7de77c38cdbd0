"""Per-call cost of kvmpy's object layer (issue 15): calls/s of cheap VM and vCPU ioctls.

    .venv/bin/python bench/bench_calls.py [--backend kvm|emu|both] [--calls N] [--rounds R]

Each call is timed in ``rounds`` batches of ``calls``; the best batch is printed as calls/s
(the best, not the mean, so that a busy host moves the numbers less). On the real backend
the raw libc ioctl(2) of the same request is printed too: the floor the object layer sits on.

  try_create_guest_memfd(1)      KVM_CREATE_GUEST_MEMFD refused (EINVAL: size not page
                                 aligned), the selftests' invalid-size sweep
  create_guest_memfd(4096)+close a guest_memfd made and closed
  get_regs()                     KVM_GET_REGS on a vCPU
  try_set_user_memory_region     KVM_SET_USER_MEMORY_REGION refused (EINVAL: size 4095)

It prints, it asserts nothing (no timed asserts: see docs on bench/).
"""

from __future__ import annotations

import argparse
import ctypes
import time
from collections.abc import Callable

from kvmpy.backend import Backend, arg_pointer
from kvmpy.system import Kvm
from kvmpy.uapi import Ioctl, kvm_create_guest_memfd


def _rate(fn: Callable[[], object], calls: int, rounds: int) -> float:
    """Best calls/s of ``rounds`` batches of ``calls`` calls of ``fn`` (one warm-up batch)."""
    best = float("inf")
    for r in range(rounds + 1):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        dt = time.perf_counter() - t
        if r:
            best = min(best, dt)
    return calls / best


def _backend(name: str) -> Backend:
    if name == "emu":
        from kvmpy.backend.emu import EmuBackend
        return EmuBackend()
    from kvmpy.backend.host import HostBackend
    return HostBackend()


def measure(backend: str, calls: int, rounds: int) -> dict[str, float]:
    """calls/s of each measured call on ``backend`` ("kvm" or "emu")."""
    kvm = Kvm(_backend(backend))
    try:
        vm = kvm.create_vm(0)
        vcpu = vm.create_vcpu(0)

        def gmem() -> None:
            vm.create_guest_memfd(4096).close()
            vm._gmems.clear()  # close() leaves the closed object listed until the VM closes

        out = {
            "try_create_guest_memfd(1)": _rate(lambda: vm.try_create_guest_memfd(1), calls,
                                               rounds),
            "create_guest_memfd(4096)+close": _rate(gmem, calls, rounds),
            "get_regs()": _rate(vcpu.get_regs, calls, rounds),
            "try_set_user_memory_region": _rate(
                lambda: vm.try_set_user_memory_region(0, 0, 0, 4095, 0), calls, rounds),
        }
        if backend == "kvm":
            from kvmpy.backend.libc import libc
            arg = kvm_create_guest_memfd(size=1)
            req, fd, ptr = int(Ioctl.KVM_CREATE_GUEST_MEMFD), vm.fd, arg_pointer(arg)
            assert libc.ioctl(fd, req, ptr) == -1 and ctypes.get_errno() == 22
            out["raw libc ioctl (gmem EINVAL)"] = _rate(lambda: libc.ioctl(fd, req, ptr), calls,
                                                         rounds)
        vm.close()
        return out
    finally:
        kvm.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="kvmpy object-layer calls/s (issue 15)")
    ap.add_argument("--backend", choices=("kvm", "emu", "both"), default="both")
    ap.add_argument("--calls", type=int, default=5000, help="calls per timed batch")
    ap.add_argument("--rounds", type=int, default=5, help="timed batches per call")
    a = ap.parse_args(argv)
    for b in ("kvm", "emu") if a.backend == "both" else (a.backend,):
        for what, rate in measure(b, a.calls, a.rounds).items():
            print(f"{b:<4} {what:<34}{rate:>12,.0f} calls/s")


if __name__ == "__main__":
    main()
