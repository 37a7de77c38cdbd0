"""`kvmpy vm` (kvmpy/app/vm.py): usage errors and missing tools (one line, exit 2), --bisect's
exit codes for git bisect run, --exec, and what the guest runs from a checkout vs an installed
kvmpy (dry runs: nothing boots here; tests/test_ci_tools.py boots via ci/vm-run)."""

from __future__ import annotations

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
