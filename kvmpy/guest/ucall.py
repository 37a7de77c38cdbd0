"""ucall: decoding the guest's messages (guests/include/kvmpy_guest.h, struct ucall).

The guest executes ``in al, dx`` on port 0x1000 (the selftests' UCALL_PIO_PORT) with RDI holding
the guest-physical address of a ``struct ucall``; the host reads the struct from guest memory
(the C selftests pass a guest virtual address and translate it: lib/x86/ucall.c).
"""

from __future__ import annotations

import dataclasses
import enum
import struct

from ..vcpu import Exit
from .x86 import vector_name

UCALL_MAX_ARGS = 7
# struct ucall layout; keep in sync with kvmpy_guest.h.
OFF_CMD = 0
OFF_NARGS = 8
OFF_ARGS = 16
OFF_LINE = 72
OFF_FILE, LEN_FILE = 80, 128
OFF_EXPR, LEN_EXPR = 208, 256
OFF_BUFFER, LEN_BUFFER = 464, 512
UCALL_SIZE = 976


class UcallCmd(enum.IntEnum):
    NONE = 0
    SYNC = 1
    ABORT = 2
    PRINTF = 3
    DONE = 4
    UNHANDLED = 5


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


@dataclasses.dataclass(frozen=True)
class Ucall:
    """One decoded ucall. For SYNC, ``args[0]`` is the stage; DONE carries the guest function's
    return value in ``args[0]`` when it returned instead of calling GUEST_DONE()."""

    cmd: UcallCmd | int
    args: tuple[int, ...] = ()
    file: str = ""
    line: int = 0
    expr: str = ""
    buffer: str = ""
    vcpu_id: int = 0

    @property
    def stage(self) -> int | None:
        return self.args[0] if self.args else None

    def __str__(self) -> str:
        name = self.cmd.name if isinstance(self.cmd, UcallCmd) else str(self.cmd)
        parts = [f"UCALL_{name}"]
        if self.args:
            parts.append("(" + ", ".join(hex(a) for a in self.args) + ")")
        if self.file:
            parts.append(f"at {self.file}:{self.line}")
        if self.buffer:
            parts.append(repr(self.buffer))
        return " ".join(parts)


def decode_ucall(raw: bytes, vcpu_id: int = 0) -> Ucall:
    """Decode a ``struct ucall`` (UCALL_SIZE bytes) read from guest memory."""
    if len(raw) < UCALL_SIZE:
        raise ValueError(f"ucall struct needs {UCALL_SIZE} bytes, got {len(raw)}")
    cmd, nargs = struct.unpack_from("<QQ", raw, OFF_CMD)
    (line,) = struct.unpack_from("<Q", raw, OFF_LINE)
    if nargs > UCALL_MAX_ARGS:
        # file/line are at fixed offsets: if the guest filled them they say who sent it.
        raise MalformedUcall(f"ucall nargs {nargs} > {UCALL_MAX_ARGS} (UCALL_MAX_ARGS): not "
                             "a struct ucall", _cstr(raw[OFF_FILE:OFF_FILE + LEN_FILE]),
                             int(line))
    args = struct.unpack_from(f"<{nargs}Q", raw, OFF_ARGS)
    try:
        c: UcallCmd | int = UcallCmd(cmd)
    except ValueError:
        c = int(cmd)
    return Ucall(c, tuple(int(a) for a in args),
                 _cstr(raw[OFF_FILE:OFF_FILE + LEN_FILE]), int(line),
                 _cstr(raw[OFF_EXPR:OFF_EXPR + LEN_EXPR]),
                 _cstr(raw[OFF_BUFFER:OFF_BUFFER + LEN_BUFFER]), vcpu_id)


