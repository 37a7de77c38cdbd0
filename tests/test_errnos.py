"""kvmpy.testing.errnos' assert helpers: expect_errno, expect_errnos, errno_of."""

from __future__ import annotations

import errno
import os

import pytest

from kvmpy.errors import Errno
from kvmpy.testing.errnos import errno_of, expect_errno, expect_errnos

EINVAL = Errno(errno.EINVAL, "KVM_X", "size=0x1")


def test_expect_errno_passes_and_names_the_call() -> None:
    expect_errno(EINVAL, errno.EINVAL)
    expect_errno(EINVAL, (errno.EEXIST, errno.EINVAL))  # one of several
    expect_errno(Errno(0, "KVM_X"), 0)  # success expected
    with pytest.raises(AssertionError, match=r"^KVM_X\(size=0x1\) -> EINVAL, expected 0 "
                                             r"\(success\) \(because\)$"):
        expect_errno(EINVAL, 0, "because")
    with pytest.raises(AssertionError, match=r"-> 0 \(success\), expected EEXIST or EINVAL$"):
        expect_errno(Errno(0, "KVM_X"), {errno.EINVAL, errno.EEXIST})
    with pytest.raises(AssertionError, match=r"^call -> ENOENT, expected EINVAL$"):
        expect_errno(errno.ENOENT, errno.EINVAL)  # a bare int: no call to name


def test_expect_errnos_lists_every_mismatch() -> None:
    expect_errnos([(EINVAL, errno.EINVAL), (Errno(0, "KVM_Y"), 0)])
    cases = [(Errno(errno.EINVAL if i % 2 else 0, "KVM_X", f"bit={i}"), errno.EINVAL)
             for i in range(50)]
    with pytest.raises(AssertionError) as e:
        expect_errnos(cases, "flags", limit=3)
    msg = str(e.value)
    assert msg.startswith("25 case(s) wrong (flags): KVM_X(bit=0) -> 0 (success), expected "
                          "EINVAL; ")
    assert "KVM_X(bit=4)" in msg and "KVM_X(bit=6)" not in msg and msg.endswith("(+22 more)")


def test_errno_of() -> None:
    r, w = os.pipe()
    try:
        ok = errno_of("write", os.write, w, b"x")
        assert ok == 0 and ok.call == "write" and ok.detail == f"{w:#x}, b'x'"
        bad = errno_of("ftruncate", os.ftruncate, r, 0, detail="a pipe")
        assert bad == errno.EINVAL and repr(bad) == "ftruncate(a pipe) -> EINVAL"
    finally:
        os.close(r)
        os.close(w)


def test_errno_of_lets_a_signal_handlers_error_through() -> None:
    def interrupted() -> None:
        raise TimeoutError  # an OSError without errno, as a SIGALRM handler raises

    with pytest.raises(TimeoutError):
        errno_of("call", interrupted)
