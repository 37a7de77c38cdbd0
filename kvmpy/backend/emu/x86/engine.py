"""The unicorn engine of one vCPU: creation, register moves, and the build-specific fixes.

Unicorn 2.1.4 facts used here (docs/emulator.md, "Unicorn 2.1.4 facts"):
- a UC_MODE_64 engine is always in long mode; writing CS/DS/SS/ES sets only the selector,
  writing FS/GS loads a descriptor from the GDT (and kills the process with SIGSEGV when the
  GDT is not mapped), so FS/GS are set through FS_BASE/GS_BASE only;
- unicorn never resets QEMU's ``old_exception`` after an exception reaches the INTR hook, so
  the next exception is misreported (#GP as #DF). It is reset in the saved context before
  every run that follows an exception. The offsets below are those of the 2.1.4 x86_64 build
  and are verified at engine creation (a fresh engine has old_exception == -1 there).
"""

from __future__ import annotations

import ctypes
import errno
import struct
import threading
from typing import Any

from unicorn import UC_ARCH_X86, UC_MODE_64, unicorn_const
from unicorn import x86_const as X
from unicorn.unicorn import Uc, UcError

# Offsets in the uc_context blob (40-byte header + CPUX86State) of unicorn 2.1.4.
CTX_SIZE = 5608
CTX_ERROR_CODE = 5424          # env->error_code (int)
CTX_EXC_IS_INT = 5428          # env->exception_is_int (int)
CTX_EXC_NEXT_EIP = 5432        # env->exception_next_eip (u64)
CTX_OLD_EXCEPTION = 5536       # env->old_exception (int)
# Offset of uc_struct.emu_counter (instructions run by this emu_start; emu_count follows).
UC_EMU_COUNTER = 1368

MSR_EFER = 0xC0000080
MSR_FS_BASE = 0xC0000100
MSR_GS_BASE = 0xC0000101

GPRS = (X.UC_X86_REG_RAX, X.UC_X86_REG_RBX, X.UC_X86_REG_RCX, X.UC_X86_REG_RDX,
        X.UC_X86_REG_RSI, X.UC_X86_REG_RDI, X.UC_X86_REG_RSP, X.UC_X86_REG_RBP,
        X.UC_X86_REG_R8, X.UC_X86_REG_R9, X.UC_X86_REG_R10, X.UC_X86_REG_R11,
        X.UC_X86_REG_R12, X.UC_X86_REG_R13, X.UC_X86_REG_R14, X.UC_X86_REG_R15,
        X.UC_X86_REG_RIP, X.UC_X86_REG_RFLAGS)
REG_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10",
             "r11", "r12", "r13", "r14", "r15", "rip", "rflags")


class LayoutError(OSError):
    pass


def new_engine() -> Any:
    """A fresh 64-bit engine, after checking the context layout this module relies on."""
    uc: Any = Uc(UC_ARCH_X86, UC_MODE_64)  # type: ignore[no-untyped-call]
    ctx = uc.context_save()
    raw = ctypes.string_at(ctx.context.value, CTX_SIZE) if ctx.size == CTX_SIZE else b""
    if len(raw) != CTX_SIZE or struct.unpack_from("<i", raw, CTX_OLD_EXCEPTION)[0] != -1:
        raise LayoutError(errno.ENOSYS,
                          f"emulated KVM: unicorn {unicorn_const.UC_VERSION_MAJOR}.{unicorn_const.UC_VERSION_MINOR} has an unknown CPU "
                          "context layout (the exception bookkeeping fix needs 2.1.4)")
    # Without explicit exits, emu_start probes the ``until`` address through the guest's page
    # tables and a miss leaves CR2 = until - 1 (and QEMU's exception state dirty) on every run.
    uc.ctl_exits_enabled(True)
    uc.ctl_set_exits([])
    _check_counter(uc)
    return uc


def _counter_addr(uc: Any) -> int:
    return int(ctypes.cast(uc._uch, ctypes.c_void_p).value or 0) + UC_EMU_COUNTER


def executed(uc: Any) -> int:
    """Instructions the last emu_start ran (count + 1 when the count ran out)."""
    return int(ctypes.c_uint64.from_address(_counter_addr(uc)).value)


