"""Building guest programs: guests/*.c + the guest library -> static ELF, cached by source hash.

A program is ``guests/<name>.c`` (or any path ending in ``.c``), linked with every file of
``guests/lib`` by ``guests/guest.ld``. Outputs live in a cache directory keyed by a hash of the
sources, the headers, the linker script, the flags and the compiler's version, so a session
builds each program once; an exclusive file lock makes concurrent builders (pytest-xdist
workers) wait for one another instead of racing.

An installed kvmpy (a wheel) carries the sources in ``sources/`` beside this file and every
program prebuilt at wheel-build time in ``prebuilt/`` (setup.py), with the hash of the sources
each was built from: a prebuilt ELF is used while the sources still hash the same, so no
compiler is needed; changed sources are rebuilt (and then need one).

Only the standard library: setup.py loads this file on its own to prebuild the guests.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

#: Flags measured to give freestanding long-mode guests (see docs/guests.md).
CFLAGS = (
    "-m64", "-O2", "-ffreestanding", "-nostdlib", "-static", "-fno-pic", "-no-pie",
    "-mno-red-zone", "-mgeneral-regs-only", "-fno-asynchronous-unwind-tables",
    "-fno-stack-protector", "-fno-omit-frame-pointer", "-Wall", "-Wextra",
    "-Werror=implicit-function-declaration", "-Wl,--build-id=none",
)

INSTALL_HINT = ("install gcc and binutils (Debian/Ubuntu: apt-get install gcc binutils; "
                "Fedora: dnf install gcc binutils), or set KVMPY_GUEST_CC to a C compiler "
                "for x86-64")


class GuestBuildError(RuntimeError):
    """A guest program could not be built (no compiler, or a compile error)."""


#: In an installed kvmpy: kvmpy/guest/<SOURCES_DIR> (a copy of guests/) and
#: kvmpy/guest/<PREBUILT_DIR>/<program>.elf with <MANIFEST> ({"programs": {name: content_key}}).
SOURCES_DIR, PREBUILT_DIR, MANIFEST = "sources", "prebuilt", "manifest.json"
_HERE = Path(__file__).resolve().parent


def guests_dir() -> Path:
    """The guest sources: $KVMPY_GUESTS_DIR, else the installed package's copy, else guests/
    of the checkout kvmpy runs from."""
    env = os.environ.get("KVMPY_GUESTS_DIR")
    if env:
        return Path(env)
    packaged = _HERE / SOURCES_DIR
    return packaged if packaged.is_dir() else _HERE.parents[1] / "guests"


def prebuilt_dir() -> Path:
    return _HERE / PREBUILT_DIR


def cache_dir() -> Path:
    """Where built guests go: $KVMPY_GUEST_CACHE, else $XDG_CACHE_HOME/kvmpy/guests."""
    env = os.environ.get("KVMPY_GUEST_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvmpy" / "guests"


def compiler() -> str:
    """The C compiler's path; raises GuestBuildError naming what to install if there is none."""
    cc = os.environ.get("KVMPY_GUEST_CC", "gcc")
    path = shutil.which(cc)
    if path is None:
        raise GuestBuildError(f"cannot build guest programs: C compiler {cc!r} not found on "
                              f"PATH; {INSTALL_HINT}")
    return path


_version_cache: dict[str, str] = {}


def compiler_version(cc: str) -> str:
    if cc not in _version_cache:
        try:
            out = subprocess.run([cc, "--version"], capture_output=True, text=True,
                                 timeout=60, check=False)
        except OSError as e:
            raise GuestBuildError(f"cannot run C compiler {cc!r}: {e}; {INSTALL_HINT}") from e
        _version_cache[cc] = out.stdout.splitlines()[0] if out.stdout else cc
    return _version_cache[cc]


def available_programs() -> list[str]:
    """The names of guests/*.c, for messages and ``python -m kvmpy.guest``."""
    return sorted(p.stem for p in guests_dir().glob("*.c"))


def resolve_source(program: str | os.PathLike[str]) -> Path:
    """``"smoke"`` -> guests/smoke.c; a path ending in .c is taken as is. Anything else (an
    unknown name, a path that is not a .c file) raises GuestBuildError naming the programs
    there are: handed to the compiler, /etc/hostname failed later about a cache file."""
    p = Path(program)
    is_path = p.suffix == ".c" or p.is_absolute() or len(p.parts) > 1
    src = p if is_path else guests_dir() / f"{program}.c"
    if is_path and p.suffix != ".c":
        problem = "it is not a .c file"
    elif not src.is_file():
        problem = f"{src} is not a file" if src.exists() else f"{src} does not exist"
    else:
        return src.resolve()
    raise GuestBuildError(f"no guest program named {str(program)!r}: {problem}; available: "
                          f"{', '.join(available_programs()) or 'none'} (in {guests_dir()}), "
                          "or the path of a .c file")


def library_sources(root: Path | None = None) -> list[Path]:
    """The guest library: every .c and .S file of guests/lib, in a stable order."""
    lib = (root or guests_dir()) / "lib"
    return sorted(p for p in lib.iterdir() if p.suffix in (".c", ".S"))


#: _inputs()'s listing of each guest root, with the identity (inode, mtime) of the directories
#: it lists: listing them again for each guest VM cost ~10 ms in a TCG VM; a file added, removed
#: or renamed there changes its directory's mtime.
_listed: dict[Path, tuple[tuple[object, ...], list[Path]]] = {}


