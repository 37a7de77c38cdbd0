"""ucall decoding and the errors the run loop raises (no vCPU needed)."""

from __future__ import annotations

import re

import pytest

from kvmpy.guest.build import guests_dir
from kvmpy.guest.ucall import (
    OFF_BUFFER,
    UCALL_SIZE,
    GuestAssertionError,
    GuestException,
    Ucall,
    UcallCmd,
    decode_ucall,
    encode_ucall,
)


def test_layout_matches_guest_header() -> None:
    """The offsets in ucall.py are the ones the C header documents."""
    header = (guests_dir() / "include" / "kvmpy_guest.h").read_text()
    body = header[header.index("struct ucall {"):]
    body = body[:body.index("};")]
    offsets = [int(m) for m in re.findall(r"/\* (\d+) \*/", body)]
    assert offsets == [0, 8, 16, 72, 80, 208, OFF_BUFFER]
    assert "(976 bytes)" in header and UCALL_SIZE == 976


def test_round_trip() -> None:
    uc = Ucall(UcallCmd.ABORT, (1, 2**64 - 1), "guests/x.c", 42, "a == b", "msg", 0)
    assert decode_ucall(encode_ucall(uc)) == uc


def test_decode_zero_args_and_unknown_cmd() -> None:
    raw = bytearray(UCALL_SIZE)
    raw[0] = 99
    uc = decode_ucall(bytes(raw), vcpu_id=3)
    assert (uc.cmd, uc.args, uc.file, uc.vcpu_id) == (99, (), "", 3)


def test_decode_rejects_garbage() -> None:
    raw = bytearray(UCALL_SIZE)
    raw[8] = 8  # nargs > UCALL_MAX_ARGS
    with pytest.raises(ValueError, match="nargs 8"):
        decode_ucall(bytes(raw))
    with pytest.raises(ValueError, match="976 bytes"):
        decode_ucall(b"\0" * 100)


def test_strings_stop_at_nul_and_field_end() -> None:
    uc = Ucall(UcallCmd.PRINTF, (), "f" * 500, 0, "", "hello")
    back = decode_ucall(encode_ucall(uc))
    assert back.file == "f" * 127 and back.buffer == "hello"


def test_assertion_error_message() -> None:
    uc = Ucall(UcallCmd.ABORT, (7, 9), "guests/smoke.c", 22, "a == b", "")
    with pytest.raises(AssertionError) as ei:
        raise GuestAssertionError(uc, "vCPU 0 (smoke:f)")
    shown = ei.exconly()
    assert "guests/smoke.c:22: guest assertion failed: a == b (0x7 vs 0x9, i.e. 7 vs 9)" in shown
    assert shown.endswith("[vCPU 0 (smoke:f)]")


def test_unhandled_exception_fields() -> None:
    uc = Ucall(UcallCmd.UNHANDLED, (14, 2, 0x401000, 0xdead000, 0x7000))
    e = GuestException(uc, "0x401000 (f+0x0)")
    assert (e.vector, e.error_code, e.rip, e.cr2, e.rsp) == (14, 2, 0x401000, 0xdead000, 0x7000)
    assert "#PF (vector 14) at RIP 0x401000 (f+0x0), error code 0x2, CR2 0xdead000" in str(e)
    ud = GuestException(Ucall(UcallCmd.UNHANDLED, (6, 0, 5)), "0x5")
    assert "CR2" not in str(ud) and "#UD" in str(ud)
