"""Property-based fuzzing of the object API on both backends (hypothesis).

Each example is a random sequence of calls - VMs, vCPUs, guest_memfds, memslots, attributes,
fallocate, mmap, runs and closes in any order, with in-range, out-of-range and wrongly typed
arguments, and calls on closed objects - run in a forked child, so a crash is a failing
example, not a dead test process. Only kvmpy's documented exceptions may escape a call
(docs/design.md, "Failure behaviour"), and afterwards the library's view of every open VM's
memslots must be the kernel's: each slot id is probed with a KVM_SET_USER_MEMORY_REGION the
kernel refuses (EINVAL: a size change) exactly when the slot exists.
Budget: KVMPY_FUZZ_EXAMPLES examples per backend (default 300).
"""

from __future__ import annotations

import errno
import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy import Kvm, KvmError
from kvmpy.backend import Backend
from kvmpy.errors import NotModelled
from kvmpy.memory import anonymous
from kvmpy.testing.child import run_in_child

P = 4096
SLOTS = 6
PROBE_GPA = 1 << 38          # no op maps here; below any MAXPHYADDR KVM runs on
PROBE_SIZE = 5 * P           # no op uses this size
ALLOWED = (KvmError, OverflowError, TypeError, ValueError, NotModelled)

# Mostly values a real caller passes, sometimes hostile ones (out of range, wrong sign).
bad = st.sampled_from([-1, 2**64, 2**64 + 3, -(2**63) - 1, 1 << 63, 2**64 - 1])
ints = st.one_of(st.integers(0, 8), st.integers(0, 8), bad)
sizes = st.one_of(st.sampled_from([P, 2 * P, 4 * P, 16 * P]), st.sampled_from([P, 2 * P]),
                  st.sampled_from([0, P + 1]), bad)
offsets = st.one_of(st.sampled_from([0, P, 2 * P]), st.sampled_from([0, P]), bad)
obj = st.integers(0, 7)   # index into the objects made so far (modulo their count)
slot_ids = st.one_of(st.integers(0, SLOTS - 1), st.integers(0, SLOTS - 1), ints)
gpas = st.one_of(st.sampled_from([0, 1 << 32, (1 << 32) + 8 * P]),
                 st.sampled_from([1 << 32, (1 << 32) + 16 * P]), bad)
REGION = st.tuples(st.just("region"), obj, slot_ids, st.sampled_from([0, 0, 2]), gpas, sizes,
                   st.booleans())
DELETE = st.tuples(st.just("delete"), obj, st.integers(0, SLOTS - 1))
OPS = st.one_of(
    REGION, REGION, DELETE,
    st.tuples(st.just("create_vm"), st.one_of(st.sampled_from([0, 0, 0, 1]), bad)),
    st.tuples(st.just("create_vcpu"), obj, st.one_of(st.none(), ints)),
    st.tuples(st.just("create_gmem"), obj, sizes, st.one_of(st.sampled_from([0, 1, 3]), ints)),
    st.tuples(st.just("region2"), obj, st.integers(0, SLOTS - 1), obj, offsets,
              st.sampled_from([1 << 33, (1 << 33) + 16 * P]), sizes),
    st.tuples(st.just("attrs"), obj, offsets, sizes, st.sampled_from([0, 8]) | ints),
    st.tuples(st.just("fallocate"), obj, offsets, sizes, st.sampled_from([1, 3]) | ints),
    st.tuples(st.just("mmap"), obj, st.one_of(st.none(), sizes)),
    st.tuples(st.just("run"), obj),
    st.tuples(st.just("regs"), obj),
    st.tuples(st.just("close"), obj),
)


def _pick(objs: list[Any], kind: type, i: int) -> Any:
    of_kind = [o for o in objs if isinstance(o, kind)]
    return of_kind[i % len(of_kind)] if of_kind else None


