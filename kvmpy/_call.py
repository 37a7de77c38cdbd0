"""Checked and errno-returning ioctl calls shared by the object modules.

Arguments are checked here, once, before any syscall: an integer argument must fit the
unsigned long the kernel receives, and a struct is built by :func:`pack`, whose fields refuse
values their uapi width cannot hold (kvmpy.uapi.structs), so nothing is truncated silently.
"""

from __future__ import annotations

from typing import Any, TypeVar

from .backend import Backend, IoctlArg
from .errors import Errno, KvmError
from .uapi.ioctls import Ioctl
from .uapi.structs import KvmStruct, build_struct, check_int

S = TypeVar("S", bound=KvmStruct)

_U64 = 1 << 64


def int_arg(request: Ioctl | str, name: str, value: object, lo: int = -(1 << 63),
            hi: int = _U64 - 1) -> int:
    """``value`` as the integer an ioctl or syscall receives; TypeError/OverflowError naming the
    call and argument otherwise. The default range is a 64-bit register (signed or unsigned)."""
    call = request._name_ if isinstance(request, Ioctl) else request
    return check_int(f"{call}: {name}", value, lo, hi)


def pack(request: Ioctl, cls: type[S], **fields: Any) -> S:
    """Build the uapi struct for ``request``; a field that does not fit names the ioctl."""
    try:
        return build_struct(cls, fields)
    except (OverflowError, TypeError, ValueError) as e:
        raise type(e)(f"{request._name_}: {e}") from None


def checked_ioctl(backend: Backend, fd: int, request: Ioctl, arg: IoctlArg = None,
                  detail: str = "") -> int:
    """Issue ``request``; on failure raise KvmError naming the ioctl and ``detail``."""
    if isinstance(arg, int):
        int_arg(request, "arg", arg)
    ret, err = backend.ioctl_errno(fd, request, arg)
    if err:
        raise KvmError(err, request._name_, detail or _describe(arg))
    return ret


def errno_ioctl(backend: Backend, fd: int, request: Ioctl, arg: IoctlArg = None,
                detail: str = "") -> tuple[Errno, int]:
    """Issue ``request``; return (errno, result) with errno 0 on success. The errno is an
    :class:`Errno` naming the call, for one-line negative tests (expect_errno); its detail
    (the arguments) is formatted only when a message needs it."""
    if isinstance(arg, int):
        int_arg(request, "arg", arg)
    ret, err = backend.ioctl_errno(fd, request, arg)
    return Errno(err, request._name_, detail or (lambda: _describe(arg))), ret


def _describe(arg: IoctlArg) -> str:
    if arg is None:
        return ""
    if isinstance(arg, int):
        return f"arg={arg:#x}"
    r = repr(arg)
    return r[r.index("(") + 1:-1] if "(" in r and r.endswith(")") else r
