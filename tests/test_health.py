"""The host-health plugin (kvmpy.testing.health), driven by a fake kernel log and taint file."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from kvmpy.testing.health import BAD_LINE, KmsgLog, taint_names

CASES = """
import os
import pytest

def log(line):
    with open(os.environ["KVMPY_KERNEL_LOG"], "a") as f:
        f.write(line + "\\n")

def test_quiet(backend_name):
    log("kvm: an ordinary informational line")

def test_warns(backend_name):
    log("------------[ cut here ]------------")
    log("WARNING: CPU: 1 PID: 4242 at arch/x86/kvm/mmu/mmu.c:6789 kvm_mmu_zap+0x1/0x2")
    log("RIP: 0010:kvm_mmu_zap+0x1/0x2")

def test_internal_error(backend_name):
    log("kvm [123]: KVM internal error. Suberror: 1")

def test_taints(backend_name):
    with open(os.environ["KVMPY_TAINT_FILE"], "w") as f:
        f.write("512\\n")

@pytest.fixture
def warns_at_teardown():
    yield
    log("BUG: unable to handle page fault for address: 0000000000001234")

def test_teardown_bug(backend_name, warns_at_teardown):
    pass

def test_fails_and_warns(backend_name):
    log("WARNING: CPU: 0 PID: 1 at virt/kvm/guest_memfd.c:100 kvm_gmem_bind+0x5/0x6")
    assert False, "the test's own failure"
"""


@pytest.fixture
def fake_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    log, taint = tmp_path / "kmsg.txt", tmp_path / "tainted"
    log.write_text("an old WARNING: CPU: 0 from before the run must not count\n")
    taint.write_text("0\n")
    monkeypatch.setenv("KVMPY_KERNEL_LOG", str(log))
    monkeypatch.setenv("KVMPY_TAINT_FILE", str(taint))
    return log, taint


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    pytester.makeconftest('pytest_plugins = ["kvmpy.testing.plugin", "kvmpy.testing.health"]')
    pytester.makepyfile(test_cases=CASES)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rfE", *args)


def test_real_kvm_tests_fail_on_kernel_warnings(pytester: pytest.Pytester,
                                                fake_kernel: tuple[Path, Path]) -> None:
    r = _run(pytester, "--backend", "kvm", "-k", "not taints")
    r.assert_outcomes(passed=2, failed=3, errors=1)
    out = r.stdout.str()
    assert "kvmpy host health: kernel logged 'WARNING: CPU: 1 PID: 4242 at arch/x86/kvm/" in out
    # The lines themselves are shown, from the first bad one on.
    r.stdout.fnmatch_lines(["*WARNING: CPU: 1 PID: 4242 at arch/x86/kvm/mmu/mmu.c:6789*",
                            "*RIP: 0010:kvm_mmu_zap*"])
    r.stdout.fnmatch_lines(["*KVM internal error. Suberror: 1*"])
    # A WARN after the test body (in teardown) makes the teardown an error.
    r.stdout.fnmatch_lines(["ERROR test_cases.py::test_teardown_bug[[]kvm[]]*"])
    r.stdout.fnmatch_lines(["*BUG: unable to handle page fault*"])
    # A test that fails on its own keeps its message; the health lines come with it.
    r.stdout.fnmatch_lines(["FAILED test_cases.py::test_fails_and_warns[[]kvm[]] - "
                            "AssertionError: the test's*"])
    r.stdout.fnmatch_lines(["*kvm_gmem_bind+0x5/0x6*"])
    assert "must not count" not in out
    r.stdout.fnmatch_lines(["host health: kernel log */kmsg.txt readable*"])


def test_taint_is_a_failure(pytester: pytest.Pytester, fake_kernel: tuple[Path, Path]) -> None:
    r = _run(pytester, "--backend", "kvm", "-k", "taints")
    r.assert_outcomes(failed=1)
    r.stdout.fnmatch_lines(["*kernel became tainted during this test on real KVM: 0x0 -> 0x200, "
                            "new: W (kernel issued a warning)*"])


def test_emulated_backend_is_not_checked(pytester: pytest.Pytester,
                                         fake_kernel: tuple[Path, Path]) -> None:
    r = _run(pytester, "--backend", "emu")
    r.assert_outcomes(passed=5, failed=1)  # only the test's own assertion
    assert "host health" not in r.stdout.str().replace("kvmpy host health: off", "")


def test_switch_off(pytester: pytest.Pytester, fake_kernel: tuple[Path, Path]) -> None:
    r = _run(pytester, "--backend", "kvm", "--no-host-health")
    r.assert_outcomes(passed=5, failed=1)


def test_unreadable_log_is_said_once_and_taint_still_checked(
        pytester: pytest.Pytester, fake_kernel: tuple[Path, Path],
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-log"
    monkeypatch.setenv("KVMPY_KERNEL_LOG", str(missing))
    pytester.makeconftest('pytest_plugins = ["kvmpy.testing.plugin", "kvmpy.testing.health"]')
    pytester.makepyfile(test_cases="""
