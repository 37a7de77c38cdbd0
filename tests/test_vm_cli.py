"""`kvmpy vm` (kvmpy/app/vm.py): usage errors and missing tools (one line, exit 2), --bisect's
exit codes for git bisect run, --exec, and what the guest runs from a checkout vs an installed
kvmpy (dry runs: nothing boots here; tests/test_ci_tools.py boots via ci/vm-run)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from kvmpy.app import vm

REPO = Path(__file__).resolve().parent.parent
KVMPY = [sys.executable, "-m", "kvmpy"]


def fake_bzimage(path: Path, version: str = "7.3.4 (test) #1") -> Path:
    img = bytearray(0x4000)
    img[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", img, 0x20E, 0x1000)
    ver = version.encode() + b"\0"
    img[0x1200:0x1200 + len(ver)] = ver
    path.write_bytes(bytes(img))
    return path


def kvmpy_vm(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KVMPY, "vm", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


def _busybox_or_skip() -> None:
    if not any(Path(b).exists() for b in ("/bin/busybox", "/usr/bin/busybox")):
        pytest.skip("no busybox (apt-get install busybox-static)")


def test_listed_in_kvmpy_help() -> None:
    r = subprocess.run([*KVMPY, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and " vm " in r.stdout


def test_missing_kernel_is_one_line_exit_2(tmp_path: Path) -> None:
    r = kvmpy_vm("--kernel", str(tmp_path / "nope"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"kvmpy vm: kernel image {tmp_path / 'nope'} "
                                             "does not exist"]


def test_missing_qemu_names_the_packages(tmp_path: Path) -> None:
    r = kvmpy_vm("--kernel", str(fake_bzimage(tmp_path / "bzImage")), "--qemu", "no-such-qemu")
    assert r.returncode == 2, r.stdout + r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert "no-such-qemu" in line and "qemu-system-x86 busybox-static" in line


def test_missing_busybox_names_the_packages(tmp_path: Path) -> None:
    r = kvmpy_vm("--kernel", str(fake_bzimage(tmp_path / "bzImage")), "--qemu", "/bin/true",
                 "--busybox", str(tmp_path / "no-busybox"))
    assert r.returncode == 2, r.stdout + r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert "static busybox" in line and "busybox-static" in line


def test_dynamic_busybox_is_refused(tmp_path: Path) -> None:
    r = kvmpy_vm("--kernel", str(fake_bzimage(tmp_path / "bzImage")), "--qemu", "/bin/true",
                 "--busybox", sys.executable)  # dynamically linked
    assert r.returncode == 2 and "install busybox-static" in r.stderr


def test_exec_and_suite_args_exclude_each_other(tmp_path: Path) -> None:
    r = kvmpy_vm("--kernel", str(fake_bzimage(tmp_path / "bzImage")), "--exec", "true",
                 "--", "-k", "smoke")
    assert r.returncode == 2 and "exclude each other" in r.stderr


@pytest.mark.parametrize("code,booted,want", [
    (0, True, 0),          # passed: good
    (1, True, 1),          # a test failed: bad
    (3, True, 1),          # the kernel panicked during the suite: bad
    (124, True, 1),        # hung during the suite: bad
    (4, True, 125),        # everything skipped: this kernel cannot be tested
    (5, True, 125),        # nothing collected
    (3, False, 125),       # did not boot
    (124, False, 125),     # did not boot in time
    (2, False, 128),       # usage error: abort the bisection
])
def test_bisect_codes(code: int, booted: bool, want: int) -> None:
    assert vm.bisect_code(code, booted) == want


def test_bisect_skips_an_image_that_is_not_a_bzimage(tmp_path: Path) -> None:
    junk = tmp_path / "bzImage"
    junk.write_bytes(b"\0" * 0x1000)  # a broken build's output
    r = kvmpy_vm("--bisect", "--kernel", str(junk), "--qemu", "/bin/true")
    assert r.returncode == 125, r.stdout + r.stderr
    assert "not an x86 bzImage" in r.stderr
    plain = kvmpy_vm("--kernel", str(junk), "--qemu", "/bin/true")
    assert plain.returncode == 2


def test_bisect_aborts_on_a_missing_tool(tmp_path: Path) -> None:
    r = kvmpy_vm("--bisect", "--kernel", str(fake_bzimage(tmp_path / "bzImage")),
                 "--qemu", "no-such-qemu")
    assert r.returncode == 128, r.stdout + r.stderr


def test_checkout_dry_run_runs_the_checkout(tmp_path: Path) -> None:
    """From this checkout (editable install), the guest runs the checkout's suite in it."""
    _busybox_or_skip()
    r = kvmpy_vm("--kernel", str(fake_bzimage(tmp_path / "bzImage")), "--qemu", "/bin/true",
                 "--results", str(tmp_path / "res"), "--dry-run", "--", "-k", "smoke")
    assert r.returncode == 0, r.stdout + r.stderr
    sh = (tmp_path / "res" / "guest.sh").read_text()
    assert f"cd {REPO} ||" in sh
    assert f"{sys.executable} -m kvmpy run --junit" in sh and sh.rstrip().endswith("exit $rc")
    assert "-k smoke" in sh and f"the checkout {REPO}" in r.stdout


