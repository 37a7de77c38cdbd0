"""Exceptions raised by kvmpy."""

from __future__ import annotations

import errno as _errno
import os


class KvmError(OSError):
    """A KVM call failed: carries ``errno`` and the ioctl (or syscall) name.

    Raised by every checked call; the ``try_*`` twins return the errno instead.
    """

    def __init__(self, err: int, call: str, detail: str = "") -> None:
        self.call = call
        self.detail = detail
        name = _errno.errorcode.get(err, str(err))
        msg = f"{call} failed: {name} ({os.strerror(err)})"
        if detail:
            msg += f" [{detail}]"
        super().__init__(err, msg)

    def __str__(self) -> str:
        return str(self.strerror)


class KvmUnavailable(RuntimeError):
    """The KVM device cannot be opened (missing, or no permission)."""


class NotModelled(NotImplementedError):
    """The emulated KVM was asked for something it does not model (never a silent wrong answer)."""
