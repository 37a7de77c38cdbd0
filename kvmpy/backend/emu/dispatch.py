"""The emulator's ioctl tables: ``{request: Entry(argtype, handler)}`` per kind of fd, and the one
decoder they share.

An entry's ``argtype`` says what the handler gets, decided by the request number itself
(include/uapi/asm-generic/ioctl.h: _IOC_DIR, _IOC_SIZE), as the kernel's ioctl handlers
copy_from_user/copy_to_user ``sizeof(struct)`` bytes:

- a ctypes struct: _IOC_SIZE bytes are copied in when the direction has _IOC_WRITE (else the
  handler gets a zeroed struct), and copied back when it has _IOC_READ and the handler
  returned (always, for ``copy_back_on_error`` entries);
- ``int``: the argument is a value, not a pointer (_IO ioctls);
- ``Ptr``: a variable-size argument (a header and a flexible array); the handler copies itself;
- ``Out``: an _IOR struct the handler returns as its _IOC_SIZE bytes, copied out as they are
  (no struct is built and copied twice: KVM_GET_REGS runs on every ucall).

``built_in`` models an ioctl compiled out of the modelled kernel (its case missing from the
switch): the request then takes the fd's default path before anything is read. A request
missing from a table takes the fd's default path too (see backend.py and vcpu.py).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any, NamedTuple

IOC_WRITE, IOC_READ = 1, 2      # userspace writes (kernel copies in) / reads (copied back)


def ioc_dir(request: int) -> int:
    return (request >> 30) & 3


def ioc_size(request: int) -> int:
    return (request >> 16) & 0x3FFF


class Ptr:
    """Argument type marker: the handler gets the user pointer (variable-size argument)."""


class Out:
    """Argument type marker: the handler takes no argument and returns the bytes to copy out."""


class Entry(NamedTuple):
    argtype: type
    handler: Callable[..., Any]     # int | None; bytes for Out entries
    built_in: Callable[[Any], bool] | None = None
    copy_back_on_error: bool = False


Table = dict[int, Entry]
CopyIn = Callable[[int, int], bytes]
CopyOut = Callable[[int, bytes], None]


def check_table(table: Table) -> Table:
    """Every struct argument has the size the request number encodes (at import time)."""
    for request, e in table.items():
        if e.argtype is Out:
            assert ioc_dir(request) == IOC_READ, hex(request)
        elif e.argtype not in (int, Ptr):
            assert ctypes.sizeof(e.argtype) == ioc_size(request), (hex(request), e.argtype)
    return table


def call(e: Entry, request: int, arg: int, cin: CopyIn, cout: CopyOut, *objs: Any) -> int:
    """Decode ``arg`` for entry ``e``, run ``e.handler(*objs, decoded)``, copy back."""
    r: int
    if e.argtype is int or e.argtype is Ptr:
        r = e.handler(*objs, arg) or 0
        return r
    if e.argtype is Out:
        data = e.handler(*objs)
        assert isinstance(data, bytes) and len(data) == ioc_size(request)
        cout(arg, data)
        return 0
    size = ioc_size(request)
    direction = ioc_dir(request)
    s = (e.argtype.from_buffer_copy(cin(arg, size)) if direction & IOC_WRITE  # type: ignore[attr-defined]
         else e.argtype())
    if not direction & IOC_READ:
        r = e.handler(*objs, s) or 0
        return r
    ok = False
    try:
        r = e.handler(*objs, s) or 0
        ok = True
    finally:
        if ok or e.copy_back_on_error:
            cout(arg, bytes(s))
    return r
