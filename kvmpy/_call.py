"""Checked and errno-returning ioctl calls shared by the object modules."""

from __future__ import annotations

from .backend import Backend, IoctlArg
from .errors import KvmError
from .uapi.ioctls import Ioctl


def checked_ioctl(backend: Backend, fd: int, request: Ioctl, arg: IoctlArg = None,
                  detail: str = "") -> int:
    """Issue ``request``; on failure raise KvmError naming the ioctl and ``detail``."""
    try:
        return backend.ioctl(fd, request, arg)
    except OSError as e:
        raise KvmError(e.errno or 0, request.name, detail or _describe(arg)) from None


def errno_ioctl(backend: Backend, fd: int, request: Ioctl, arg: IoctlArg = None) -> tuple[int, int]:
    """Issue ``request``; return (errno, result) with errno 0 on success."""
    try:
        return 0, backend.ioctl(fd, request, arg)
    except OSError as e:
        return e.errno or 0, -1


def _describe(arg: IoctlArg) -> str:
    if arg is None:
        return ""
    if isinstance(arg, int):
        return f"arg={arg:#x}"
    return repr(arg)