def counter(uc: Any) -> ctypes.c_uint64:
    """A live view of uc_struct.emu_counter (see executed())."""
    return ctypes.c_uint64.from_address(_counter_addr(uc))


def _check_counter(uc: Any) -> None:
    """Verify UC_EMU_COUNTER on a scratch page: "nop; nop; hlt" runs 3 instructions with a
    large count, and a count of 1 ends with the counter at 2 (exhausted)."""
    buf = ctypes.create_string_buffer(b"\x90\x90\xf4".ljust(4096, b"\0"), 4096)
    uc.mem_map_ptr(0x1000, 0x1000, 7, ctypes.addressof(buf))
    try:
        uc.emu_start(0x1000, 0, 0, 100)
        full = executed(uc)
        nxt = ctypes.c_uint64.from_address(_counter_addr(uc) + 8).value
        uc.emu_start(0x1000, 0, 0, 1)
        one = executed(uc)
    finally:
        uc.mem_unmap(0x1000, 0x1000)
    if (full, nxt, one) != (3, 100, 2):
        raise LayoutError(errno.ENOSYS, "emulated KVM: unicorn's instruction counter is not at "
                          f"the expected offset ({full}, {nxt}, {one}); needs unicorn 2.1.4")


def exception_info(uc: Any) -> tuple[int, bool, int]:
    """(error_code, is_software_int, next_eip) of the exception being raised (INTR hook)."""
    ctx = uc.context_save()
    raw = ctypes.string_at(ctx.context.value + CTX_ERROR_CODE, 16)
    code, is_int, next_eip = struct.unpack("<iiQ", raw)
    return code & 0xFFFF_FFFF, bool(is_int), next_eip


def reset_old_exception(uc: Any) -> None:
    ctx = uc.context_save()
    ctypes.memmove(ctx.context.value + CTX_OLD_EXCEPTION, struct.pack("<i", -1), 4)
    uc.context_restore(ctx)


def read_gprs(uc: Any) -> list[int]:
    return list(uc.reg_read_batch(GPRS))


def write_gprs(uc: Any, values: list[int]) -> None:
    uc.reg_write_batch(list(zip(GPRS, values, strict=True)))


def _set_msr_intercept(uc: Any, on: bool) -> None:
    ctx = uc.context_save()
    ctypes.memmove(ctx.context.value + CTX_INTERCEPT,
                   struct.pack("<Q", (1 << INTERCEPT_MSR_PROT) if on else 0), 8)
    uc.context_restore(ctx)


def read_msr(uc: Any, msr: int) -> int:
    # unicorn's MSR registers go through helper_rdmsr/helper_wrmsr, whose SVM check would
    # cpu_loop_exit() outside cpu_exec (a crash): the intercept is off around the access.
    if getattr(uc, "_kvmpy_intercepts", False):
        _set_msr_intercept(uc, False)
        try:
            return int(uc.reg_read(X.UC_X86_REG_MSR, msr))
        finally:
            _set_msr_intercept(uc, True)
    return int(uc.reg_read(X.UC_X86_REG_MSR, msr))


def write_msr(uc: Any, msr: int, value: int) -> None:
    if getattr(uc, "_kvmpy_intercepts", False):
        _set_msr_intercept(uc, False)
        try:
            uc.reg_write(X.UC_X86_REG_MSR, (msr, value))
        finally:
            _set_msr_intercept(uc, True)
        return
    uc.reg_write(X.UC_X86_REG_MSR, (msr, value))


_RAW_REG_CALLS: tuple[Any, Any, Any, Any] | None = None


def _raw_reg_calls(uclib: Any) -> tuple[Any, Any, Any, Any]:
    """uc_reg_read, uc_reg_write, uc_reg_read_batch and uc_reg_write_batch of the loaded
    libunicorn, with no argtypes (made once)."""
    global _RAW_REG_CALLS
    if _RAW_REG_CALLS is None:
        raw = ctypes.CDLL(uclib._name)
        calls = (raw.uc_reg_read, raw.uc_reg_write, raw.uc_reg_read_batch,
                 raw.uc_reg_write_batch)
        for f in calls:
            f.restype = ctypes.c_int
        _RAW_REG_CALLS = calls
    return _RAW_REG_CALLS


