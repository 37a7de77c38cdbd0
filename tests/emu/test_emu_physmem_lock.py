"""PhysMap.vm_locked() against an invalidating thread that holds vm.lock and only then waits
for this engine (EmuVcpu.invalidate: the core invalidates with vm.lock held)."""

from __future__ import annotations

import threading
import types

from kvmpy.backend.emu.x86.physmem import PhysMap


def test_engine_blocked_on_vm_lock_proceeds_once_the_holder_waits_for_it() -> None:
    vm = types.SimpleNamespace(lock=threading.RLock())
    phys = PhysMap(None, vm)  # type: ignore[arg-type]
    entered = threading.Event()
    vm.lock.acquire()  # the invalidating thread: vm.lock first...
    try:
        def engine() -> None:
            with phys.vm_locked():  # looked at sync_waiters (0) before the holder waits
                entered.set()

        t = threading.Thread(target=engine, daemon=True)
        t.start()
        assert not entered.wait(0.05)  # vm.lock is held and nobody waits for the engine yet
        phys.sync_waiters += 1  # ... then it waits for this engine to apply its invalidation
        # Before the fix the engine sat in a blocking acquire until the waiter's 2 s deadline.
        assert entered.wait(1.0), "the engine did not proceed while the lock holder waited for it"
        phys.sync_waiters -= 1
    finally:
        vm.lock.release()
    t.join(5)
    assert not t.is_alive()
