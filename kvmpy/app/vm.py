"""``kvmpy vm``: run the kvmpy suite inside a QEMU VM booted on a kernel under test.

    kvmpy vm --kernel PATH [options] [--exec CMD | [--] [kvmpy run / pytest args...]]

(``ci/vm-run`` is this, for CI and ci/kernel-mutants, with the checkout's .venv.)

The guest is this machine's own root filesystem, shared read-only over virtio-9p: no disk image
to build, the same Python and the same paths. A tiny busybox initramfs mounts it, puts a tmpfs
on /tmp (TMPDIR, HOME), a writable 9p share for the results, then runs `kvmpy run --junit ...
--ktap ...` with the given arguments (or --exec's shell command), prints its exit status on the
console and powers off. From a checkout (ci/vm-run, or an editable install), the guest runs the
checkout's suite in the checkout, under an overlay (so it can build guests/ and write caches
without touching the host's tree); from an installed kvmpy, the installed package's suite
(kvmpy.selftests) with the same interpreter, in /tmp. Why plain QEMU rather than virtme-ng: see
docs/running.md ("QEMU VMs").

Acceleration: nested KVM (-accel kvm -cpu host) when /dev/kvm opens here and the loaded
kvm_intel/kvm_amd module has nested=Y; otherwise TCG with -cpu max (SVM with NPT, so the
guest's kvm_amd provides /dev/kvm) and thread=single (multi-threaded TCG oopsed 6.12 guests
during boot-time text patching, see shared kernel README).

Outcomes (exit status):
  0/1/4/5   the guest's `kvmpy run` exit: pass / fail / all skipped / no tests
            (--exec: the command's exit status)
  2         usage error, or QEMU/busybox missing (one line naming the Debian packages)
  3         the VM failed: boot failure, guest kernel panic/oops that killed the run, QEMU error
  124       timed out (the whole VM on the host side, or the suite inside the guest)
--bisect maps them for `git bisect run`: 0 good; 125 (skip this commit) when the kernel cannot
be tested: not a bzImage, it did not boot (no init, panic or timeout before init), or every
test skipped / none collected; 1 (bad) for any failure after boot; 128 (abort the bisection)
for a usage error.

Results (in --results, default results/vm): junit.xml, ktap.txt (written in the guest),
console.log (the serial console), vm-run.json (kernel, its sha256, the guest's uname -r,
accelerator, backends, times, status). Needs: qemu-system-x86, a static busybox.
Only the standard library (ci/vm-run loads this file on its own, before and outside any venv).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import selectors
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MARK = "KVMPY-VM:"
EXIT_USAGE, EXIT_VM, EXIT_TIMEOUT = 2, 3, 124
BISECT_SKIP, BISECT_BAD, BISECT_ABORT = 125, 1, 128
DEBIAN_PACKAGES = "qemu-system-x86 busybox-static"

#: The name in messages: "vm-run" (ci/vm-run) or "kvmpy vm"; set by main().
PROG = "kvmpy vm"

# Modules a modular kernel (Debian's) needs before the host root can be mounted and KVM used;
# a kernel built from ci/kernel.config has all of them built in.
WANTED_MODULES = ["virtio_pci", "9p", "9pnet_virtio", "overlay", "kvm_amd", "kvm_intel"]

PANIC_RE = re.compile(r"Kernel panic - not syncing|end Kernel panic")
OOPS_RE = re.compile(r"\bOops\b|\bBUG: |kernel BUG at|general protection fault|WARNING: CPU")


def log(msg: str) -> None:
    print(f"[{PROG}] {msg}", flush=True)


class UsageError(SystemExit):
    """A bad option or a missing tool: one line, exit 2 (--bisect: 128)."""


# -- the kernel image ----------------------------------------------------------------------------

def kernel_version(image: Path) -> str:
    """The version string in a bzImage's setup header (Documentation/arch/x86/boot.rst:
    kernel_version at 0x20e, an offset from 0x200), e.g. "6.12.117 (user@host) #1 SMP ..."."""
    with image.open("rb") as f:
        head = f.read(0x10000)
    if head[0x202:0x206] != b"HdrS":
        raise SystemExit(f"{PROG}: {image} is not an x86 bzImage (no HdrS setup header)")
    off = struct.unpack_from("<H", head, 0x20E)[0] + 0x200
    return head[off:head.index(b"\0", off)].decode(errors="replace")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- the initramfs -------------------------------------------------------------------------------

Entry = tuple[str, int, bytes, int]   # (name, mode, data, mtime)


def cpio_newc(entries: list[Entry]) -> bytes:
    """A newc cpio archive (Documentation/driver-api/early-userspace/buffer-format.rst) of
    (name, mode, data, mtime) entries; directories have data b"", a symlink its target. The
    kernel keeps mtime (CONFIG_INITRAMFS_PRESERVE_MTIME), which the RAM root needs: Python
    checks a .py file's mtime against its prewarmed bytecode."""
    out = io.BytesIO()

    def pad(n: int) -> None:
        out.write(b"\0" * ((4 - n % 4) % 4))

    for ino, (name, mode, data, mtime) in enumerate([*entries, ("TRAILER!!!", 0, b"", 0)],
                                                     start=1):
        nb = name.encode() + b"\0"
        nlink = 2 if mode & 0o040000 else 1
        fields = (ino, mode, 0, 0, nlink, mtime, len(data), 0, 0, 0, 0, len(nb), 0)
        hdr = b"070701" + b"".join(f"{v:08x}".encode() for v in fields)
        out.write(hdr + nb)
        pad(len(hdr) + len(nb))
        out.write(data)
        pad(len(data))
    return out.getvalue()