def encode_ucall(uc: Ucall) -> bytes:
    """The inverse of :func:`decode_ucall` (for tests and the emulator's unit checks)."""
    buf = bytearray(UCALL_SIZE)
    struct.pack_into("<QQ", buf, OFF_CMD, int(uc.cmd), len(uc.args))
    struct.pack_into(f"<{len(uc.args)}Q", buf, OFF_ARGS, *uc.args)
    struct.pack_into("<Q", buf, OFF_LINE, uc.line)
    for off, ln, s in ((OFF_FILE, LEN_FILE, uc.file), (OFF_EXPR, LEN_EXPR, uc.expr),
                       (OFF_BUFFER, LEN_BUFFER, uc.buffer)):
        b = s.encode()[:ln - 1]
        buf[off:off + len(b)] = b
    return bytes(buf)


# --- errors ----------------------------------------------------------------------------
class GuestError(Exception):
    """Base of the errors the run loop raises about a guest."""


class MalformedUcall(GuestError, ValueError):
    """A ucall exit whose struct ucall cannot be decoded (e.g. nargs > UCALL_MAX_ARGS). The
    run loop's message names the vCPU, its RIP and the guest file:line when the struct has one.
    A ValueError too, as decode_ucall raised before."""

    def __init__(self, msg: str, file: str = "", line: int = 0) -> None:
        self.file = file
        self.line = line
        super().__init__(msg)

    @property
    def source(self) -> str:
        """'guests/smoke.c:12', or '' when the guest left file/line empty."""
        return f"{self.file}:{self.line}" if self.file else ""


class GuestAssertionError(GuestError, AssertionError):
    """UCALL_ABORT: a GUEST_ASSERT failed. The message names the guest's file:line, the
    expression and the values, so the pytest failure shows them."""

    def __init__(self, uc: Ucall, where: str = "") -> None:
        self.ucall = uc
        self.file = uc.file
        self.line = uc.line
        self.expr = uc.expr
        self.values = uc.args
        msg = f"{uc.file}:{uc.line}: guest assertion failed: {uc.expr}"
        if len(uc.args) == 2:
            msg += f" ({uc.args[0]:#x} vs {uc.args[1]:#x}, i.e. {uc.args[0]} vs {uc.args[1]})"
        elif uc.args:
            msg += " values " + ", ".join(hex(a) for a in uc.args)
        if uc.buffer:
            msg += f": {uc.buffer}"
        if where:
            msg += f" [{where}]"
        super().__init__(msg)


class GuestException(GuestError):
    """UCALL_UNHANDLED: the guest took an exception no handler claimed."""

    def __init__(self, uc: Ucall, rip_str: str, where: str = "") -> None:
        a = list(uc.args) + [0] * (5 - len(uc.args))
        self.ucall = uc
        self.vector, self.error_code, self.rip, self.cr2, self.rsp = a[:5]
        msg = (f"unhandled guest exception {vector_name(self.vector)} (vector {self.vector}) "
               f"at RIP {rip_str}, error code {self.error_code:#x}")
        if self.vector == 14:
            msg += f", CR2 {self.cr2:#x}"
        if where:
            msg += f" [{where}]"
        super().__init__(msg)


class GuestTimeout(GuestError):
    """The guest did not exit within its budget; the watchdog stopped it."""

    def __init__(self, msg: str, rip: int, last_exit: Exit | None) -> None:
        self.rip = rip
        self.last_exit = last_exit
        super().__init__(msg)


class UnexpectedExit(GuestError):
    """KVM_RUN returned an exit that is not a ucall where a ucall was expected."""

    def __init__(self, exit: Exit, msg: str) -> None:
        self.exit = exit
        super().__init__(msg)


class UnexpectedUcall(GuestError, AssertionError):
    """A ucall other than the one the test expected (expect_sync/expect_done)."""

    def __init__(self, uc: Ucall, msg: str) -> None:
        self.ucall = uc
        super().__init__(msg)


__all__ = [
    "UCALL_SIZE",
    "GuestAssertionError",
    "GuestError",
    "GuestException",
    "GuestTimeout",
    "MalformedUcall",
    "Ucall",
    "UcallCmd",
    "UnexpectedExit",
    "UnexpectedUcall",
    "decode_ucall",
    "encode_ucall",
]