class FastRegs:
    """Register moves straight through libunicorn's batch calls with prebuilt arrays: the
    binding's reg_read_batch costs ~20 us for 18 registers in Python overhead, this ~2 us."""

    def __init__(self, uc: Any) -> None:
        from unicorn.unicorn_py3.unicorn import uclib

        self._lib = uclib
        self._h = uc._uch
        self._ids = (ctypes.c_int * len(GPRS))(*GPRS)
        self._vals = (ctypes.c_uint64 * len(GPRS))()
        base = ctypes.addressof(self._vals)
        self._ptrs = (ctypes.c_void_p * len(GPRS))(*[base + 8 * i for i in range(len(GPRS))])
        self._one = ctypes.c_uint64()
        self._one_p = ctypes.cast(ctypes.pointer(self._one), ctypes.c_void_p)
        # The calls without the binding's argtypes: every argument is passed as it is (the
        # handle, arrays and pointer are ctypes objects, register ids and counts small ints),
        # which skips ctypes' per-argument conversion: ~0.3 of the ~0.7 us a register move
        # took, and an exit makes several (issue 15). Same library, a second handle.
        self._rd, self._wr, self._rdb, self._wrb = _raw_reg_calls(uclib)
        #: Pairs an exit moves together (one batch call instead of two).
        self.rip_rax = RegPair(self, X.UC_X86_REG_RIP, X.UC_X86_REG_RAX)
        self.cr3_rip = RegPair(self, X.UC_X86_REG_CR3, X.UC_X86_REG_RIP)
        self.rax_rip = RegPair(self, X.UC_X86_REG_RAX, X.UC_X86_REG_RIP)

    def read_gprs(self) -> list[int]:
        self._check(self._rdb(self._h, self._ids, self._ptrs, len(GPRS)))
        return list(self._vals)

    def gprs_bytes(self) -> bytes:
        """The 18 registers in struct kvm_regs layout (the same order as GPRS)."""
        err = self._rdb(self._h, self._ids, self._ptrs, len(GPRS))
        if err:
            self._check(err)
        return bytes(self._vals)

    def write_gprs(self, values: list[int]) -> None:
        for i, v in enumerate(values):
            self._vals[i] = v
        self._check(self._wrb(self._h, self._ids, self._ptrs, len(GPRS)))

    # read/write run several times per exit: the C function is bound once and the error check
    # is a branch, not a call.
    def read(self, reg: int) -> int:
        err = self._rd(self._h, reg, self._one_p)
        if err:
            self._check(err)
        return self._one.value

    def write(self, reg: int, value: int) -> None:
        self._one.value = value & 0xFFFF_FFFF_FFFF_FFFF
        err = self._wr(self._h, reg, self._one_p)
        if err:
            self._check(err)

    @staticmethod
    def _check(err: int) -> None:
        if err:
            raise OSError(errno.EIO, f"emulated KVM: unicorn register access failed ({err})")


class RegPair:
    """Two registers read or written with one uc_reg_{read,write}_batch: a PIO exit moves RIP
    with RAX or CR3 several times (issue 15)."""

    __slots__ = ("_h", "_ids", "_ptrs", "_rdb", "_vals", "_wrb")

    def __init__(self, regs: FastRegs, a: int, b: int) -> None:
        self._h, self._rdb, self._wrb = regs._h, regs._rdb, regs._wrb
        self._ids = (ctypes.c_int * 2)(a, b)
        self._vals = (ctypes.c_uint64 * 2)()
        base = ctypes.addressof(self._vals)
        self._ptrs = (ctypes.c_void_p * 2)(base, base + 8)

    def read(self) -> tuple[int, int]:
        err = self._rdb(self._h, self._ids, self._ptrs, 2)
        if err:
            FastRegs._check(err)
        v = self._vals
        return v[0], v[1]

    def write(self, a: int, b: int) -> None:
        v = self._vals
        v[0], v[1] = a & 0xFFFF_FFFF_FFFF_FFFF, b & 0xFFFF_FFFF_FFFF_FFFF
        err = self._wrb(self._h, self._ids, self._ptrs, 2)
        if err:
            FastRegs._check(err)