import os
def test_taints(backend_name):
    with open(os.environ["KVMPY_TAINT_FILE"], "w") as f:
        f.write("128\\n")
""")
    # Under xdist (the header is the controller's); one test, since taint is global and would be
    # blamed on a concurrent test too.
    r = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--backend", "kvm", "-n", "2")
    r.assert_outcomes(failed=1)
    out = r.stdout.str()
    assert out.count("kernel log NOT readable") == 1
    assert f"{missing}: No such file or directory" in out
    r.stdout.fnmatch_lines(["*new: D (kernel died recently: OOPS or BUG)*"])


@pytest.mark.parametrize("line", [
    "WARNING: CPU: 3 PID: 77 at arch/x86/kvm/x86.c:1 kvm_arch_vcpu_ioctl_run+0x1/0x2",
    "kernel BUG at mm/filemap.c:1234!",
    "BUG: KASAN: slab-use-after-free in kvm_gmem_release+0x1/0x2",
    "Oops: general protection fault, probably for non-canonical address 0xdead: 0000 [#1]",
    "UBSAN: shift-out-of-bounds in arch/x86/kvm/mmu/mmu.c:10:20",
    "kvm: KVM internal error. Suberror: 3",
])
def test_bad_line_patterns(line: str) -> None:
    assert BAD_LINE.search(line)


@pytest.mark.parametrize("line", [
    "kvm_amd: TSC scaling supported", "kvm: x86/mmu: Using TDP MMU",
    "Memory: 1984K/2097152K available", "audit: type=1400 apparmor=\"DENIED\"",
])
def test_ordinary_lines_pass(line: str) -> None:
    assert not BAD_LINE.search(line)


def test_taint_names() -> None:
    assert taint_names(0) == []
    assert taint_names(1 << 9 | 1 << 7) == ["D (kernel died recently: OOPS or BUG)",
                                            "W (kernel issued a warning)"]
    assert taint_names(1 << 40) == ["bit 40"]


def test_kmsg_reader_on_this_kernel() -> None:
    """The real /dev/kmsg reader sees a line written after mark() and nothing from before."""
    try:
        log = KmsgLog()
        w = os.open("/dev/kmsg", os.O_WRONLY)
    except OSError as e:
        pytest.skip(f"/dev/kmsg not readable and writable here: {e.strerror}")
    try:
        os.write(w, f"<6>kvmpy health self-test before {uuid.uuid4()}\n".encode())
        log.mark()
        token = str(uuid.uuid4())
        os.write(w, f"<6>kvmpy health self-test {token}\n".encode())
        lines = log.read_new()
    finally:
        os.close(w)
        log.close()
    assert f"kvmpy health self-test {token}" in lines
    assert not any("self-test before" in x for x in lines)
