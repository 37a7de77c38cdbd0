"""ModelHarness: run one operation on a backend (real or emulated KVM) and on the reference
model (kvmpy.model.state), and compare every observable.

Observables: the errno of every call, the bytes of every host mapping (each slot's shared
backing and each host-mappable guest_memfd) after every call, and what the guest sees for each
access: the value read, a KVM_EXIT_MMIO (address, length, direction, written data, and that a
read completes with the data userspace supplies) or a KVM_EXIT_MEMORY_FAULT (flags, gpa, size).

Each call is recorded as a line of Python (``steps``) so that a failing sequence prints as a
ready-to-paste pytest test (:func:`kvmpy.model.repro.format_reproducer`).

The guest is guests/model_access.c: one vCPU answers {op, gpa, val} commands from a mailbox in
low memory; a memory fault is not completed by KVM, so the harness restarts the (stateless)
guest loop at its entry.
"""

from __future__ import annotations

import errno
import struct
from typing import Any

from ..gmem import GuestMemfd
from ..guest.ucall import Ucall, UcallCmd
from ..guest.vm import GuestVm
from ..memory import Mapping, SharedMemory
from ..system import Kvm
from ..testing.errnos import (
    Behaviour,
    errname,
    expected_errnos,
    supported_attributes,
    valid_gmem_flags,
)
from ..uapi import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    Cap,
    ExitReason,
    GuestMemfdFlag,
    MemFlag,
    MemoryAttribute,
    VmType,
)
from ..vcpu import Exit
from .state import OK, PAGE, Config, Expect, Fault, Mem, Mmio, Model, Outcome

#: Where the test's memslots live: a 32-page GPA window at 4 GiB, identity-mapped in the guest.
GPA_BASE = 1 << 32
WINDOW_PAGES = 32
#: KVM slot ids are SLOT_BASE + n for the harness's slot n (slot 0 is the guest's low memory).
SLOT_BASE = 10
#: An MMIO read completes with MMIO_MAGIC ^ gpa (what userspace supplies in kvm_run.mmio.data).
MMIO_MAGIC = 0x4D4D494F_00000000

OP_READ, OP_WRITE = 1, 2


class ModelMismatch(AssertionError):
    """The backend disagreed with the reference model."""


def _h(v: int) -> str:
    return hex(v) if v > 9 or v < 0 else str(v)