# --- Intercepts (issue 11 item 12) -----------------------------------------------------------
# QEMU's TCG (unicorn 2.1.4 = QEMU 5.0) checks SVM intercepts for a nested guest: with
# HF_GUEST_MASK in hflags, a MOV to CR0/CR4 (also CLTS/LMSW) whose bit is set in
# intercept_cr_write, and RDMSR/WRMSR with INTERCEPT_MSR_PROT whose MSR permission map bit is set
# (or whose index lies outside the map's three ranges), leave the engine as exception
# EXCP_VMEXIT + exit code with RIP at the instruction (cpu_vmexit() restores the state; unicorn
# hands the "exception" to the INTR hook instead of do_vmexit()). Nothing else is intercepted:
# the other intercept bits stay 0. The emulator then applies KVM's checks itself
# (kvm_set_cr0()/kvm_set_cr4()/kvm_{get,set}_msr_common()) and retires the instruction or
# injects #GP. Offsets are CPUX86State's in the context blob (verified in enable_intercepts()).
CTX_HFLAGS = 216               # env->hflags (u32); HF_CS64 and HF_LMA are set in long mode
CTX_VM_VMCB = 5544             # env->vm_vmcb (u64), right after old_exception
CTX_INTERCEPT = 5560           # env->intercept (u64)
CTX_INTERCEPT_CR_WRITE = 5570  # env->intercept_cr_write (u16)
HF_GUEST_MASK = 1 << 21
HF_LMA_CS64 = (1 << 14) | (1 << 15)
EXCP_VMEXIT = 0x100
SVM_EXIT_WRITE_CR0 = 0x010
SVM_EXIT_MSR = 0x07C
INTERCEPT_MSR_PROT = SVM_EXIT_MSR - 0x060     # bit in env->intercept (SVM_EXIT_INTR = 0x60)
# The VMCB and MSR permission map live in engine-only physical memory above every guest GPA
# (MAXPHYADDR 40; memslots end below 1 << 40), which the guest's page tables cannot reach.
VMCB_GPA = 1 << 44
VMCB_MSRPM_BASE_PA = 0x48      # offsetof(struct vmcb, control.msrpm_base_pa)


def enable_intercepts(uc: Any) -> None:
    """Make every MOV to CR0/CR4 and every RDMSR/WRMSR stop the engine (see above)."""
    try:
        uc.mem_map(VMCB_GPA, 3 * 4096, 3)
        uc.mem_write(VMCB_GPA + VMCB_MSRPM_BASE_PA, struct.pack("<Q", VMCB_GPA + 4096))
        uc.mem_write(VMCB_GPA + 4096, b"\xff" * 8192)
    except UcError as e:
        if e.errno != unicorn_const.UC_ERR_MAP:
            raise
    ctx = uc.context_save()
    a = ctx.context.value
    hflags, = struct.unpack("<I", ctypes.string_at(a + CTX_HFLAGS, 4))
    vmcb, = struct.unpack("<Q", ctypes.string_at(a + CTX_VM_VMCB, 8))
    if vmcb not in (0, VMCB_GPA) or hflags & ~0xFFFF_FFFF:
        raise LayoutError(errno.ENOSYS, "unicorn context layout differs at hflags/vm_vmcb: "
                          "the CR/MSR intercepts need unicorn 2.1.4")
    ctypes.memmove(a + CTX_HFLAGS, struct.pack("<I", hflags | HF_GUEST_MASK), 4)
    ctypes.memmove(a + CTX_VM_VMCB, struct.pack("<Q", VMCB_GPA), 8)
    ctypes.memmove(a + CTX_INTERCEPT, struct.pack("<Q", 1 << INTERCEPT_MSR_PROT), 8)
    ctypes.memmove(a + CTX_INTERCEPT_CR_WRITE, struct.pack("<H", (1 << 0) | (1 << 4)), 2)
    uc.context_restore(ctx)
    uc._kvmpy_intercepts = True


