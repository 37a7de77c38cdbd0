"""Bad input to the CLI and the plugin: one line on stderr naming the problem and the valid
choices, exit 2, before any test runs - never a traceback (docs/design.md, "Failure behaviour").

Every case runs the installed ``kvmpy`` entry point in a subprocess, as a user would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvmpy.backend.emu.profiles import PROFILES
from kvmpy.backend.select import EMU_PROFILES, kvm_available, not_a_kvm_device

# A test that leaves a mark when it runs: bad input must stop kvmpy run before it.
MARKS = """
import os

def test_marks(backend_name):
    open(os.environ["MARK_FILE"], "a").write(backend_name + "\\n")
"""


def _entry_point() -> list[str]:
    script = Path(sys.executable).with_name("kvmpy")
    if script.exists():
        return [str(script)]
    found = shutil.which("kvmpy")
    assert found, "the kvmpy console script is not installed (pip install -e .)"
    return [found]


def kvmpy(tmp: Path, *args: str, env: dict[str, str] | None = None
          ) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("KVMPY_", "PYTEST_"))}
    base |= {"KVMPY_KERNEL_LOG": "none", "MARK_FILE": str(tmp / "ran")}
    return subprocess.run([*_entry_point(), *args], cwd=tmp, env=base | (env or {}),
                          capture_output=True, text=True, timeout=120)


def assert_one_line_usage_error(r: subprocess.CompletedProcess[str], *wanted: str) -> str:
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    for w in wanted:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def suite(tmp_path: Path) -> Path:
    (tmp_path / "test_marks.py").write_text(MARKS)
    return tmp_path


def _not_run(tmp: Path, r: subprocess.CompletedProcess[str]) -> None:
    assert not (tmp / "ran").exists(), "a test ran before the bad input was reported"
    assert "collected" not in r.stdout and "kernel    " not in r.stdout, r.stdout


@pytest.mark.parametrize("device", ["/dev/null", "/dev/zero", "regular", "directory"])
def test_caps_on_a_device_that_is_not_kvm(tmp_path: Path, device: str) -> None:
    if device == "regular":
        device = str(tmp_path / "kvm")
        Path(device).write_text("not a device\n")
    elif device == "directory":
        device = str(tmp_path)
    r = kvmpy(tmp_path, "caps", env={"KVMPY_DEVICE": device})
    assert_one_line_usage_error(r, "KVMPY_DEVICE", device, "not a KVM device", "/dev/kvm")


def test_run_on_a_device_that_is_not_kvm(suite: Path) -> None:
    """auto would have taken /dev/null for KVM (it opens) and failed every test with ENOTTY."""
    r = kvmpy(suite, *RUN, env={"KVMPY_DEVICE": "/dev/null"})
    assert_one_line_usage_error(r, "KVMPY_DEVICE", "/dev/null is not a KVM device")
    _not_run(suite, r)


def test_caps_on_a_missing_device(tmp_path: Path) -> None:
    r = kvmpy(tmp_path, "caps", env={"KVMPY_DEVICE": str(tmp_path / "nope")})
    assert_one_line_usage_error(r, str(tmp_path / "nope"), "does not exist")


RUN = ["run", "-n", "0", "test_marks.py"]


@pytest.mark.parametrize("cmd", [["caps"], ["caps", "--backend", "emu"], RUN])
@pytest.mark.parametrize("var,valid", [
    ("KVMPY_BACKEND", "auto, kvm, emu, both"),
    ("KVMPY_EMU_PROFILE", "upstream, 7.3, 6.12, host"),
    ("KVMPY_INJECT_FAULT", "mmio-gpa"),
    ("KVMPY_REQUIRE_KVM", "0, 1"),
    ("KVMPY_MODEL_EXAMPLES", "integer >= 1"),
    ("KVMPY_MODEL_STEPS", "integer >= 1"),
])
def test_garbage_environment(suite: Path, cmd: list[str], var: str, valid: str) -> None:
    r = kvmpy(suite, *cmd, env={var: "garbage"})
    assert_one_line_usage_error(r, var, "'garbage'", valid)
    _not_run(suite, r)


@pytest.mark.parametrize("args,wanted", [
    (["--emu-profile", "garbage"], ["--emu-profile", "'garbage'", "upstream, 7.3, 6.12, host"]),
    (["--emu-profile=garbage"], ["--emu-profile", "'garbage'", "upstream, 7.3, 6.12, host"]),
    (["--backend", "garbage"], ["--backend", "'garbage'", "'auto', 'kvm', 'emu', 'both'"]),
    (["--timeout", "nan"], ["--timeout", "nan", "seconds >= 0"]),
    (["--timeout", "-1"], ["--timeout", "-1", "seconds >= 0"]),
    (["--timeout", "soon"], ["--timeout", "'soon'"]),
    (["-n", "-2"], ["-n", "-2", ">= 0"]),
])
def test_run_garbage_option(suite: Path, args: list[str], wanted: list[str]) -> None:
    r = kvmpy(suite, "run", "--backend", "emu", *args, "test_marks.py")
    assert_one_line_usage_error(r, *wanted)
    _not_run(suite, r)


def test_caps_garbage_option(tmp_path: Path) -> None:
    r = kvmpy(tmp_path, "caps", "--backend", "garbage")
    assert_one_line_usage_error(r, "--backend", "'garbage'", "'kvm', 'emu'")
    r = kvmpy(tmp_path, "caps", "--jsn")
    assert_one_line_usage_error(r, "unrecognized arguments: --jsn")


@pytest.mark.parametrize("option", ["--junit", "--ktap"])
@pytest.mark.parametrize("where", ["directory", "under-a-file", "proc"])
def test_run_unwritable_report_is_refused_before_running(suite: Path, option: str,
                                                         where: str) -> None:
    """It used to fail after the whole run, exit 1 although every test passed."""
    path = {"directory": str(suite), "under-a-file": str(suite / "test_marks.py" / "out"),
            "proc": "/proc/kvmpy-nope/report"}[where]
    r = kvmpy(suite, "run", "--backend", "emu", "-n", "0", option, path, "test_marks.py")
    assert_one_line_usage_error(r, option, path)
    _not_run(suite, r)
    assert not Path("/proc/kvmpy-nope").exists()


def test_run_writable_report_in_new_directory_still_works(suite: Path) -> None:
    """The check leaves nothing behind and does not get in the way of a good path."""
    r = kvmpy(suite, "run", "--backend", "emu", "-n", "0", "--junit", "a/b/j.xml",
              "--ktap", "a/k.ktap", "test_marks.py")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (suite / "a/b/j.xml").is_file() and (suite / "a/k.ktap").is_file()
    assert (suite / "ran").read_text() == "emu\n"


@pytest.mark.parametrize("var", ["KVMPY_BACKEND", "KVMPY_EMU_PROFILE", "KVMPY_REQUIRE_KVM"])
def test_plain_pytest_garbage_environment_is_a_usage_error(suite: Path, var: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVMPY_", "PYTEST_"))}
    env |= {var: "garbage", "MARK_FILE": str(suite / "ran")}
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "kvmpy.testing.plugin",
                        "-p", "no:cacheprovider", "test_marks.py"], cwd=suite, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == pytest.ExitCode.USAGE_ERROR, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert f"{var}: invalid value 'garbage'" in r.stderr
    assert not (suite / "ran").exists()


def test_auto_does_not_pick_a_device_that_is_not_kvm(tmp_path: Path) -> None:
    """/dev/null opens, so "auto" took it for KVM and every test then failed with ENOTTY."""
    ok, why = kvm_available("/dev/null")
    assert not ok and "/dev/null is not a KVM device" in why
    (tmp_path / "f").write_text("")
    assert not_a_kvm_device(str(tmp_path / "f")) == f"{tmp_path / 'f'} is a regular file, " \
        "not a KVM device"
    assert not_a_kvm_device(str(tmp_path / "missing")) is None  # absent KVM is a skip


def test_profile_choices_match_the_emulator() -> None:
    assert EMU_PROFILES == PROFILES


def test_caps_backend_error_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A device that opens but answers like no KVM (KvmError from the first ioctl), whatever
    the object layer makes of it: one line, exit 2."""
    from kvmpy.app import cli
    from kvmpy.errors import KvmError

    def broken(name: str) -> None:
        raise KvmError(25, "KVM_CHECK_EXTENSION", "cap=KVM_CAP_USER_MEMORY")

    monkeypatch.setattr(cli, "_backend", broken)
    monkeypatch.delenv("KVMPY_DEVICE", raising=False)
    with pytest.raises(SystemExit) as ei:
        cli.main(["caps"])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kvmpy caps: KVM_CHECK_EXTENSION failed")
