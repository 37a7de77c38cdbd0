"""Building guest programs: the cache keyed by source hash, the lock for concurrent builders,
and the errors a missing compiler or a broken source give."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import stat
from pathlib import Path

import pytest

from kvmpy import Kvm
from kvmpy.guest import GuestVm
from kvmpy.guest.build import GuestBuildError, build, guests_dir
from kvmpy.guest.elf import GuestImage


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("KVMPY_GUEST_CACHE", str(d))
    return d


@pytest.fixture
def counting_cc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A compiler wrapper that logs each compile (not --version) and runs gcc."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not found on PATH (needed to build guests)")
    log = tmp_path / "cc.log"
    cc = tmp_path / "cc"
    cc.write_text(f'#!/bin/sh\n[ "$1" = --version ] || echo "$$" >> {log}\nexec {gcc} "$@"\n')
    cc.chmod(cc.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("KVMPY_GUEST_CC", str(cc))
    return log


def _compiles(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_built_once_then_cached(cache: Path, counting_cc: Path) -> None:
    p1 = build("smoke")
    mtime = p1.stat().st_mtime_ns
    p2 = build("smoke")
    assert p1 == p2 and p1.parent == cache
    assert p2.stat().st_mtime_ns == mtime
    assert _compiles(counting_cc) == 1
    assert "guest_sync_stages" in GuestImage(p1).symbols


def test_source_change_changes_key(cache: Path, counting_cc: Path, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "guests"
    shutil.copytree(guests_dir(), copy)
    monkeypatch.setenv("KVMPY_GUESTS_DIR", str(copy))
    p1 = build("smoke")
    with open(copy / "lib" / "string.c", "a") as f:  # a library change counts too
        f.write("\n/* changed */\n")
    p2 = build("smoke")
    assert p1 != p2 and p1.exists() and p2.exists()
    assert _compiles(counting_cc) == 2


def _build_in_child(q: multiprocessing.Queue[str]) -> None:
    q.put(str(build("smoke")))


def test_concurrent_builders_compile_once(cache: Path, counting_cc: Path) -> None:
    """Two processes (as pytest-xdist workers) asking for the same guest: one compiles, the
    other waits on the lock and reuses the result."""
    ctx = multiprocessing.get_context("fork")
    q: multiprocessing.Queue[str] = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(q,)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    paths = {q.get(timeout=5), q.get(timeout=5)}
    assert len(paths) == 1
    assert _compiles(counting_cc) == 1
    assert [f for f in os.listdir(cache) if f.endswith(".elf")] == [Path(paths.pop()).name]


def test_missing_compiler_names_what_to_install(cache: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVMPY_GUEST_CC", "no-such-cc-kvmpy")
    with pytest.raises(GuestBuildError, match=r"'no-such-cc-kvmpy' not found.*install gcc and "
                                              r"binutils \(Debian/Ubuntu: apt-get install gcc"):
        build("smoke")


def test_compile_error_shows_compiler_output(cache: Path, tmp_path: Path) -> None:
    src = tmp_path / "broken.c"
    src.write_text('#include "kvmpy_guest.h"\nvoid guest_broken(void) { undefined_fn(); }\n')
    with pytest.raises(GuestBuildError, match=r"(?s)building guest broken.c failed.*undefined_fn"):
        build(src)
    assert not [f for f in os.listdir(cache) if f.endswith(".elf")]


def test_unknown_program(cache: Path) -> None:
    with pytest.raises(GuestBuildError, match=r"no_such_prog.c does not exist"):
        build("no_such_prog")


def test_program_outside_guests_dir(cache: Path, tmp_path: Path) -> None:
    """A test can keep its guest next to it: any .c path builds with the guest library."""
    src = tmp_path / "mine.c"
    src.write_text('#include "kvmpy_guest.h"\nu64 guest_mine(u64 x) { return x * 3; }\n')
    img = GuestImage(build(src))
    assert "guest_mine" in img.symbols and "guest_idt_stubs" in img.symbols


@pytest.mark.parametrize("program", ["/etc/hostname", "no_such_prog", "guests/smoke",
                                     "missing/dir/prog.c"])
def test_not_a_guest_program_lists_the_available_ones(cache: Path, program: str) -> None:
    """A path that is not a .c file, or a name with no guests/<name>.c, is refused up front:
    /etc/hostname used to reach the compiler and fail with a FileNotFoundError about a cache
    file."""
    with pytest.raises(GuestBuildError) as ei:
        build(program)
    msg = str(ei.value)
    assert msg.startswith(f"no guest program named {program!r}: "), msg
    assert "; available: " in msg and "smoke" in msg.split("; available: ")[1], msg
    assert not cache.exists() or not list(cache.iterdir())


def test_guestvm_names_the_available_programs(kvm: Kvm) -> None:
    with pytest.raises(GuestBuildError, match=r"no guest program named '/etc/hostname': it is "
                                              r"not a \.c file; available: .*smoke"):
        GuestVm(kvm, "/etc/hostname")


def test_build_and_load_are_remembered_until_an_input_changes(cache: Path, tmp_path: Path) -> None:
    """build() answers from memory while every input's inode, size and mtime are the same, and
    GuestImage.load() parses a file once while it is unchanged; either redoes the work after a
    change (a guest VM per test reads the same ELFs: pyelftools costs ~0.3 s a parse under TCG)."""
    src = tmp_path / "memo.c"
    src.write_text('#include "kvmpy_guest.h"\nu64 guest_memo(u64 x) { return x + 1; }\n')
    elf = build(src)
    assert build(src) == elf
    img = GuestImage.load(elf)
    assert GuestImage.load(elf) is img and "guest_memo" in img.symbols
    src.write_text('#include "kvmpy_guest.h"\nu64 guest_memo2(u64 x) { return x + 2; }\n')
    elf2 = build(src)
    assert elf2 != elf
    img2 = GuestImage.load(elf2)
    assert img2 is not img and "guest_memo2" in img2.symbols
    st = elf2.stat()
    os.utime(elf2, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # same path, touched
    assert GuestImage.load(elf2) is not img2


def test_a_header_added_to_the_guest_library_is_an_input(cache: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """build() keeps its listing of guests/lib and guests/include only while those directories
    are unchanged: a header added there is one more input (a new ELF), not a stale answer."""
    root = tmp_path / "guests"
    shutil.copytree(guests_dir(), root)
    monkeypatch.setenv("KVMPY_GUESTS_DIR", str(root))
    elf = build("smoke")
    assert build("smoke") == elf
    (root / "include" / "zz_extra.h").write_text("/* a new header */\n")
    assert build("smoke") != elf
