"""No /dev/kvm: a skip by default, a failure under the force switch; `kvmpy caps`."""

import json
import os
import re
import subprocess
import sys

import pytest

from kvmpy import Kvm, KvmUnavailable
from kvmpy.backend.host import HostBackend
from kvmpy.backend.select import kvm_available, kvm_summary
from kvmpy.uapi import Cap

PROBE_TEST = """
def test_needs_kvm(kvm):
    assert kvm.get_api_version() == 12
"""


def _run_pytest(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, *args: str,
                env: dict[str, str]) -> pytest.RunResult:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("KVMPY_BACKEND", raising=False)
    pytester.makepyfile(test_probe=PROBE_TEST)
    pytester.makeconftest('pytest_plugins = ["kvmpy.testing.plugin"]')
    return pytester.runpytest_subprocess("-rs", "--backend", "kvm", *args)


def test_missing_device_is_skip_by_default(pytester: pytest.Pytester,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    r = _run_pytest(pytester, monkeypatch, env={"KVMPY_DEVICE": "/nonexistent/kvm"})
    r.assert_outcomes(skipped=1)
    r.stdout.fnmatch_lines(["*real KVM unavailable: /nonexistent/kvm: No such file*"])


@pytest.mark.parametrize("how", ["option", "env"])
def test_missing_device_fails_when_required(pytester: pytest.Pytester,
                                            monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    env = {"KVMPY_DEVICE": "/nonexistent/kvm"}
    args: tuple[str, ...] = ()
    if how == "env":
        env["KVMPY_REQUIRE_KVM"] = "1"
    else:
        args = ("--require-kvm",)
    r = _run_pytest(pytester, monkeypatch, *args, env=env)
    r.assert_outcomes(errors=1)
    r.stdout.fnmatch_lines(["*real KVM unavailable*--require-kvm*"])


def test_header_kvm_line(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """pytest's header and `kvmpy run`'s share one KVM line (backend.select.kvm_summary)."""
    r = _run_pytest(pytester, monkeypatch, env={"KVMPY_DEVICE": "/nonexistent/kvm"})
    r.stdout.fnmatch_lines(["real KVM: unavailable: /nonexistent/kvm: No such file*"])
    assert kvm_summary("/dev/null").startswith("unavailable: /dev/null")
    if kvm_available()[0]:
        assert re.fullmatch(r"/dev/kvm, module kvm\w*( \S+=\S+)*", kvm_summary()), kvm_summary()


def test_kvm_unavailable_is_clear(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(KvmUnavailable, match="does not exist"):
        Kvm(HostBackend(device=os.path.join(tmp_path, "kvm")))


def _kvmpy(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmpy", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=60)


def test_caps_without_device_is_a_message_not_a_traceback(tmp_path: os.PathLike[str]) -> None:
    r = _kvmpy("caps", env={"KVMPY_DEVICE": os.path.join(tmp_path, "kvm")})
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_caps_json_matches_direct_probe(kvm: Kvm) -> None:
    if not kvm.backend.is_real:
        pytest.skip(f"`kvmpy caps` probes real /dev/kvm; the {kvm.backend.name} backend is not "
                    "(emulated caps are tested with the emulator)")
    r = _kvmpy("caps", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert set(d) >= {"system", "vm", "vm_types", "guest_memfd_flags"}
    for cap in (Cap.GUEST_MEMFD, Cap.MEMORY_ATTRIBUTES, Cap.VM_TYPES, Cap.GUEST_MEMFD_FLAGS,
                Cap.PRE_FAULT_MEMORY, Cap.EXIT_HYPERCALL):
        assert d["system"][f"KVM_CAP_{cap.name}"] == kvm.check_extension(cap)
    with kvm.create_vm() as vm:
        assert d["vm"]["KVM_CAP_GUEST_MEMFD"] == vm.check_extension(Cap.GUEST_MEMFD)
        assert d["guest_memfd_flags"] == vm.check_extension(Cap.GUEST_MEMFD_FLAGS)
    assert d["vm_types"] == [f"KVM_X86_{t.name}_VM" for t in kvm.vm_types()]


def test_caps_table_renders(kvm: Kvm) -> None:
    if not kvm.backend.is_real:
        pytest.skip(f"`kvmpy caps` table is checked against real /dev/kvm; "
                    f"the {kvm.backend.name} backend is not")
    r = _kvmpy("caps")
    assert r.returncode == 0, r.stderr
    assert "KVM_CAP_GUEST_MEMFD" in r.stdout and "VM types" in r.stdout