def modinfo_depends(ko: bytes) -> list[str]:
    """The ``depends=`` list of a kernel module's .modinfo section (an ELF64 relocatable)."""
    if ko[:4] != b"\x7fELF":
        return []
    shoff = struct.unpack_from("<Q", ko, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def section(i: int) -> tuple[int, int, int]:  # (name offset, file offset, size)
        f = struct.unpack_from("<IIQQQQ", ko, shoff + i * shentsize)
        return f[0], f[4], f[5]

    names_at = section(shstrndx)[1]
    for i in range(shnum):
        name_off, off, size = section(i)
        start = names_at + name_off
        if ko[start:ko.index(b"\0", start)] == b".modinfo":
            for kv in ko[off:off + size].split(b"\0"):
                if kv.startswith(b"depends="):
                    return [d.replace("-", "_") for d in kv[8:].decode().split(",") if d]
    return []


def _load_ko(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        raise SystemExit(f"{PROG}: {path} is zstd-compressed: decompress the modules first")
    return data


def module_files(moddir: Path | None) -> list[tuple[str, bytes]]:
    """(name, uncompressed .ko bytes) for WANTED_MODULES and their dependencies, in load order.
    Dependencies come from each module's own .modinfo (modules.dep is not needed: a kernel
    package unpacked with dpkg-deb -x has none until depmod runs)."""
    if moddir is None:
        return []

    def stem(p: Path) -> str:
        return p.name.split(".ko")[0].replace("-", "_")

    paths = {stem(p): p for p in moddir.rglob("*.ko*")}
    if not paths:
        raise SystemExit(f"{PROG}: no kernel modules under {moddir}")
    loaded: dict[str, bytes] = {}
    order: list[str] = []

    def visit(name: str) -> None:
        if name in loaded or name not in paths:
            return
        loaded[name] = _load_ko(paths[name])
        for dep in modinfo_depends(loaded[name]):
            visit(dep)
        order.append(name)

    for want in WANTED_MODULES:
        visit(want)
    return [(n, loaded[n]) for n in order]


INIT = r"""#!/bin/busybox sh
# kvmpy VM init: mount the host root read-only over 9p, run the suite, report, power off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
say() { echo "@MARK@ $*" > /dev/console; }
die() { say "BOOT-FAILED $*"; poweroff -f; sleep 5; }
for m in $(cat /modules.order 2>/dev/null); do
  insmod /lib/modules/$m.ko 2>/dev/null || echo "vm init: insmod $m failed (not needed if built in)"
done
R=/host
mkdir -p $R
@ROOT@mount -t proc proc $R/proc && mount -t sysfs sys $R/sys && mount -t devtmpfs dev $R/dev || die "cannot mount proc/sys/dev"
mount -t tmpfs -o mode=1777,size=@TMPSIZE@ tmp $R/tmp || die "cannot mount tmpfs on /tmp"
mount -t tmpfs run $R/run
mkdir -p $R/dev/shm $R/dev/pts && mount -t tmpfs -o mode=1777 shm $R/dev/shm && mount -t devpts pts $R/dev/pts
mkdir -p $R/tmp/results $R/tmp/ovl/up $R/tmp/ovl/work
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 results $R/tmp/results || die "cannot mount the results share"
mkdir -p $R/tmp/guest-cache
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 guestcache $R/tmp/guest-cache || echo "vm init: no guest-program cache share"
@OVERLAY@say "BOOTED $(uname -r) $(cut -d' ' -f1 /proc/uptime)"
[ -e /dev/kvm ] || echo "vm init: no /dev/kvm in the guest ($(grep -c -w -e svm -e vmx /proc/cpuinfo) CPUs with svm/vmx)"
timeout -s KILL @INNER@ chroot $R /bin/bash /tmp/results/guest.sh
rc=$?
sync
say "EXIT $rc"
umount $R/tmp/results
poweroff -f
sleep 10
"""

NINEP = "mount -t 9p -o trans=virtio,version=9p2000.L,cache=loose,msize=512000,ro hostroot"
ROOT_9P = NINEP + ' $R || die "cannot mount the host root over 9p"\n'
# The root as an overlay: the host files the suite reads (in this initramfs, under /ram) over
# the 9p share, with a tmpfs upper layer (the whole root is writable, in RAM). Under TCG each 9p
# request costs a virtio round trip, and Python's start-up and pytest's collection make
# thousands (stat, open, read); from RAM they cost nothing. Anything else still comes from 9p.
ROOT_RAM = ("mkdir -p /9p /ovl\n" + NINEP + ' /9p || die "cannot mount the host root over 9p"\n'
            + r"""if mount -t tmpfs -o mode=0755 ovl /ovl && mkdir -p /ovl/up /ovl/work && mount -t overlay overlay -o lowerdir=/ram:/9p,upperdir=/ovl/up,workdir=/ovl/work $R; then
  RAMROOT=1; echo "vm init: root = $(du -sm /ram | cut -f1) MiB of host files in RAM over the 9p share"
else
  echo "vm init: no RAM overlay: the root is the 9p share"; mount --bind /9p $R || die "cannot bind the 9p root"
fi
""")

OVERLAY = r"""if [ -z "$RAMROOT" ] && ! mount -t overlay overlay -o lowerdir=$R@REPO@,upperdir=$R/tmp/ovl/up,workdir=$R/tmp/ovl/work $R@REPO@; then
  echo "vm init: no overlay over @REPO@: the repository is read-only in the guest"
fi
"""

GUEST_SH = r"""#!/bin/bash
# Written by @PROG@, run inside the VM (chrooted into the host root).
set -o pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/tmp TMPDIR=/tmp PYTHONDONTWRITEBYTECODE=1 PYTHONPYCACHEPREFIX=@PYCACHE@ COLUMNS=160 TERM=dumb LANG=C.UTF-8
@ENV@
# Guest programs were built on the host into this shared cache (gcc under TCG is slow).
export KVMPY_GUEST_CACHE=/tmp/guest-cache
cd @CWD@ || exit 3
@RUN@
rc=${PIPESTATUS[0]}
echo "@MARK@ PYTEST-END $(cut -d' ' -f1 /proc/uptime) rc=$rc"
exit $rc
"""

RUN_SUITE = r"""# What this kernel's KVM answers, in the emulator profiles' terms (ci/compare-profiles).
@PY@ -m kvmpy.caps --profile host \
  > /tmp/results/profile.json 2> /tmp/results/profile.err || echo "vm: probing the KVM profile failed: $(tail -1 /tmp/results/profile.err)"
echo "@MARK@ PYTEST-START $(cut -d' ' -f1 /proc/uptime)"
# Not a terminal for rich (no live progress redraws in the log). The inner timeout is the
# suite's whole budget (SIGINT: pytest stops like on ^C and still writes JUnit/KTAP for what
# ran; timeout(1) then exits 124); pytest-timeout bounds each test.
timeout -s INT -k 30 @SUITE_TIMEOUT@ @KVMPY@ run --junit /tmp/results/junit.xml --ktap /tmp/results/ktap.txt @ARGS@ 2>&1 | cat"""

RUN_EXEC = r"""echo "@MARK@ PYTEST-START $(cut -d' ' -f1 /proc/uptime)"
timeout -s INT -k 30 @SUITE_TIMEOUT@ /bin/bash -c @CMD@ 2>&1 | cat"""


def build_initramfs(path: Path, busybox: Path, modules: list[tuple[str, bytes]],
                    repo: Path | None, inner_timeout: int, tmp_size: str,
                    ram_files: list[Path] | None = None) -> None:
    """``repo``: the checkout the guest runs in, under an overlay; None: an installed kvmpy.
    ``ram_files``: host files the guest gets in RAM, under /ram, as the top layer of its root
    (ram_root_files())."""
    ram = ram_entries(ram_files) if ram_files else []
    overlay = OVERLAY.replace("@REPO@", str(repo)) if repo is not None else ""
    root = ROOT_RAM if ram else ROOT_9P
    init = (INIT.replace("@ROOT@", root).replace("@OVERLAY@", overlay).replace("@MARK@", MARK)
            .replace("@INNER@", str(inner_timeout)).replace("@TMPSIZE@", tmp_size))
    d = 0o040755
    entries: list[Entry] = [
        ("bin", d, b"", 0), ("dev", d, b"", 0), ("proc", d, b"", 0), ("sys", d, b"", 0),
        ("host", d, b"", 0), ("lib", d, b"", 0), ("lib/modules", d, b"", 0),
        ("bin/busybox", 0o100755, busybox.read_bytes(), 0),
        ("init", 0o100755, init.encode(), 0),
        ("modules.order", 0o100644, "".join(f"{n}\n" for n, _ in modules).encode(), 0),
    ]
    entries += [(f"lib/modules/{n}.ko", 0o100644, data, 0) for n, data in modules]
    entries += ram
    # Not compressed: gzip costs more CPU than the copy it saves (QEMU loads it from memory).
    path.write_bytes(cpio_newc(entries))


def _has_interp(elf: Path) -> bool:
    """Whether an ELF64 executable has a PT_INTERP program header (is dynamically linked)."""
    with elf.open("rb") as f:
        eh = f.read(64)
        if eh[:4] != b"\x7fELF":
            return True
        phoff, = struct.unpack_from("<Q", eh, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", eh, 0x36)
        f.seek(phoff)
        ph = f.read(phentsize * phnum)
    return any(struct.unpack_from("<I", ph, i * phentsize)[0] == 3 for i in range(phnum))


def prebuild_guests(python: str, repo: Path | None) -> Path:
    """Build the guest programs (guests/*.c) on the host, where gcc runs at full speed, into the
    cache the guest then mounts (kvmpy.guest.build: $KVMPY_GUEST_CACHE, keyed by a hash of the
    sources, flags and compiler version, so the guest, on the same root, finds them). An
    installed kvmpy's prebuilt guests need nothing built (the same command just lists them)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    cache = Path(os.environ.get("KVMPY_GUEST_CACHE") or Path(base) / "kvmpy" / "guests")
    cache.mkdir(parents=True, exist_ok=True)
    if repo is None or (repo / "guests").is_dir():
        t = time.monotonic()
        r = subprocess.run([python, "-m", "kvmpy.guest"], cwd=repo,
                           env={**os.environ, "KVMPY_GUEST_CACHE": str(cache)},
                           capture_output=True, text=True)
        if r.returncode:
            log(f"building guest programs on the host failed (the guest will try): "
                f"{(r.stderr or r.stdout).strip().splitlines()[-1:]}")
        else:
            log(f"guest programs built on the host in {time.monotonic() - t:.1f} s -> {cache}")
    return cache


def prewarm_bytecode(python: str, repo: Path | None, trace: Path,
                     guest_cache: Path | None = None) -> Path:
    """Compile, on the host, the bytecode the guest's Python would otherwise compile under TCG,
    into a pycache prefix the guest reads over the read-only root (PYTHONPYCACHEPREFIX; same
    interpreter, same paths, same mtimes). Measured on 7.3: pytest's assertion rewriting of the
    test modules and of kvmpy (a pytest plugin, so rewritten whole) was 60% of the guest's
    collection time, because the guest cannot write __pycache__. Collecting the selftests once
    here (the checkout's, or the installed kvmpy.selftests) writes both the rewritten and the
    plain bytecode that collection imports. ``trace``: the steps' file traces go to
    trace.0.json, trace.1.json (TRACE_OPENS)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    prefix = Path(base) / "kvmpy" / "pycache"
    prefix.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(prefix)
    if guest_cache is not None:  # what collection assembles (fakevm.asm) lands in the guest's cache
        env["KVMPY_GUEST_CACHE"] = str(guest_cache)
    t = time.monotonic()
    # Beyond what collection imports: what the run imports later (hypothesis with the model,
    # pyelftools with the first guest image, importlib.metadata's email parser), so they are
    # compiled and in the RAM root.
    warm = ("kvmpy.model.machine", "kvmpy.model.harness", "elftools.elf.elffile", "email.parser")
    code = (f"import importlib\nfor m in {warm!r}:\n    try:\n        importlib.import_module(m)\n"
            "    except ImportError:\n        pass")
    # Collection as the guest's `kvmpy run` does it (its default suite: the checkout's or the
    # installed one): its plugins are rewritten and its header and summary imported (rich) only
    # there. Collecting through plain pytest left 54 modules for the guest to compile (~1.5 s).
    steps = [["-c", code],
             ["-m", "kvmpy", "run", "--backend", "kvm", "-n", "1", "--collect-only", "-q"]]
    # ... and the same modules inside that session too: their assertion-rewritten bytecode
    # (kvmpy.testing.plugin pytest_collection_finish).
    env["KVMPY_PREWARM_IMPORTS"] = ",".join(warm)
    for i, step in enumerate(steps):
        # Each step also records what it opens (TRACE_OPENS), for the guest's RAM root.
        cmd = [python, "-c", TRACE_OPENS, str(trace.with_suffix(f".{i}.json")), *step]
        r = subprocess.run(cmd, cwd=repo or tempfile.gettempdir(), env=env,
                           capture_output=True, text=True)
        if r.returncode:   # only a cost: the guest compiles (and reads over 9p) what is missing
            log(f"bytecode prewarm step {step[:2]} failed (exit {r.returncode}): "
                f"{(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    log(f"bytecode compiled on the host in {time.monotonic() - t:.1f} s -> {prefix}")
    return prefix


#: Run as ``python -c TRACE_OPENS OUT.json (-c CODE | -m MODULE) ARGS...``: runs the code or
#: module like the interpreter would, recording every file it opens (the "open" audit event of
#: open(), io.open_code() - imports, bytecode -, os.open) and every loaded module's file, with
#: the final sys.path, into OUT.json. Standard library only.
TRACE_OPENS = r"""
import json, os, runpy, sys
out, mode, target, *rest = sys.argv[1:]
seen = set()
def hook(event, args):
    if event == "open" and isinstance(args[0], str):
        seen.add(os.path.abspath(args[0]))
sys.addaudithook(hook)
sys.argv = [target if mode == "-m" else "-c", *rest]
try:
    if mode == "-m":
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})
finally:
    seen.update(os.path.abspath(f) for m in list(sys.modules.values())
                if isinstance(f := getattr(m, "__file__", None), str))
    with open(out, "w") as f:
        json.dump({"files": sorted(seen), "path": [os.path.abspath(p) for p in sys.path if p]}, f)
"""

#: Bounds on the RAM root: a top-level package bigger than this contributes only the files the
#: trace saw; a tree bigger than the total is not used (the guest reads everything over 9p).
RAM_PACKAGE_MAX = 32 << 20
RAM_TOTAL_MAX = 384 << 20
#: Never copied: the guest has its own /tmp, /proc, /sys, /dev; caches and VCS data.
RAM_SKIP_PREFIXES = ("/proc/", "/sys/", "/dev/", "/tmp/")
RAM_SKIP_DIRS = {"__pycache__", ".git", ".venv", ".mypy_cache", ".ruff_cache", ".pytest_cache",
                 ".hypothesis", "results", "build", "dist"}


def _walk_files(top: Path, skip: set[str]) -> list[Path]:
    out = []
    for d, dirs, files in os.walk(top):
        dirs[:] = [x for x in dirs if x not in skip and not x.endswith(".egg-info")]
        out += [Path(d) / f for f in files]
    return out


def ram_root_files(traces: list[Path], python: str, repo: Path | None, pycache: Path,
                   venv: Path | None) -> list[Path]:
    """The host files to give the guest in RAM: what the prewarm steps opened (traces), each
    traced module's whole top-level package (a run imports more of a package than collection
    does), the checkout (minus caches and .git), the bytecode prefix, and the interpreter with
    its venv files. Paths are real paths, so no directory of the RAM layer shadows a symlink."""
    files: set[str] = set()
    roots: set[str] = set()
    for t in traces:
        try:
            data = json.loads(t.read_text())
        except (OSError, ValueError):
            continue
        files.update(data.get("files", []))
        roots.update(data.get("path", []))
    lib_roots = sorted((os.path.realpath(r) for r in roots if os.path.isdir(r)),
                       key=len, reverse=True)
    chosen: set[Path] = set()
    tops: set[str] = set()
    for f in files:
        rf = os.path.realpath(f)
        if not os.path.isfile(rf) or rf.startswith(RAM_SKIP_PREFIXES):
            continue
        chosen.add(Path(rf))
        root = next((r for r in lib_roots if rf.startswith(r + "/")), None)
        if root is not None and (repo is None or root != str(repo)):
            top = rf[len(root) + 1:].split("/")[0]
            if os.path.isdir(os.path.join(root, top)):
                tops.add(os.path.join(root, top))
    for top in tops:
        walked = _walk_files(Path(top), RAM_SKIP_DIRS)
        if sum(p.stat().st_size for p in walked) <= RAM_PACKAGE_MAX:
            chosen.update(walked)
    extra: list[Path] = []
    if repo is not None:
        extra += _walk_files(repo, RAM_SKIP_DIRS)
    if pycache.is_dir():
        extra += _walk_files(pycache, set())
    exe = Path(python)
    extra += [exe]
    if venv is not None:
        extra += [venv / "pyvenv.cfg", *(p for p in (venv / "bin").glob("*")
                                         if p.name.startswith("python")
                                         or p.name in ("kvmpy", "pytest"))]
    for p in extra:
        chosen.add(p)
    return sorted(chosen)


def ram_entries(paths: list[Path]) -> list[Entry]:
    """cpio entries under ram/ for host files, with their parent directories, mode and mtime.
    A symlink is kept as a link (when its directory is real) and its target added."""
    entries: dict[str, Entry] = {"ram": ("ram", 0o040755, b"", 0)}

    def add_dirs(path: str) -> None:
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if "ram/" + d not in entries:
                entries["ram/" + d] = ("ram/" + d, 0o040755, b"", 0)

    todo = [str(p) for p in paths]
    while todo:
        p = todo.pop()
        try:
            st = os.lstat(p)
        except OSError:
            continue
        if "ram" + p in entries:
            continue
        if os.path.islink(p):
            if os.path.realpath(os.path.dirname(p)) != os.path.dirname(p):
                todo.append(os.path.realpath(p))
                continue
            add_dirs(p)
            entries["ram" + p] = ("ram" + p, 0o120777, os.readlink(p).encode(), 0)
            target = os.path.join(os.path.dirname(p), os.readlink(p))
            todo.append(os.path.normpath(target))
        elif os.path.isfile(p):
            rp = os.path.realpath(p)
            if rp != p:
                todo.append(rp)
                continue
            try:
                data = Path(p).read_bytes()
            except OSError:  # gone or unreadable since the trace: the guest reads it over 9p
                continue
            add_dirs(p)
            entries["ram" + p] = ("ram" + p, 0o100000 | (st.st_mode & 0o7777), data,
                                  int(st.st_mtime))
    return [entries[k] for k in sorted(entries)]


# -- machine resources ---------------------------------------------------------------------------

def memory_mib(size: str) -> int:
    """QEMU's -m size ("3G", "3072M", "3072") in MiB."""
    m = re.fullmatch(r"(\d+)([MG]?)", size.strip().upper())
    if not m:
        raise SystemExit(f"{PROG}: cannot parse --memory {size!r} (use e.g. 3G or 3072M)")
    return int(m.group(1)) * (1024 if m.group(2) == "G" else 1)


def numa_options(nodes: int, memory: str, smp: int) -> list[str]:
    """QEMU options for ``nodes`` NUMA nodes: one RAM backend each (memory split evenly, the
    last takes the remainder) and the vCPUs assigned round-robin (qemu-system-x86 docs,
    -numa node,memdev=). 1 node: no options (QEMU's default, a non-NUMA guest)."""
    if nodes <= 1:
        return []
    if nodes > smp:
        raise SystemExit(f"{PROG}: --numa {nodes} needs at least as many vCPUs (--smp {smp})")
    total = memory_mib(memory)
    each = total // nodes
    out: list[str] = []
    for i in range(nodes):
        size = each if i < nodes - 1 else total - each * (nodes - 1)
        cpus = [c for c in range(smp) if c % nodes == i]
        out += ["-object", f"memory-backend-ram,id=m{i},size={size}M",
                "-numa", f"node,nodeid={i},memdev=m{i}," + ",".join(f"cpus={c}" for c in cpus)]
    return out


# -- acceleration --------------------------------------------------------------------------------

def nested_kvm() -> tuple[bool, str]:
    """Whether this host's KVM can run QEMU with nested virtualization for the guest."""
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
    except OSError as e:
        return False, f"/dev/kvm: {e.strerror}"
    for mod in ("kvm_intel", "kvm_amd"):
        p = Path(f"/sys/module/{mod}/parameters/nested")
        if p.exists():
            v = p.read_text().strip()
            if v in ("Y", "1"):
                return True, f"{mod}.nested={v}"
            return False, f"{mod}.nested={v}"
    mods = [m for m in ("kvm_pvm",) if Path(f"/sys/module/{m}").exists()]
    return False, f"no kvm_intel/kvm_amd module ({', '.join(mods) or 'other KVM'})"


# -- running -------------------------------------------------------------------------------------

class Outcome:
    def __init__(self) -> None:
        self.booted_at: float | None = None
        self.guest_release = ""
        self.guest_boot_uptime: float | None = None
        self.pytest_start_uptime: float | None = None
        self.pytest_end_uptime: float | None = None
        self.exit_rc: int | None = None
        self.boot_failed = ""
        self.panic: list[str] = []
        self.oops: list[str] = []
        self.timed_out = ""


def scan(line: str, o: Outcome, t0: float) -> None:
    if MARK in line:
        words = line.split(MARK, 1)[1].split()
        if not words:
            return
        if words[0] == "BOOTED" and len(words) >= 3:
            o.booted_at = time.monotonic() - t0
            o.guest_release, o.guest_boot_uptime = words[1], float(words[2])
        elif words[0] == "PYTEST-START" and len(words) >= 2:
            o.pytest_start_uptime = float(words[1])
        elif words[0] == "PYTEST-END" and len(words) >= 2:
            o.pytest_end_uptime = float(words[1])
        elif words[0] == "EXIT" and len(words) >= 2 and words[1].lstrip("-").isdigit():
            o.exit_rc = int(words[1])
        elif words[0] == "BOOT-FAILED":
            o.boot_failed = " ".join(words[1:])
    elif PANIC_RE.search(line):
        o.panic.append(line.strip())
    elif OOPS_RE.search(line) and len(o.oops) < 20:
        o.oops.append(line.strip())


def run_qemu(cmd: list[str], console: Path, o: Outcome, boot_timeout: float,
             total_timeout: float, echo: bool) -> int:
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf = b""
    with console.open("wb") as con:
        while True:
            now = time.monotonic() - t0
            if o.booted_at is None and now > boot_timeout:
                o.timed_out = f"the guest did not boot within {boot_timeout:g} s"
                break
            if now > total_timeout:
                o.timed_out = f"the VM ran longer than --timeout {total_timeout:g} s"
                break
            if not sel.select(timeout=1.0):
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            con.write(chunk)
            con.flush()
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                line = raw.decode("utf-8", "replace").replace("\r", "")
                scan(line, o, t0)
                if echo:
                    print(line, flush=True)
        if buf:
            scan(buf.decode("utf-8", "replace"), o, t0)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def checkout_of_package() -> Path | None:
    """The checkout this kvmpy runs from (an editable install or sys.path), or None when it is
    an installed package (no pyproject.toml and selftests/ beside the kvmpy package)."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "selftests" / "conftest.py").is_file():
        return root
    return None


def parser(prog: str, results: Path, venv: Path | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, allow_abbrev=False,
        usage=f"{prog} --kernel PATH [options] [--exec CMD | [--] [kvmpy run / pytest args...]]",
        description="Boot a kernel under test in QEMU and run the kvmpy suite inside it.")
    p.add_argument("--kernel", required=True, type=Path, help="bzImage to boot")
    p.add_argument("--modules", type=Path, default=None,
                   help="the kernel's module directory (lib/modules/VERSION, e.g. from dpkg-deb -x "
                        "of a linux-image package) for modular kernels; default: "
                        "/lib/modules/<the image's version> if it exists")
    p.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto",
                   help="auto: nested KVM if this host offers it, else TCG")
    p.add_argument("--smp", type=int, default=2)
    p.add_argument("--memory", default="3G")
    p.add_argument("--no-ram-root", dest="ram_root", action="store_false",
                   help="read everything over 9p (default: the files the suite reads, traced "
                        "on the host, are copied into the guest's RAM as the top layer of its "
                        "root)")
    p.add_argument("--timeout", type=float, default=1800,
                   help="seconds for the whole VM, boot to power-off (default 1800)")
    p.add_argument("--boot-timeout", type=float, default=180,
                   help="seconds until the guest must report it booted (default 180)")
    p.add_argument("--results", type=Path, default=results, help=f"default {results}")
    p.add_argument("--venv", type=Path, default=venv,
                   help="the venv whose kvmpy runs in the guest (default: "
                        f"{venv or 'the one running this command'})")
    p.add_argument("--append", default="", help="extra kernel command line")
    p.add_argument("--numa", type=int, default=2,
                   help="NUMA nodes offered to the guest (memory split evenly, one vCPU each "
                        "round-robin; default 2, so test_numa_* and mbind cases run; 1 = none)")
    p.add_argument("--hugepages", type=int, default=64,
                   help="2 MiB hugetlb pages reserved at boot (hugepages= on the command line, "
                        "split between the NUMA nodes; default 64 = 128 MiB; 0 = none)")
    p.add_argument("--exec", dest="exec_cmd", metavar="CMD", default=None,
                   help="run this shell command (bash -c) in the VM instead of kvmpy run; its "
                        "exit status is the result")
    p.add_argument("--bisect", action="store_true",
                   help="exit codes for git bisect run: 125 (skip) when the kernel cannot be "
                        "tested (not a bzImage, no boot, all skipped), 1 any failure, 0 pass")
    p.add_argument("--qemu", default="qemu-system-x86_64", help="QEMU binary (default: on PATH)")
    p.add_argument("--busybox", type=Path, default=None,
                   help="a static busybox (default: /bin/busybox or /usr/bin/busybox)")
    p.add_argument("--quiet", action="store_true", help="do not echo the console")
    p.add_argument("--dry-run", action="store_true", help="build everything, print the QEMU "
                   "command, do not boot")
    return p


def bisect_code(code: int, booted: bool) -> int:
    """``git bisect run``'s meaning of a verdict: 125 skips a kernel that cannot be tested."""
    if code == 0:
        return 0
    if code == EXIT_USAGE:
        return BISECT_ABORT
    if not booted or code in (4, 5):
        return BISECT_SKIP
    return BISECT_BAD


def main(argv: list[str] | None = None, *, prog: str = "kvmpy vm",
         repo: Path | None = None, venv: Path | None = None,
         results: Path | None = None) -> int:
    """``repo``/``venv``: ci/vm-run passes its checkout and checkout/.venv; ``kvmpy vm`` finds
    the checkout it runs from, if any, and otherwise runs the installed package in the guest."""
    global PROG
    PROG = "vm-run" if prog.endswith("vm-run") else prog
    if repo is None and venv is None:
        repo = checkout_of_package()
    default_results = results or ((repo / "results" / "vm") if repo is not None
                                  else Path("kvmpy-vm-results"))
    args, rest = parser(prog, default_results, venv).parse_known_args(argv)
    suite_args = [a for a in rest if a != "--"] if rest[:1] == ["--"] else rest
    booted = False
    try:
        code, booted = _run(args, suite_args, repo)
    except UsageError as e:
        if PROG == "vm-run":
            log(str(e))  # as ci/vm-run always did
        else:  # the kvmpy CLI's rule: one line on stderr (kvmpy/app/cli.py)
            print(f"{PROG}: {e}", file=sys.stderr, flush=True)
        code = EXIT_USAGE
    except SystemExit as e:  # bad input found on the way (kernel image, --memory, modules)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr, flush=True)
            code = EXIT_USAGE
        else:
            code = int(e.code or 0)
    if not args.bisect:
        return code
    if code == EXIT_USAGE and booted is False and args.kernel.is_file():
        # A kernel image that is not a bzImage (a broken build) is untestable, not a usage error.
        try:
            kernel_version(args.kernel.resolve())
        except SystemExit:
            code = BISECT_SKIP
            log("--bisect: not a bootable image: exit 125 (git bisect skips this commit)")
            return code
    mapped = bisect_code(code, booted)
    log(f"--bisect: exit {mapped} for git bisect run (verdict {code}, "
        f"{'booted' if booted else 'did not boot'})")
    return mapped


def _run(args: argparse.Namespace, suite_args: list[str], repo: Path | None) -> tuple[int, bool]:
    """The VM run; (exit code, whether the guest booted)."""
    if args.exec_cmd is not None and suite_args:
        raise UsageError(f"--exec and kvmpy run arguments ({' '.join(suite_args)}) exclude "
                         "each other")
    kernel = args.kernel.resolve()
    if not kernel.is_file():
        raise UsageError(f"kernel image {args.kernel} does not exist")
    qemu = shutil.which(args.qemu)
    if args.busybox is not None:
        busybox: Path | None = args.busybox if args.busybox.is_file() else None
    else:
        busybox = next((Path(b) for b in ("/bin/busybox", "/usr/bin/busybox")
                        if Path(b).exists()), None)
    if not qemu or not busybox:
        missing = " and ".join(m for m, ok in ((args.qemu, qemu), ("a static busybox", busybox))
                               if not ok)
        raise UsageError(f"needs {missing}: apt-get install -y {DEBIAN_PACKAGES} "
                         "(Debian/Ubuntu packages)")
    if _has_interp(busybox):
        raise UsageError(f"{busybox} is dynamically linked: install busybox-static")
    if args.venv is not None:
        venv = args.venv.resolve()
        if not (venv / "bin" / "kvmpy").exists():
            raise UsageError(f"{venv}/bin/kvmpy missing: create the venv first (pip install -e .)")
        python, kvmpy_cmd = str(venv / "bin" / "python"), str(venv / "bin" / "kvmpy")
        where = [("venv", venv)]
    else:
        # The interpreter running this command, with its installed kvmpy: the guest sees the
        # same paths (the host root over 9p).
        python = sys.executable
        kvmpy_cmd = f"{shlex.quote(python)} -m kvmpy"
        where = [("Python environment", Path(sys.prefix).resolve())]
    if repo is not None:
        where.insert(0, ("repository", repo))
    for what, path in where:
        if path == Path("/tmp") or Path("/tmp") in path.parents:
            raise UsageError(f"the {what} {path} is under /tmp, which the guest covers with its "
                             f"own tmpfs: put it elsewhere")

    version = kernel_version(kernel)
    release = version.split()[0]
    moddir = args.modules or (Path("/lib/modules") / release)
    modules = module_files(moddir if moddir.exists() else None)
    if args.modules and not modules:
        log(f"no modules found for {WANTED_MODULES} in {moddir}")

    if args.accel == "auto":
        ok, why = nested_kvm()
        accel = "kvm" if ok else "tcg"
        accel_why = f"nested KVM ({why})" if ok else f"TCG: no nested KVM here ({why})"
    else:
        accel, accel_why = args.accel, f"--accel {args.accel}"

    results = args.results.resolve()
    results.mkdir(parents=True, exist_ok=True)
    for name in ("junit.xml", "ktap.txt", "console.log", "vm-run.json", "guest.sh",
                 "profile.json", "profile.err"):
        (results / name).unlink(missing_ok=True)

    # The suite's own budget leaves room for a normal boot (seconds) and for pytest to stop and
    # write its files; the host-side --timeout stays the backstop for a slow boot.
    margin = 90
    suite_timeout = max(60, int(args.timeout - margin))
    env_lines = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(os.environ.items())
                        if k.startswith("KVMPY_") and k != "KVMPY_GUEST_CACHE")
    guest_cache = prebuild_guests(python, repo)
    work = Path(tempfile.mkdtemp(prefix="kvmpy-vm-"))
    try:
        # Also for --exec: its command may run kvmpy (ci/bench-vm does).
        pycache = prewarm_bytecode(python, repo, work / "opens", guest_cache)
        ram: list[Path] = []
        if args.ram_root:
            ram = ram_root_files(sorted(work.glob("opens.*.json")), python, repo, pycache,
                                 Path(python).parent.parent if args.venv is not None
                                 else Path(sys.prefix))
            size = sum(p.stat().st_size for p in ram if p.is_file())
            if size > RAM_TOTAL_MAX:
                log(f"RAM root of {size >> 20} MiB is over {RAM_TOTAL_MAX >> 20} MiB: the guest "
                    "reads everything over 9p")
                ram = []
            else:
                log(f"RAM root: {len(ram)} host files, {size >> 20} MiB, over the 9p root")
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if args.exec_cmd is not None:
        run = RUN_EXEC.replace("@CMD@", shlex.quote(args.exec_cmd))
    else:
        run = (RUN_SUITE.replace("@PY@", shlex.quote(python)).replace("@KVMPY@", kvmpy_cmd)
               .replace("@ARGS@", " ".join(shlex.quote(a) for a in suite_args)))
    # The checkout's suite runs in the checkout; an installed one from /tmp (kvmpy run then
    # picks kvmpy.selftests).
    cwd = shlex.quote(str(repo)) if repo is not None else "/tmp"
    guest_sh = (GUEST_SH.replace("@RUN@", run)
                .replace("@PROG@", "ci/vm-run" if PROG == "vm-run" else PROG)
                .replace("@MARK@", MARK).replace("@CWD@", cwd)
                .replace("@PYCACHE@", shlex.quote(str(pycache))).replace("@ENV@", env_lines)
                .replace("@SUITE_TIMEOUT@", str(suite_timeout)))
    (results / "guest.sh").write_text(guest_sh)

    try:
        initrd = work / "initramfs.cpio"
        # init's own kill comes after the suite's (SIGINT at the budget, SIGKILL 30 s later).
        build_initramfs(initrd, busybox, modules, repo, suite_timeout + 60, "4G", ram)
        hp = f"hugepages={args.hugepages} " if args.hugepages else ""
        cmdline = ("console=ttyS0 loglevel=5 panic=-1 oops=panic rdinit=/init "
                   "tsc=reliable no_timer_check " + hp + args.append).strip()
        if accel == "kvm":
            machine = ["-accel", "kvm", "-cpu", "host"]
        else:
            machine = ["-accel", "tcg,thread=single", "-cpu", "max"]
        cmd = [qemu, "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
               "-machine", "q35", *machine, "-smp", str(args.smp), "-m", args.memory,
               *numa_options(args.numa, args.memory, args.smp),
               "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
               "-serial", "stdio", "-monitor", "none", "-no-reboot",
               "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,"
                          "multidevs=remap",
               "-virtfs", f"local,path={results},mount_tag=results,security_model=none",
               "-virtfs", f"local,path={guest_cache},mount_tag=guestcache,security_model=none"]
        log(f"kernel {kernel} ({version}), sha256 {sha256(kernel)[:16]}...")
        log(f"accelerator: {accel_why}; -smp {args.smp} -m {args.memory}, "
            f"{args.numa} NUMA node(s), hugepages={args.hugepages}; "
            f"modules in initramfs: {', '.join(n for n, _ in modules) or 'none (built in)'}")
        what = (f"bash -c {shlex.quote(args.exec_cmd)}" if args.exec_cmd is not None
                else f"kvmpy run {' '.join(suite_args)}")
        src = f"the checkout {repo}" if repo is not None else f"the installed kvmpy of {python}"
        log(f"in the guest: {what} ({src}; suite timeout {suite_timeout} s, "
            f"VM timeout {args.timeout:g} s)")
        if args.dry_run:
            log("dry run: " + " ".join(shlex.quote(c) for c in cmd))
            return 0, False
        o = Outcome()
        t0 = time.monotonic()
        qrc = run_qemu(cmd, results / "console.log", o, args.boot_timeout, args.timeout,
                       echo=not args.quiet)
        total = time.monotonic() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)

    # -- verdict --------------------------------------------------------------------------------
    backends = ""
    ktap = results / "ktap.txt"
    if ktap.exists():
        m = re.search(r"^# kvmpy: backends (.*)$", ktap.read_text(), re.M)
        backends = m.group(1) if m else ""
    if o.timed_out:
        code, status = EXIT_TIMEOUT, f"TIMEOUT: {o.timed_out} (QEMU killed)"
    elif o.boot_failed:
        code, status = EXIT_VM, f"BOOT FAILURE: {o.boot_failed}"
    elif o.exit_rc is None:
        what = "GUEST KERNEL PANIC" if o.panic else (
            "BOOT FAILURE: the guest never reported it booted" if o.booted_at is None
            else "VM DIED before the suite finished")
        detail = (o.panic + o.oops)[:6]
        code, status = EXIT_VM, (f"{what} (QEMU exit {qrc}){': ' if detail else ''}"
                                 f"{' | '.join(detail)}")
    elif o.exit_rc in (124, 137):
        code, status = EXIT_TIMEOUT, (f"TIMEOUT inside the guest (suite budget {suite_timeout} "
                                      f"s, exit {o.exit_rc})")
    elif args.exec_cmd is not None:
        code, status = o.exit_rc, f"EXEC exit {o.exit_rc}"
        if o.oops:
            status += f" (the guest kernel logged: {' | '.join(o.oops[:3])})"
    else:
        code = o.exit_rc
        status = {0: "PASS", 1: "FAIL", 4: "ALL SKIPPED", 5: "NO TESTS COLLECTED"}.get(
            code, f"kvmpy run exit {code}")
        if o.oops:
            status += f" (the guest kernel logged: {' | '.join(o.oops[:3])})"
    if code == 0 and args.exec_cmd is None and not (results / "junit.xml").exists():
        code, status = EXIT_VM, "the suite reported success but wrote no junit.xml"

    def span(a: float | None, b: float | None) -> float | None:
        return round(b - a, 2) if a is not None and b is not None else None

    report = {
        "status": status, "exit": code, "kernel": str(kernel), "kernel_version": version,
        "kernel_sha256": sha256(kernel), "guest_release": o.guest_release,
        "accel": accel, "accel_reason": accel_why, "backends": backends,
        "suite_args": suite_args, "exec": args.exec_cmd, "qemu_exit": qrc,
        "kvmpy": str(repo) if repo is not None else python,
        "seconds": {"total": round(total, 2),
                    "boot_to_init_host_clock": round(o.booted_at, 2) if o.booted_at else None,
                    "guest_uptime_at_init": o.guest_boot_uptime,
                    "init_to_pytest": span(o.guest_boot_uptime, o.pytest_start_uptime),
                    "suite": span(o.pytest_start_uptime, o.pytest_end_uptime)},
        "numa_nodes": args.numa, "hugepages": args.hugepages,
        "results": {n: str(results / n) for n in ("junit.xml", "ktap.txt", "console.log",
                                                  "profile.json")
                    if (results / n).exists()},
    }
    (results / "vm-run.json").write_text(json.dumps(report, indent=2) + "\n")
    secs: dict[str, float | None] = report["seconds"]
    log(f"{status}")
    log(f"kernel {o.guest_release or release} ({kernel.name}), accelerator {accel}, "
        f"backends {backends or 'unknown (no KTAP)'}; {total:.1f} s "
        f"(boot {secs['boot_to_init_host_clock']} s, suite {secs['suite']} s)")
    log(f"results in {results}: {', '.join(report['results']) or 'none'}")
    return code, o.booted_at is not None


if __name__ == "__main__":
    sys.exit(main())
