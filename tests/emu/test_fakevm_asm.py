"""fakevm.asm(): assembled once, then read from the on-disk cache (a VM run reads what the host
assembled instead of running as/ld under TCG)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmpy.backend.emu.x86 import fakevm


def test_asm_is_cached_on_disk_by_source_and_base(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVMPY_GUEST_CACHE", str(tmp_path))
    monkeypatch.setattr(fakevm, "_ASM_MEMO", {})
    code = fakevm.asm("mov eax, 1\nhlt", 0x1000)
    assert code == bytes([0xB8, 1, 0, 0, 0, 0xF4])
    assert len(list((tmp_path / "asm").glob("*.bin"))) == 1
    # Another process (a fresh memo) with no assembler: the disk cache answers...
    monkeypatch.setattr(fakevm, "_ASM_MEMO", {})

    def no_as(src: str, base: int) -> bytes:
        raise AssertionError(f"assembled {src!r} at {base:#x} again")

    monkeypatch.setattr(fakevm, "_assemble", no_as)
    assert fakevm.asm("mov eax, 1\nhlt", 0x1000) == code
    # ...but only for the same source and base.
    with pytest.raises(AssertionError, match="again"):
        fakevm.asm("mov eax, 1\nhlt", 0x2000)
    with pytest.raises(AssertionError, match="again"):
        fakevm.asm("mov eax, 2\nhlt", 0x1000)


def test_asm_without_a_writable_cache_still_assembles(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("KVMPY_GUEST_CACHE", str(blocker))
    monkeypatch.setattr(fakevm, "_ASM_MEMO", {})
    assert fakevm.asm("nop", 0) == b"\x90"