class ModelHarness:
    """A VM with the model_access guest, driven in lockstep with a :class:`Model`.

    ``vm_type``: the VM type (SW_PROTECTED for private memory where offered).
    ``known_issues``: on real KVM, expect what the kernel is known to do where it deviates from
    the documentation (kvmpy.testing.known_issues: the stale MMIO SPTE); False expects the
    documented behaviour everywhere (the known issue's own test).
    All arguments of the operation methods are plain ints/strings so a recorded sequence is
    valid Python.
    """

    def __init__(self, kvm: Kvm, vm_type: int = VmType.DEFAULT, *, timeout: float = 10.0,
                 known_issues: bool = True) -> None:
        self.kvm = kvm
        self.real = kvm.backend.is_real
        self.steps: list[str] = []
        #: errno of the last call that has one (0 for success), for statistics.
        self.last_errno = 0
        self.g = GuestVm(kvm, "model_access", vm_type=vm_type, timeout=timeout)
        try:
            vm = self.g.vm
            gm = bool(vm.check_extension(Cap.GUEST_MEMFD))
            attrs = supported_attributes(vm) if vm.check_extension(Cap.MEMORY_ATTRIBUTES) else 0
            overlap, _ = expected_errnos(vm, Behaviour.GMEM_BIND_OVERLAP)
            self.config = Config(guest_memfd=gm, gmem_flags=valid_gmem_flags(vm) if gm else 0,
                                 attributes=attrs, bind_overlap_errnos=frozenset(overlap),
                                 stale_mmio_spte=known_issues and self.real and bool(attrs),
                                 zap_all_on_delete=vm_type == VmType.DEFAULT)
            self.model = Model(self.config)
            self.gmems: dict[int, GuestMemfd] = {}
            self.gmem_maps: dict[int, Mapping] = {}
            self.backings: dict[int, SharedMemory] = {}
            self.g.map(GPA_BASE, GPA_BASE, WINDOW_PAGES * PAGE)
            self.cmd = self.g.alloc_low(1)
            self.vcpu = self.g.vcpu("guest_model_loop", self.cmd)
            r = self.vcpu.get_regs()
            self._entry = (int(r.rip), int(r.rsp), int(r.rdi))
            self._ready = False      # the guest waits in GUEST_SYNC(0) for a command
        except BaseException:
            self.g.close()
            raise

    # --- bookkeeping ----------------------------------------------------------------------
    def _step(self, name: str, *args: Any, **kw: Any) -> str:
        parts = [_h(a) if isinstance(a, int) and not isinstance(a, bool) else repr(a)
                 for a in args]
        parts += [f"{k}={_h(v) if isinstance(v, int) and not isinstance(v, bool) else repr(v)}"
                  for k, v in kw.items() if v is not None]
        text = f"h.{name}({', '.join(parts)})"
        self.steps.append(text)
        return text

    def _fail(self, step: str, what: str) -> ModelMismatch:
        return ModelMismatch(f"step {len(self.steps)} `{step}` on {self.kvm.backend.describe()}: "
                             f"{what}")

    def _expect_errno(self, step: str, got: int, want: Expect) -> None:
        self.last_errno = got
        if got not in want:
            names = " or ".join(errname(e) for e in sorted(want))
            raise self._fail(step, f"errno {errname(got)}, model expects {names}")

    def mappable(self, gid: int) -> bool:
        """Whether the host may map guest_memfd ``gid`` and touch every page of it: it has
        MMAP|INIT_SHARED and the VM has no private memory (private pages would SIGBUS)."""
        g = self.model.gmems[gid]
        want = GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED
        return g.flags & want == want and not self.config.attributes

    # --- guest_memfd ------------------------------------------------------------------------
    def create_gmem(self, size: int, flags: int = 0) -> int | None:
        """KVM_CREATE_GUEST_MEMFD; returns the model's id for it (None when it must fail)."""
        step = self._step("create_gmem", size, flags)
        want, gid = self.model.create_gmem(size, flags)
        got = 0
        try:
            g = self.g.vm.create_guest_memfd(size, flags)
        except OSError as e:
            got = e.errno or 0
        self._expect_errno(step, got, want)
        if got:
            return None
        assert gid is not None
        self.gmems[gid] = g
        if self.mappable(gid):
            self.gmem_maps[gid] = g.mmap()
        self.check(_record=False)
        return gid

    def close_gmem(self, gid: int) -> None:
        """close() the guest_memfd (and kvmpy's mapping of it)."""
        self._step("close_gmem", gid)
        self.gmem_maps.pop(gid, None)
        self.gmems[gid].close()
        self.model.close_gmem(gid)
        self.check(_record=False)

    def fallocate(self, gid: int, offset: int, length: int, punch: bool = False,
                  mode: int | None = None) -> None:
        """fallocate(KEEP_SIZE[|PUNCH_HOLE]) on guest_memfd ``gid`` (``mode`` overrides)."""
        step = self._step("fallocate", gid, offset, length, punch=punch, mode=mode)
        if mode is None:
            mode = FALLOC_FL_KEEP_SIZE | (FALLOC_FL_PUNCH_HOLE if punch else 0)
        want = self.model.fallocate(gid, mode, offset, length)
        got = self.gmems[gid].try_fallocate(offset, length, mode)
        self._expect_errno(step, got, want)
        self.check(_record=False)

    # --- memslots -----------------------------------------------------------------------------
    def set_slot(self, slot: int, gpa: int, size: int, gmem: int | None = None,
                 gmem_offset: int = 0, hva: str = "backing") -> None:
        """KVM_SET_USER_MEMORY_REGION2 (v1 where REGION2 is missing) for harness slot ``slot`` (KVM slot SLOT_BASE + slot):
        ``hva`` "backing" (a fresh memfd) or "gmem" (the guest_memfd's mapping at the offset);
        ``gmem`` binds the slot with KVM_MEM_GUEST_MEMFD."""
        step = self._step("set_slot", slot, gpa, size, gmem=gmem, gmem_offset=gmem_offset, hva=hva)
        backing: SharedMemory | None = None
        if hva == "backing":
            backing = SharedMemory(self.kvm.backend, max(size, PAGE), f"kvmpy-model-slot{slot}")
            addr = backing.addr
        elif hva == "gmem":
            if gmem is None or gmem not in self.gmem_maps:
                raise ValueError(f"{step}: hva='gmem' needs a host-mappable guest_memfd")
            addr = self.gmem_maps[gmem].addr + gmem_offset
        else:
            raise ValueError(f"hva must be 'backing' or 'gmem', not {hva!r}")
        gm = self.gmems[gmem] if gmem is not None else None
        flags = MemFlag.GUEST_MEMFD if gm is not None else 0
        want = self.model.set_slot(slot, gpa, size, hva, gmem, gmem_offset)
        vm = self.g.vm
        if gm is None and not vm.has_region2():  # before 6.8: v1 only, no guest_memfd slots
            got = vm.try_set_user_memory_region(SLOT_BASE + slot, flags, gpa, size, addr)
        else:
            got = vm.try_set_user_memory_region2(SLOT_BASE + slot, flags, gpa, size, addr,
                                                 gm, gmem_offset if gm else 0)
        # The backing is KVM's (kept, closed with the harness) or freed before the check, so a
        # mismatch leaks no memfd.
        if got:
            if backing is not None:
                backing.close()
        elif backing is not None:
            self.backings[slot] = backing
        self._expect_errno(step, got, want)
        self.check(_record=False)

    def delete_slot(self, slot: int) -> None:
        """Delete harness slot ``slot`` (memory_size 0)."""
        step = self._step("delete_slot", slot)
        want = self.model.delete_slot(slot)
        vm = self.g.vm
        if vm.has_region2():
            got = vm.try_set_user_memory_region2(SLOT_BASE + slot, 0, 0, 0, 0)
        else:
            got = vm.try_set_user_memory_region(SLOT_BASE + slot, 0, 0, 0, 0)
        if not got:
            b = self.backings.pop(slot, None)
            if b is not None:
                b.close()
        self._expect_errno(step, got, want)
        self.check(_record=False)

    # --- attributes ---------------------------------------------------------------------------
    def set_attributes(self, gpa: int, size: int, private: bool = True,
                       attributes: int | None = None) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES (PRIVATE or shared; ``attributes`` overrides)."""
        step = self._step("set_attributes", gpa, size, private=private, attributes=attributes)
        if attributes is None:
            attributes = int(MemoryAttribute.PRIVATE) if private else 0
        want = self.model.set_attributes(gpa, size, attributes)
        got = self.g.vm.try_set_memory_attributes(gpa, size, attributes)
        self._expect_errno(step, got, want)
        self.check(_record=False)

    # --- host writes --------------------------------------------------------------------------
    def host_write(self, slot: int, offset: int, value: int) -> None:
        """Write a qword into slot ``slot``'s shared backing (its memfd)."""
        self._step("host_write", slot, offset, value)
        self.backings[slot].mapping.write(offset, struct.pack("<Q", value))
        self.model.host_write_backing(slot, offset, value)
        self.check(_record=False)

    def host_write_gmem(self, gid: int, offset: int, value: int) -> None:
        """Write a qword through the guest_memfd's own mapping (MMAP|INIT_SHARED)."""
        self._step("host_write_gmem", gid, offset, value)
        self.gmem_maps[gid].write(offset, struct.pack("<Q", value))
        self.model.host_write_gmem(gid, offset, value)
        self.check(_record=False)

    # --- guest accesses -------------------------------------------------------------------------
    def guest_read(self, gpa: int) -> Outcome:
        """The guest reads the qword at ``gpa``; checked against the model."""
        step = self._step("guest_read", gpa)
        want = self.model.guest_read(gpa)
        got = self._guest(step, OP_READ, gpa, 0)
        self._compare(step, want, got)
        self.check(_record=False)
        return got

    def guest_write(self, gpa: int, value: int) -> Outcome:
        """The guest writes ``value`` at ``gpa``; checked against the model."""
        step = self._step("guest_write", gpa, value)
        want = self.model.guest_write(gpa, value)
        got = self._guest(step, OP_WRITE, gpa, value)
        self._compare(step, want, got)
        self.check(_record=False)
        return got

    def _restart(self) -> None:
        """Put the guest loop back at its entry (after an exit KVM does not complete)."""
        rip, rsp, rdi = self._entry
        r = self.vcpu.get_regs()
        r.rip, r.rsp, r.rdi, r.rflags = rip, rsp, rdi, 0x2
        self.vcpu.set_regs(r)
        self._ready = False

    def _guest(self, step: str, op: int, gpa: int, val: int) -> Outcome:
        """Run one command; returns what the backend showed, in the model's terms."""
        g, vcpu = self.g, self.vcpu
        if not self._ready:
            r0 = g.run(vcpu)
            if not (isinstance(r0, Ucall) and r0.cmd == UcallCmd.SYNC and r0.args[:1] == (0,)):
                raise self._fail(step, f"guest loop did not reach GUEST_SYNC(0): {r0}")
        g.write_phys(self.cmd, struct.pack("<3Q", op, gpa, val & (2**64 - 1)))
        self._ready = False
        r = g.run(vcpu)
        outcome: Outcome | None = None
        if isinstance(r, Exit):
            if r.reason == ExitReason.MEMORY_FAULT and r.memory_fault is not None:
                mf = r.memory_fault
                if r.errno != errno.EFAULT:
                    raise self._fail(step, f"KVM_EXIT_MEMORY_FAULT with KVM_RUN errno "
                                           f"{errname(r.errno)}, api.rst says -1/EFAULT")
                self._restart()
                return Fault(mf.flags, mf.gpa, mf.size)
            if r.reason == ExitReason.MMIO and r.mmio is not None:
                m = r.mmio
                if m.len != 8:
                    raise self._fail(step, f"KVM_EXIT_MMIO len {m.len}, the guest access is 8")
                outcome = Mmio(m.phys_addr, m.is_write)
                if m.is_write:
                    data = int.from_bytes(m.data[:8], "little")
                    if data != val & (2**64 - 1):
                        raise self._fail(step, f"MMIO write data {data:#x}, guest wrote "
                                               f"{val:#x}")
                else:
                    supply = MMIO_MAGIC ^ m.phys_addr
                    vcpu.run_struct.exit.mmio.data[:8] = list(struct.pack("<Q", supply))
                    val = supply
                r = g.run(vcpu)
            if isinstance(r, Exit):
                self._restart()
                raise self._fail(step, f"unexpected exit {r}")
        if r.cmd != UcallCmd.SYNC or r.args[:1] != (op,):
            raise self._fail(step, f"guest reported {r}, expected GUEST_SYNC({op}, ...)")
        if outcome is not None:
            if op == OP_READ and r.args[1] != val:
                raise self._fail(step, f"MMIO read completed with {r.args[1]:#x}, userspace "
                                       f"supplied {val:#x} (api.rst 5. KVM_EXIT_MMIO)")
            return outcome
        return Mem(r.args[1] if op == OP_READ else val & (2**64 - 1), "?")

    def _compare(self, step: str, want: Outcome, got: Outcome) -> None:
        if isinstance(want, Mem) and isinstance(got, Mem):
            if want.value != got.value:
                raise self._fail(step, f"guest saw {got.value:#x}, model expects {want.value:#x} "
                                       f"(from {want.source})")
            return
        if want != got:
            raise self._fail(step, f"guest access gave {got}, model expects {want}")

    # --- host views ---------------------------------------------------------------------------
    def check(self, _record: bool = True) -> None:
        """Compare every host mapping (slot backings, host-mappable guest_memfds) with the
        model, byte for byte."""
        step = self._step("check") if _record else (self.steps[-1] if self.steps else "check")
        for slot, b in self.backings.items():
            s = self.model.slots.get(slot)
            if s is None or s.backing is None:
                continue
            self._compare_bytes(step, f"slot {slot}'s shared backing", b.mapping.read(0, s.size),
                                s.backing.data)
        for gid, m in self.gmem_maps.items():
            g = self.model.gmems[gid]
            self._compare_bytes(step, f"guest_memfd {gid}'s mapping", m.read(0, g.size), g.data)

    def _compare_bytes(self, step: str, what: str, got: bytes, data: dict[int, int]) -> None:
        want = bytearray(len(got))
        for off, v in data.items():
            if off + 8 <= len(want):
                want[off:off + 8] = struct.pack("<Q", v)
        if got == want:
            return
        for off in range(0, len(got), 8):
            if got[off:off + 8] != want[off:off + 8]:
                g = struct.unpack_from("<Q", got, off)[0]
                w = struct.unpack_from("<Q", want, off)[0]
                raise self._fail(step, f"{what} holds {g:#x} at offset {off:#x}, model expects "
                                       f"{w:#x}")

    # --- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        self.gmem_maps.clear()
        for gm in self.gmems.values():
            gm.close()
        self.g.close()
        for b in self.backings.values():
            b.close()
        self.backings.clear()

    def __enter__(self) -> ModelHarness:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = [
    "GPA_BASE",
    "MMIO_MAGIC",
    "OK",
    "SLOT_BASE",
    "WINDOW_PAGES",
    "ModelHarness",
    "ModelMismatch",
]