def test_installed_dry_run_runs_the_installed_package(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """No checkout around the package: no overlay, the guest runs this interpreter's kvmpy
    from /tmp (so kvmpy run picks kvmpy.selftests)."""
    _busybox_or_skip()
    monkeypatch.setattr(vm, "checkout_of_package", lambda: None)
    rc = vm.main(["--kernel", str(fake_bzimage(tmp_path / "bzImage")), "--qemu", "/bin/true",
                  "--results", str(tmp_path / "res"), "--dry-run", "--", "-k", "smoke"])
    assert rc == 0
    sh = (tmp_path / "res" / "guest.sh").read_text()
    assert "cd /tmp ||" in sh and f"{sys.executable} -m kvmpy run" in sh
    assert "the installed kvmpy of" in capsys.readouterr().out


def test_exec_dry_run(tmp_path: Path) -> None:
    _busybox_or_skip()
    r = kvmpy_vm("--kernel", str(fake_bzimage(tmp_path / "bzImage")), "--qemu", "/bin/true",
                 "--results", str(tmp_path / "res"), "--dry-run", "--exec", "uname -r; exit 7")
    assert r.returncode == 0, r.stdout + r.stderr
    sh = (tmp_path / "res" / "guest.sh").read_text()
    assert "/bin/bash -c 'uname -r; exit 7'" in sh and "kvmpy run" not in sh


def test_overlay_only_with_a_checkout(tmp_path: Path) -> None:
    _busybox_or_skip()
    bb = Path(shutil.which("busybox") or "/bin/busybox")
    for repo, want in ((REPO, True), (None, False)):
        out = tmp_path / "initrd"
        vm.build_initramfs(out, bb, [], repo, 100, "1G")
        assert (b"mount -t overlay" in out.read_bytes()) is want


def test_ci_vm_run_keeps_its_defaults(tmp_path: Path) -> None:
    """ci/vm-run is the same runner with the checkout's .venv and results/vm."""
    r = subprocess.run([sys.executable, str(REPO / "ci" / "vm-run"), "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "ci/vm-run --kernel PATH" in r.stdout
    text = " ".join(r.stdout.split())
    assert f"default {REPO / 'results' / 'vm'}" in text and f"(default: {REPO / '.venv'})" in text


def read_newc(data: bytes) -> dict[str, tuple[int, int, bytes]]:
    """name -> (mode, mtime, data) of a newc cpio archive."""
    out, pos = {}, 0
    while True:
        f = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name = data[pos + 110:pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out[name] = (f[1], f[5], data[pos:pos + filesize])
        pos = (pos + filesize + 3) & ~3


def test_ram_root_keeps_mtimes_links_and_parents(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The RAM layer must hold each file at its real path with its mtime (Python validates the
    prewarmed bytecode against it), links as links, and every parent directory."""
    monkeypatch.setattr(vm, "RAM_SKIP_PREFIXES", ("/proc/",))
    lib = tmp_path / "lib"
    (lib / "pkg" / "sub").mkdir(parents=True)
    (lib / "pkg" / "__pycache__").mkdir()
    (lib / "pkg" / "__init__.py").write_text("x = 1\n")
    (lib / "pkg" / "sub" / "lazy.py").write_text("y = 2\n")      # never opened by the trace
    (lib / "pkg" / "__pycache__" / "junk.pyc").write_bytes(b"stale")
    (lib / "single.py").write_text("z = 3\n")
    (lib / "unused.py").write_text("w = 4\n")
    os.utime(lib / "pkg" / "__init__.py", (1_600_000_000, 1_600_000_000))
    exe = tmp_path / "bin" / "python3.11"
    exe.parent.mkdir()
    exe.write_bytes(b"\x7fELF")
    exe.chmod(0o755)
    (tmp_path / "bin" / "python").symlink_to("python3.11")
    trace = tmp_path / "opens.0.json"
    trace.write_text(json.dumps({"files": [str(lib / "pkg" / "__init__.py"),
                                           str(lib / "single.py"), "/proc/self/status"],
                                 "path": [str(lib)]}))
    files = vm.ram_root_files([trace], str(tmp_path / "bin" / "python"), None,
                              tmp_path / "no-prefix", None)
    names = {str(p) for p in files}
    assert str(lib / "pkg" / "sub" / "lazy.py") in names      # the whole traced package
    assert str(lib / "single.py") in names and str(lib / "unused.py") not in names
    assert not any("__pycache__" in n or n.startswith("/proc") for n in names)
    bb = tmp_path / "busybox"
    bb.write_bytes(b"\x7fELF")
    out = tmp_path / "initrd"
    vm.build_initramfs(out, bb, [], None, 100, "1G", files)
    arc = read_newc(out.read_bytes())
    init_py = arc["ram" + str(lib / "pkg" / "__init__.py")]
    assert init_py[1] == 1_600_000_000 and init_py[2] == b"x = 1\n"
    link = arc["ram" + str(tmp_path / "bin" / "python")]
    assert link[0] & 0o170000 == 0o120000 and link[2] == b"python3.11"
    assert arc["ram" + str(exe)][0] & 0o777 == 0o755
    parts = str(lib).strip("/").split("/")
    for i in range(1, len(parts) + 1):
        assert arc["ram/" + "/".join(parts[:i])][0] & 0o170000 == 0o040000
    assert "ram" in arc
    init = arc["init"][2].decode()
    assert "lowerdir=/ram:/9p" in init and "mount --bind /9p $R" in init
    # Without RAM files: the 9p share is the root, as before.
    vm.build_initramfs(out, bb, [], None, 100, "1G")
    assert "lowerdir=/ram" not in read_newc(out.read_bytes())["init"][2].decode()