def _dir_ids(root: Path) -> tuple[object, ...]:
    out: list[object] = []
    for d in (root, root / "lib", root / "include"):
        try:
            st = os.stat(d)
        except FileNotFoundError:
            out.append(None)
            continue
        out.append((st.st_dev, st.st_ino, st.st_mtime_ns))
    return tuple(out)


def _inputs(src: Path, root: Path) -> list[Path]:
    ids = _dir_ids(root)
    listed = _listed.get(root)
    if listed is None or listed[0] != ids:
        headers = sorted((root / "include").glob("*.h"))
        listed = _listed[root] = (ids, [root / "guest.ld", *library_sources(root), *headers])
    return [src, *listed[1]]


def guest_files(root: Path) -> list[Path]:
    """Every file a build of any program of ``root`` reads (what a wheel ships)."""
    return sorted({*root.glob("*.c"), root / "guest.ld", *library_sources(root),
                   *(root / "include").glob("*.h")})


def content_key(src: Path, root: Path) -> str:
    """A hash of every input's contents and the flags (what a prebuilt ELF records)."""
    h = hashlib.sha256()
    for p in _inputs(src, root):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(" ".join(CFLAGS).encode())
    return h.hexdigest()[:20]


def source_hash(src: Path, root: Path, cc: str) -> str:
    """The cache key: the content key and the compiler version."""
    h = hashlib.sha256(content_key(src, root).encode())
    h.update(compiler_version(cc).encode())
    return h.hexdigest()[:20]


def prebuilt(src: Path, root: Path) -> tuple[Path | None, str]:
    """The wheel's prebuilt ELF of ``src`` if it was built from these very sources, and if not,
    why not (for the error when there is no compiler either)."""
    d = prebuilt_dir()
    try:
        programs = json.loads((d / MANIFEST).read_text())["programs"]
    except (OSError, ValueError, KeyError, TypeError):
        return None, ""  # not an installed kvmpy with prebuilt guests
    elf = d / f"{src.stem}.elf"
    if src.parent != root or src.stem not in programs or not elf.is_file():
        return None, f"{src} is not one of the prebuilt programs ({d})"
    if programs[src.stem] != content_key(src, root):
        return None, (f"the sources in {root} changed since {elf} was built "
                      f"(hash {programs[src.stem]} then, {content_key(src, root)} now)")
    return elf, ""


#: build()'s answers in this process, keyed by what they depend on: each input's identity
#: (inode, size, mtime) and the prebuilt manifest's, the compiler setting and the cache directory. Hashing every input
#: again for each guest VM cost ~20 ms in a TCG VM.
_built: dict[tuple[object, ...], Path] = {}


def _memo_key(src: Path, root: Path) -> tuple[object, ...]:
    stats: list[tuple[object, ...]] = []
    for p in (*_inputs(src, root), prebuilt_dir() / MANIFEST):
        try:
            st = p.stat()
        except FileNotFoundError:
            stats.append((str(p), None))
            continue
        stats.append((str(p), st.st_ino, st.st_size, st.st_mtime_ns))
    return (tuple(stats), os.environ.get("KVMPY_GUEST_CC", "gcc"), os.environ.get("PATH"),
            str(cache_dir()))


def build(program: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Build ``program`` (cached) and return the ELF's path; the prebuilt ELF of an installed
    kvmpy when its sources are unchanged (``force``: compile anyway)."""
    src = resolve_source(program)
    root = guests_dir().resolve()
    if force:
        return _build(src, root, force)
    key = _memo_key(src, root)
    out = _built.get(key)
    if out is None or not out.is_file():
        out = _built[key] = _build(src, root, force)
    return out


def _build(src: Path, root: Path, force: bool) -> Path:
    elf, stale = prebuilt(src, root) if not force else (None, "")
    if elf is not None:
        return elf
    try:
        cc = compiler()
    except GuestBuildError as e:
        raise GuestBuildError(f"{e} ({stale})" if stale else str(e)) from None
    key = source_hash(src, root, cc)
    out_dir = cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{src.stem}-{key}.elf"
    if out.exists() and not force:
        return out
    lock_path = out_dir / f"{src.stem}-{key}.lock"
    with open(lock_path, "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if out.exists() and not force:
            return out  # another process built it while we waited
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{src.stem}-", suffix=".elf")
        os.close(fd)
        cmd = [cc, *CFLAGS, f"-I{root / 'include'}", "-T", str(root / "guest.ld"),
               # __FILE__ as guests/<file>, whatever the checkout's location.
               f"-fmacro-prefix-map={root}/=guests/",
               "-o", tmp, *map(str, library_sources(root)), str(src)]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        except OSError as e:
            os.unlink(tmp)
            raise GuestBuildError(f"cannot run {cc}: {e}; {INSTALL_HINT}") from e
        if res.returncode != 0:
            os.unlink(tmp)
            raise GuestBuildError(f"building guest {src.name} failed ({cc} exit "
                                  f"{res.returncode}):\n{res.stderr.strip()}\ncommand: "
                                  f"{' '.join(cmd)}")
        os.replace(tmp, out)  # atomic: readers see the old file or the whole new one
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m kvmpy.guest [program...]``: build the named (default: all) guests."""
    import sys

    names = (argv if argv is not None else sys.argv[1:]) or available_programs()
    for n in names:
        print(build(n))
    return 0
