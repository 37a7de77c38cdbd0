"""The wheel carries the suite: built from the sdist, installed into a fresh venv, `kvmpy run`
from another directory runs kvmpy.selftests with the prebuilt guests (no compiler); and the
prebuilt-guest rules of kvmpy.guest.build (used while the sources hash the same)."""

from __future__ import annotations

import configparser
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from kvmpy.guest.build import GuestBuildError, build, content_key, guests_dir

build_mod = importlib.import_module("kvmpy.guest.build")  # kvmpy.guest.build is the function
REPO = Path(__file__).resolve().parent.parent


def test_suite_ini_matches_pyproject() -> None:
    """The installed suite's pytest settings are pyproject.toml's (minus testpaths)."""
    want = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    ini = configparser.ConfigParser()
    ini.read(REPO / "kvmpy" / "testing" / "suite.ini")
    got = dict(ini["pytest"])
    assert got.pop("addopts") == want["addopts"]
    assert got.pop("markers").strip().splitlines() == want["markers"]
    assert int(got.pop("timeout")) == want["timeout"]
    assert ini["pytest"].getboolean("xfail_strict") is want["xfail_strict"]
    got.pop("xfail_strict")
    assert not got, f"suite.ini has settings pyproject.toml does not: {got}"
    assert set(want) - {"addopts", "markers", "timeout", "xfail_strict"} == {"testpaths"}


# -- prebuilt guests ---------------------------------------------------------------------------

@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An installed layout: a copy of guests/ and a prebuilt dir whose manifest records it."""
    src = tmp_path / "sources"
    shutil.copytree(guests_dir(), src)
    pre = tmp_path / "prebuilt"
    pre.mkdir()
    fake_elf = pre / "smoke.elf"
    fake_elf.write_bytes(b"\x7fELF prebuilt")
    (pre / "manifest.json").write_text(json.dumps(
        {"programs": {"smoke": content_key(src / "smoke.c", src.resolve())}}))
    monkeypatch.setenv("KVMPY_GUESTS_DIR", str(src))
    monkeypatch.setenv("KVMPY_GUEST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(build_mod, "prebuilt_dir", lambda: pre)
    return src


def test_prebuilt_used_without_a_compiler(installed: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVMPY_GUEST_CC", "no-such-cc")
    assert build("smoke").read_bytes() == b"\x7fELF prebuilt"
    with pytest.raises(GuestBuildError, match="no-such-cc"):  # not prebuilt: needs a compiler
        build("model_access")


def test_changed_sources_are_rebuilt(installed: Path) -> None:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not found on PATH (needed to rebuild changed guests)")
    with open(installed / "lib" / "string.c", "a") as f:
        f.write("\n/* changed */\n")
    out = build("smoke")
    assert out.parent.name == "cache" and out.read_bytes()[:4] == b"\x7fELF"
    assert out.read_bytes() != b"\x7fELF prebuilt"


def test_changed_sources_without_a_compiler_say_why(installed: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVMPY_GUEST_CC", "no-such-cc")
    (installed / "smoke.c").write_text((installed / "smoke.c").read_text() + "\n")
    with pytest.raises(GuestBuildError, match=r"no-such-cc.*changed since .*smoke\.elf"):
        build("smoke")


# -- the real thing: sdist -> wheel -> fresh venv -> kvmpy run elsewhere ------------------------

def _copy_tree(dst: Path) -> Path:
    """The repository's files (tracked and new, not ignored), so the build never writes into
    the checkout and sees what a clone would."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, files):
        f = REPO / name.decode()
        if f.is_file():
            (dst / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dst / name.decode())
    return dst


@pytest.mark.slow
def test_wheel_runs_the_suite_from_anywhere(tmp_path: Path) -> None:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs the git checkout (git ls-files) to copy the sources")
    src = _copy_tree(tmp_path / "src")
    dist = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist), str(src)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (wheel,) = dist.glob("kvmpy-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    programs = sorted(p.stem for p in (REPO / "guests").glob("*.c"))
    for want in ["kvmpy/selftests/__init__.py", "kvmpy/selftests/conftest.py",
                 "kvmpy/selftests/test_guest_smoke.py", "kvmpy/testing/suite.ini",
                 "kvmpy/guest/sources/guest.ld", "kvmpy/guest/prebuilt/manifest.json",
                 *(f"kvmpy/guest/prebuilt/{p}.elf" for p in programs),
                 *(f"kvmpy/guest/sources/{p}.c" for p in programs)]:
        assert want in names, want

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KVMPY_", "PYTEST_", "VIRTUAL_ENV", "PYTHON"))}
    # No compiler and an empty cache: the guests must come from the wheel.
    env.update(PATH="/usr/bin:/bin", KVMPY_GUEST_CC="/nonexistent/cc",
               KVMPY_GUEST_CACHE=str(tmp_path / "empty-cache"), HOME=str(tmp_path))
    r = subprocess.run([str(venv / "bin" / "kvmpy"), "run", "--backend", "emu", "-n", "2",
                        "-k", "smoke", "--ktap", "k.txt"], cwd=elsewhere, env=env, capture_output=True, text=True,
                       timeout=600)
    out = r.stdout + r.stderr
    m = re.search(r"^kvmpy: (\d+) passed, (\d+) failed, (\d+) skipped$", out, re.M)
    assert r.returncode == 0 and m and int(m.group(1)) > 0 and m.group(2) == "0", out[-5000:]
    # Test ids as in a checkout (known_issues.py and --deselect match them).
    assert re.search(r"^ok 1 selftests/test_\w+\.py::", (elsewhere / "k.txt").read_text(), re.M)
    assert not list((tmp_path / "empty-cache").glob("*.elf")), "a guest was compiled"