# --- The last translation block run (issue 11 item 12: non-canonical branch targets) ----------
# QEMU 5.0's TCG does not check a branch target for canonicality: the branch retires and the
# *fetch* at the target raises #GP(0) with RIP = the target. A CPU faults on the branch itself,
# not retired. To find the branch, a native UC_HOOK_BLOCK callback records the start and byte
# size of every translation block as it runs (a TB is straight-line code ending at its branch):
# a Python callback costs ~1 us per block, this one a store (no measurable change on a memory
# loop). It is three x86-64 instructions in an executable page, for the SysV ABI's
# uc_cb_hookcode_t(uc = rdi, address = rsi, size = edx, user_data = rcx):
#   mov [rcx], rsi; mov [rcx+8], edx; ret
_BLOCK_STUB = bytes.fromhex("488931" "895108" "c3")
_stub_addr = 0


def _block_stub() -> int:
    global _stub_addr
    if not _stub_addr:
        import mmap

        from ...libc import libc_mmap, libc_mprotect

        page = libc_mmap(0, 4096, mmap.PROT_READ | mmap.PROT_WRITE,
                         mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        ctypes.memmove(page, _BLOCK_STUB, len(_BLOCK_STUB))
        libc_mprotect(page, 4096, mmap.PROT_READ | mmap.PROT_EXEC)    # W^X
        _stub_addr = page
    return _stub_addr


class BlockTrace:
    """``start``/``size`` of the translation block the engine entered last (see above).
    None on a host whose ABI the stub does not fit (not x86-64): then branches to
    non-canonical targets are reported at the target, as unicorn does."""

    def __init__(self, uc: Any) -> None:
        import platform

        from unicorn import UC_HOOK_BLOCK
        from unicorn.unicorn_py3.unicorn import uclib

        self._slot = (ctypes.c_uint64 * 2)()
        self.enabled = platform.machine() in ("x86_64", "AMD64")
        if not self.enabled:
            return
        h = ctypes.c_size_t()
        err = uclib.uc_hook_add(uc._uch, ctypes.byref(h), UC_HOOK_BLOCK,
                                ctypes.c_void_p(_block_stub()),
                                ctypes.c_void_p(ctypes.addressof(self._slot)),
                                ctypes.c_uint64(1), ctypes.c_uint64(0))
        if err:
            raise OSError(errno.ENOSYS, f"emulated KVM: unicorn block hook failed ({err})")

    def last(self) -> tuple[int, int] | None:
        """(start, size) of the last block entered since forget(), or None."""
        start, size = self._slot[0], self._slot[1] & 0xFFFF_FFFF
        return (int(start), int(size)) if self.enabled and size else None

    def forget(self) -> None:
        """RIP was moved by the emulator or userspace: the last block is not the way here."""
        self._slot[1] = 0


_scratch_uc: Any = None
_scratch_lock = threading.Lock()
_SCRATCH, _SCRATCH_SIZE = 0x10000, 4 * 4096     # a TB spans at most two pages


def insn_starts(code: bytes) -> list[int]:
    """Offsets of the instructions of straight-line 64-bit ``code`` (a translation block's
    bytes), found by letting a scratch engine decode one instruction at a time (a code hook
    sees each instruction's length before it runs; what it does in the scratch engine does
    not matter)."""
    global _scratch_uc
    from unicorn import UC_HOOK_CODE

    code = code[:_SCRATCH_SIZE - 16]
    with _scratch_lock:
        if _scratch_uc is None:
            _scratch_uc = Uc(UC_ARCH_X86, UC_MODE_64)  # type: ignore[no-untyped-call]
            _scratch_uc.mem_map(_SCRATCH, _SCRATCH_SIZE, 7)
        return _decode(_scratch_uc, code, UC_HOOK_CODE)


def _decode(uc: Any, code: bytes, hook_code: int) -> list[int]:
    uc.mem_write(_SCRATCH, code.ljust(_SCRATCH_SIZE, b"\x90"))
    uc.ctl_flush_tb()
    seen: list[int] = []
    h = uc.hook_add(hook_code, lambda _u, _a, n, _d: seen.append(n) if not seen else None)
    try:
        out: list[int] = []
        pos = 0
        while pos < len(code):
            seen.clear()
            try:
                uc.emu_start(_SCRATCH + pos, 0, 0, 1)
            except UcError:
                pass
            if not seen:
                break
            out.append(pos)
            pos += seen[0]
        return out
    finally:
        uc.hook_del(h)
