"""ucall decoding and the errors the run loop raises (a vCPU only for the malformed-ucall run)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kvmpy import Kvm
from kvmpy.guest import GuestVm
from kvmpy.guest.build import guests_dir
from kvmpy.guest.ucall import (
    OFF_BUFFER,
    UCALL_SIZE,
    GuestAssertionError,
    GuestError,
    GuestException,
    MalformedUcall,
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


def test_decode_too_many_args_keeps_file_and_line() -> None:
    """nargs > UCALL_MAX_ARGS is a MalformedUcall (still a ValueError) carrying the struct's
    file:line, so the run loop can say which guest code sent it."""
    raw = bytearray(encode_ucall(Ucall(UcallCmd.SYNC, (), "guests/x.c", 12)))
    raw[8] = 9
    with pytest.raises(MalformedUcall, match=r"nargs 9 > 7") as ei:
        decode_ucall(bytes(raw))
    assert isinstance(ei.value, ValueError) and ei.value.source == "guests/x.c:12"


BAD_UCALL_GUEST = r"""
#include "kvmpy_guest.h"

static void send(struct ucall *uc)
{
	__asm__ volatile("in %%dx, %%al" : : "D"(uc), "d"((u16)UCALL_PIO_PORT) : "rax", "memory");
}

/* A hand-made struct ucall with 8 args: what a guest bypassing ucall_send can produce. */
void guest_too_many_args(u64 with_file)
{
	struct ucall uc;
	const char *f = __FILE__;
	u64 i;

	uc.cmd = UCALL_SYNC;
	uc.nargs = UCALL_MAX_ARGS + 1;
	uc.line = __LINE__;
	for (i = 0; with_file && f[i] && i < UCALL_FILE_LEN - 1; i++)
		uc.file[i] = f[i];
	uc.file[with_file ? i : 0] = 0;
	send(&uc);
	GUEST_DONE();
}
"""


@pytest.mark.parametrize("with_file", [1, 0], ids=["file", "nofile"])
def test_run_names_vcpu_rip_and_source_of_bad_ucall(kvm: Kvm, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    with_file: int) -> None:
    """g.run() on a ucall with more than UCALL_MAX_ARGS args: not a bare ValueError but a
    GuestError naming the vCPU, the RIP (symbolized) and, when the struct has it, file:line."""
    monkeypatch.setenv("KVMPY_GUEST_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "bad_ucall.c"
    src.write_text(BAD_UCALL_GUEST)
    line = next(i + 1 for i, t in enumerate(BAD_UCALL_GUEST.splitlines())
                if "uc.line = __LINE__" in t)
    with GuestVm(kvm, src, timeout=20.0) as g:
        vcpu = g.vcpu("guest_too_many_args", with_file)
        with pytest.raises(GuestError) as ei:
            g.run(vcpu)
    msg = str(ei.value)
    assert isinstance(ei.value, MalformedUcall), msg
    assert re.search(r"vCPU 0 \(bad_ucall:guest_too_many_args\) at RIP 0x[0-9a-f]+ "
                     r"\((send|guest_too_many_args)\+0x[0-9a-f]+\)", msg), msg
    assert "nargs 8 > 7" in msg
    if with_file:
        assert f"sent from {src}:{line}" in msg
    else:
        assert "sent from" not in msg
