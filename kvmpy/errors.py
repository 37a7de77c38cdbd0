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


class Errno(int):
    """What a ``try_*`` call returns: the errno (0 on success), an int that compares equal to
    ``errno.EINVAL`` and friends, carrying the call and its arguments for messages."""

    call: str
    _detail: object

    def __new__(cls, err: int, call: str = "", detail: object = "") -> Errno:
        self = int.__new__(cls, err)
        self.call = call
        self._detail = detail  # a str, or a callable made into one only for a message
        return self

    @property
    def detail(self) -> str:
        d = self._detail
        return d() if callable(d) else str(d)

    @property
    def name(self) -> str:
        return _errno.errorcode.get(int(self), str(int(self))) if self else "0 (success)"

    def __repr__(self) -> str:
        return f"{self.call}({self.detail}) -> {self.name}"


class ClosedError(KvmError):
    """A call on a closed (or closing) Kvm, Vm, Vcpu, GuestMemfd or mapping.

    errno is EBADF, as the kernel would say for a closed fd; ``what`` names the object.
    """

    def __init__(self, what: str, call: str, detail: str = "") -> None:
        self.what = what
        super().__init__(_errno.EBADF, call, f"{what} is closed" + (f"; {detail}" if detail else ""))


class KvmUnavailable(RuntimeError):
    """The KVM device cannot be opened (missing, or no permission)."""


class NotModelled(NotImplementedError):
    """The emulated KVM was asked for something it does not model (never a silent wrong answer)."""