def _apply(k: Kvm, objs: list[Any], hva: int, op: tuple[Any, ...]) -> None:
    from kvmpy.gmem import GuestMemfd
    from kvmpy.vcpu import Vcpu
    from kvmpy.vm import Vm

    name, *a = op
    vm = _pick(objs, Vm, a[0]) if a and name != "create_vm" else None
    if name == "create_vm":
        objs.append(k.create_vm(a[0]))
    elif name == "create_vcpu" and vm:
        objs.append(vm.create_vcpu(a[1]))
    elif name == "create_gmem" and vm:
        objs.append(vm.create_guest_memfd(a[1], a[2]))
    elif name == "region" and vm:
        slot, flags, gpa, size, backed = a[1:]
        vm.try_set_user_memory_region(slot, flags, gpa, size, hva if backed else 0)
    elif name == "region2" and vm:
        slot, gi, off, gpa, size = a[1:]
        g = _pick(objs, GuestMemfd, gi)
        vm.try_set_user_memory_region2(slot, 4 if g else 0, gpa, size, hva, g, off)
    elif name == "delete" and vm:
        vm.try_set_user_memory_region2(a[1], 0, 0, 0, 0)
    elif name == "attrs" and vm:
        vm.try_set_memory_attributes(*a[1:])
    elif name == "fallocate":
        g = _pick(objs, GuestMemfd, a[0])
        if g:
            g.try_fallocate(a[1], a[2], a[3])
    elif name == "mmap":
        g = _pick(objs, GuestMemfd, a[0])
        if g:
            g.try_mmap(a[1])
    elif name in ("run", "regs"):
        v = _pick(objs, Vcpu, a[0])
        if v:
            # A fresh vCPU in real mode at the reset vector: whatever exit it gets.
            v.immediate_exit = name == "run" and a[0] % 2 == 0
            v.try_run() if name == "run" else v.get_regs()
    elif name == "close" and objs:
        objs[a[0] % len(objs)].close()


def _check_views(objs: list[Any], hva: int) -> None:
    """The library's memslots of each open VM are the kernel's (see the module docstring)."""
    from kvmpy.vm import Vm

    for vm in objs:
        if not isinstance(vm, Vm) or vm.closed:
            continue
        for s in range(SLOTS):
            view = vm.memslots.get(s)
            err = vm.try_set_user_memory_region(s, 0, PROBE_GPA + s * (1 << 30), PROBE_SIZE,
                                                hva)
            if err == 0:
                vm.set_user_memory_region(s, 0, PROBE_GPA + s * (1 << 30), 0, hva)
            assert err in (0, errno.EINVAL), f"probe of slot {s}: errno {err}"
            assert (err == errno.EINVAL) == (view is not None), (
                f"slot {s}: the kernel {'has' if err else 'has no'} it, the library view says "
                f"{view}")


def _sequence(backend: Backend, ops: list[tuple[Any, ...]]) -> str:
    k = Kvm(backend)
    host = anonymous(backend, 16 * P)
    objs: list[Any] = []
    errors = 0
    for op in ops:
        try:
            _apply(k, objs, host.addr, op)
        except ALLOWED:
            errors += 1
    _check_views(objs, host.addr)
    k.close()
    for o in objs:
        assert o.closed, f"{o!r} open after Kvm.close()"
    return f"{len(ops)} ops, {errors} refused"


def test_random_api_sequences_never_crash(each_backend: Backend) -> None:
    backend = each_backend

    @settings(max_examples=int(os.environ.get("KVMPY_FUZZ_EXAMPLES", "300")), deadline=None,
              suppress_health_check=[HealthCheck.too_slow], database=None)
    # Every sequence starts with a VM, so the calls on it are not all no-ops.
    @given(st.lists(OPS, min_size=4, max_size=25))
    def sequences(ops: list[tuple[Any, ...]]) -> None:
        ops = [("create_vm", 0), *ops]
        out = run_in_child(lambda: _sequence(backend, ops), timeout=30)
        assert out.ok, f"{out.describe()}\nops: {ops}"

    sequences()
