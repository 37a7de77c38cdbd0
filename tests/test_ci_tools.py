"""ci/: the VM runner's pieces (bzImage version, initramfs, verdicts), compare-results,
build-kernel's argument and config checks, and a real boot that must be reported as a panic."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import lzma
import shutil
import struct
import subprocess
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CI = REPO / "ci"
SHARED_KERNEL = REPO.parent / "shared/kernels/linux-6.12.117-sw-protected/bzImage"


def load_script(name: str) -> types.ModuleType:
    loader = importlib.machinery.SourceFileLoader(name.replace("-", "_"), str(CI / name))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


vm_run = load_script("vm-run")


def fake_bzimage(path: Path, version: str) -> Path:
    img = bytearray(0x4000)
    img[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", img, 0x20E, 0x1000)
    ver = version.encode() + b"\0"
    img[0x1200:0x1200 + len(ver)] = ver
    path.write_bytes(bytes(img))
    return path


def test_kernel_version_from_setup_header(tmp_path: Path) -> None:
    img = fake_bzimage(tmp_path / "bzImage", "6.12.117 (root@vm) #3 SMP")
    assert vm_run.kernel_version(img) == "6.12.117 (root@vm) #3 SMP"
    (tmp_path / "junk").write_bytes(b"\0" * 0x1000)
    with pytest.raises(SystemExit, match="not an x86 bzImage"):
        vm_run.kernel_version(tmp_path / "junk")


def test_kernel_version_of_the_shared_kernel() -> None:
    if not SHARED_KERNEL.exists():
        pytest.skip(f"{SHARED_KERNEL} not present (CI clones main with shared/ beside it)")
    assert vm_run.kernel_version(SHARED_KERNEL).startswith("6.12.117 ")


def test_initramfs_is_a_valid_newc_archive(tmp_path: Path) -> None:
    if not shutil.which("cpio"):
        pytest.skip("cpio(1) not installed: cannot cross-check the archive")
    bb = tmp_path / "busybox"
    bb.write_bytes(b"\x7fELF-not-really")
    out = tmp_path / "initramfs.cpio"
    vm_run.build_initramfs(out, bb, [("kvm", b"module-bytes")], Path("/work/repo"), 99, "1G")
    listing = subprocess.run(["cpio", "-itv"], input=out.read_bytes(), capture_output=True,
                             check=True).stdout.decode()
    for name in ("init", "bin/busybox", "modules.order", "lib/modules/kvm.ko"):
        assert any(line.endswith(" " + name) for line in listing.splitlines()), name
    extract = tmp_path / "x"
    extract.mkdir()
    subprocess.run(["cpio", "-id", "--quiet"], input=out.read_bytes(), cwd=extract, check=True)
    init = (extract / "init").read_text()
    assert init.startswith("#!/bin/busybox sh")
    assert "lowerdir=$R/work/repo" in init and "timeout -s KILL 99 chroot" in init
    assert (extract / "lib/modules/kvm.ko").read_bytes() == b"module-bytes"
    assert (extract / "init").stat().st_mode & 0o111


def fake_module(depends: list[str]) -> bytes:
    """A minimal ELF64 object with a .modinfo section, as a kernel module has."""
    modinfo = b"license=GPL\0depends=" + ",".join(depends).encode() + b"\0vermagic=6.12\0"
    shstr = b"\0.modinfo\0.shstrtab\0"
    data_off = 64
    shstr_off = data_off + len(modinfo)
    shoff = (shstr_off + len(shstr) + 7) & ~7
    hdr = bytearray(64)
    hdr[:4] = b"\x7fELF"
    struct.pack_into("<Q", hdr, 0x28, shoff)
    struct.pack_into("<HHH", hdr, 0x3A, 64, 3, 2)
    sections = [bytes(64),
                struct.pack("<IIQQQQIIQQ", 1, 1, 0, 0, data_off, len(modinfo), 0, 0, 1, 0),
                struct.pack("<IIQQQQIIQQ", 10, 3, 0, 0, shstr_off, len(shstr), 0, 0, 1, 0)]
    body = bytes(hdr) + modinfo + shstr
    return body + bytes(shoff - len(body)) + b"".join(sections)


def test_modules_load_after_their_dependencies(tmp_path: Path) -> None:
    d = tmp_path / "lib/modules/6.12.0"
    (d / "kernel/fs").mkdir(parents=True)
    mods = {"netfs": [], "9pnet": [], "9p": ["netfs", "9pnet"], "9pnet_virtio": ["9pnet"],
            "kvm": ["irqbypass"], "irqbypass": [], "kvm-amd": ["kvm"], "unrelated": []}
    for name, deps in mods.items():
        (d / f"kernel/fs/{name}.ko.xz").write_bytes(lzma.compress(fake_module(deps)))
    names = [n for n, _ in vm_run.module_files(d)]
    assert "unrelated" not in names and "kvm_amd" in names
    assert names.index("netfs") < names.index("9p") and names.index("9pnet") < names.index("9p")
    assert names.index("9pnet") < names.index("9pnet_virtio")
    assert names.index("irqbypass") < names.index("kvm") < names.index("kvm_amd")
    assert vm_run.modinfo_depends(fake_module(["a", "b-c"])) == ["a", "b_c"]


def test_console_scan_finds_markers_and_panics() -> None:
    o = vm_run.Outcome()
    for line in ["[    1.0] Linux version 6.12.117", f"{vm_run.MARK} BOOTED 6.12.117 4.20",
                 f"{vm_run.MARK} PYTEST-START 5.00",
                 "[   9.0] Kernel panic - not syncing: Attempted to kill init! exitcode=0x0000000b",
                 "[   8.0] BUG: kernel NULL pointer dereference, address: 0000000000000008"]:
        vm_run.scan(line, o, 0.0)
    assert o.guest_release == "6.12.117" and o.guest_boot_uptime == 4.2
    assert o.pytest_start_uptime == 5.0 and o.exit_rc is None
    assert o.panic and "Attempted to kill init" in o.panic[0]
    assert o.oops and "NULL pointer" in o.oops[0]
    vm_run.scan(f"{vm_run.MARK} EXIT 4", o, 0.0)
    assert o.exit_rc == 4


def test_vm_run_refuses_a_missing_kernel(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(CI / "vm-run"), "--kernel", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "does not exist" in r.stdout


def _qemu_or_skip() -> None:
    if not shutil.which("qemu-system-x86_64"):
        pytest.skip("qemu-system-x86_64 not installed (apt-get install qemu-system-x86)")
    if not SHARED_KERNEL.exists():
        pytest.skip(f"{SHARED_KERNEL} not present")


@pytest.mark.slow
def test_guest_panic_is_reported_as_such(tmp_path: Path) -> None:
    """A real boot whose init cannot run: the kernel panics; vm-run must say so and exit 3."""
    _qemu_or_skip()
    r = subprocess.run([sys.executable, str(CI / "vm-run"), "--kernel", str(SHARED_KERNEL),
                        "--results", str(tmp_path), "--append", "rdinit=/no/such/init init=/none",
                        "--boot-timeout", "120", "--timeout", "180", "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "GUEST KERNEL PANIC" in r.stdout
    assert (tmp_path / "console.log").exists()
    assert '"exit": 3' in (tmp_path / "vm-run.json").read_text()


def test_boot_timeout_is_reported_and_qemu_killed(tmp_path: Path) -> None:
    _qemu_or_skip()
    r = subprocess.run([sys.executable, str(CI / "vm-run"), "--kernel", str(SHARED_KERNEL),
                        "--results", str(tmp_path), "--boot-timeout", "1", "--quiet"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 124, r.stdout + r.stderr
    assert "TIMEOUT: the guest did not boot within 1 s" in r.stdout
    assert subprocess.run(["pgrep", "-f", f"path={tmp_path},mount_tag=results"],
                          capture_output=True).returncode == 1, "QEMU left running"


# -- compare-results ---------------------------------------------------------------------------

def junit(path: Path, cases: dict[str, str], classname: str = "selftests.test_a") -> Path:
    body = []
    for name, outcome in cases.items():
        inner = {"pass": "", "fail": '<failure message="boom">x</failure>',
                 "error": '<error message="setup">x</error>',
                 "xfail": '<skipped type="pytest.xfail" message="known" />'}.get(outcome)
        if inner is None:
            inner = f'<skipped type="pytest.skip" message="{outcome[5:]}" />'
        body.append(f'<testcase classname="{classname}" name="{name}">{inner}</testcase>')
    path.write_text(f'<testsuites><testsuite name="pytest">{"".join(body)}</testsuite>'
                    f"</testsuites>")
    return path


def compare(tmp_path: Path, kvm: dict[str, str], emu: dict[str, str],
            classname: str = "selftests.test_a") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(CI / "compare-results"),
                           str(junit(tmp_path / "k.xml", kvm, classname)),
                           str(junit(tmp_path / "e.xml", emu, classname)),
                           "--report", str(tmp_path / "r.txt")],
                          capture_output=True, text=True, timeout=60)


def test_compare_agreeing_runs(tmp_path: Path) -> None:
    r = compare(tmp_path, {"t[default-kvm]": "pass", "u[kvm]": "xfail",
                           "v[kvm]": "skip:hugetlb pages: HugePages_Free=0"},
                {"t[default-emu]": "pass", "u[emu]": "xfail", "v[emu]": "pass"})
    assert r.returncode == 0, r.stdout
    assert ("agree: 2; disagree: 0; known kernel issues: 0; skipped on one side only for a "
            "non-KVM reason: 1") in r.stdout
    assert (tmp_path / "r.txt").read_text() == r.stdout


def test_compare_outcome_disagreement_fails(tmp_path: Path) -> None:
    r = compare(tmp_path, {"t[sw_protected-kvm]": "pass", "u[kvm]": "error"},
                {"t[sw_protected-emu]": "fail", "u[emu]": "pass"})
    assert r.returncode == 1
    assert "DISAGREE selftests.test_a::t[sw_protected]: kvm pass | emu fail: boom" in r.stdout
    assert "DISAGREE selftests.test_a::u: kvm error: setup | emu pass" in r.stdout


def test_compare_capability_mismatch_fails(tmp_path: Path) -> None:
    r = compare(tmp_path, {"t[kvm]": "skip:KVM_CAP_PRE_FAULT_MEMORY=0x0 on real KVM"},
                {"t[emu]": "pass"})
    assert r.returncode == 1
    assert "CAPABILITY MISMATCH selftests.test_a::t" in r.stdout


def test_compare_reports_a_known_kernel_issue_not_a_disagreement(tmp_path: Path) -> None:
    """An xfail on real KVM of a case in kvmpy/testing/known_issues.py (the stale MMIO SPTE)
    against a pass on the emulator is a known kernel issue; a failure there is still a
    disagreement, and an xfail of a case that is not a known issue stays an agreement."""
    name = "test_private_noslot_gpa_after_mmio_exit_is_memory_fault"
    r = compare(tmp_path, {f"{name}[kvm]": "xfail"}, {f"{name}[emu]": "pass"},
                classname="selftests.test_known_issue_mmio_spte")
    assert r.returncode == 0, r.stdout
    assert "known kernel issues: 1" in r.stdout
    assert (f"KNOWN ISSUE selftests.test_known_issue_mmio_spte::{name}: kvm xfail "
            "(stale MMIO SPTE) | emu pass") in r.stdout
    r = compare(tmp_path, {f"{name}[kvm]": "fail"}, {f"{name}[emu]": "pass"},
                classname="selftests.test_known_issue_mmio_spte")
    assert r.returncode == 1 and "DISAGREE" in r.stdout


# -- compare-profiles --------------------------------------------------------------------------

def test_compare_profiles(tmp_path: Path) -> None:
    import json

    base = {"name": "x", "system_caps": {"GUEST_MEMFD": 1, "NR_VCPUS": 2},
            "vm_caps": {"DEFAULT": {"GUEST_MEMFD_FLAGS": 3}}, "max_gpa_bits": 40}
    (tmp_path / "r.json").write_text(json.dumps({**base, "name": "host"}))
    same = {**base, "system_caps": {"GUEST_MEMFD": 1, "NR_VCPUS": 4}}
    (tmp_path / "e.json").write_text(json.dumps(same))

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(CI / "compare-profiles"),
                               str(tmp_path / "r.json"), str(tmp_path / "e.json")],
                              capture_output=True, text=True, timeout=60)

    r = run()
    assert r.returncode == 0, r.stdout
    assert "machine-dependent" in r.stdout and "NR_VCPUS" in r.stdout
    (tmp_path / "e.json").write_text(json.dumps(
        {**same, "vm_caps": {"DEFAULT": {"GUEST_MEMFD_FLAGS": 1}}}))
    r = run()
    assert r.returncode == 1
    assert "vm_caps.DEFAULT.GUEST_MEMFD_FLAGS: real 3 | emulator 1" in r.stdout


def test_emulator_7_3_profile_matches_the_measured_kernel() -> None:
    """The 7.3 profile answers what ../shared/kernels/linux-7.3.4-sw-protected/README.md
    measured in the VM (CI checks every answer with compare-profiles)."""
    from kvmpy.backend.emu.profiles import get_profile, profile_answers

    a = profile_answers(get_profile("7.3"))
    assert a["vm_types"] == 0x3
    assert [a["system_caps"][c] for c in ("GUEST_MEMFD", "GUEST_MEMFD_FLAGS",
                                           "MEMORY_ATTRIBUTES", "PRE_FAULT_MEMORY",
                                           "EXIT_HYPERCALL", "USER_MEMORY2",
                                           "MEMORY_FAULT_INFO")] == [1, 3, 8, 1, 0x1000, 1, 1]
    d, sw = a["vm_caps"]["DEFAULT"], a["vm_caps"]["SW_PROTECTED"]
    assert (d["GUEST_MEMFD"], d["GUEST_MEMFD_FLAGS"], d["MEMORY_ATTRIBUTES"]) == (1, 3, 0)
    assert (sw["GUEST_MEMFD"], sw["GUEST_MEMFD_FLAGS"], sw["MEMORY_ATTRIBUTES"]) == (1, 1, 8)
    assert a["errnos"]["gmem_overlap"] == "EEXIST"


# -- vm-run's machine ------------------------------------------------------------------------

def test_numa_options_split_memory_and_cpus() -> None:
    assert vm_run.numa_options(1, "3G", 2) == []
    opts = vm_run.numa_options(2, "3G", 2)
    assert opts == ["-object", "memory-backend-ram,id=m0,size=1536M",
                    "-numa", "node,nodeid=0,memdev=m0,cpus=0",
                    "-object", "memory-backend-ram,id=m1,size=1536M",
                    "-numa", "node,nodeid=1,memdev=m1,cpus=1"]
    assert vm_run.memory_mib("3072M") == vm_run.memory_mib("3G") == 3072
    with pytest.raises(SystemExit):
        vm_run.numa_options(3, "3G", 2)


def test_dry_run_offers_numa_and_hugepages(tmp_path: Path) -> None:
    if not shutil.which("qemu-system-x86_64") or not (REPO / ".venv/bin/kvmpy").exists():
        pytest.skip("needs qemu-system-x86_64 and the venv")
    kernel = fake_bzimage(tmp_path / "bzImage", "7.3.4 (test) #1")
    r = subprocess.run([sys.executable, str(CI / "vm-run"), "--kernel", str(kernel),
                        "--results", str(tmp_path / "res"), "--dry-run"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "-numa node,nodeid=1,memdev=m1,cpus=1" in r.stdout
    assert "hugepages=64" in r.stdout


def test_compare_vm_type_in_the_location_is_not_a_capability(tmp_path: Path) -> None:
    """The emulator skipping for something it does not model, on a DEFAULT VM: the VM type is
    where, not what is missing (seen on 7.3: KVM_GET_STATS_FD)."""
    r = compare(tmp_path, {"t[default-kvm]": "pass"},
                {"t[default-emu]": "skip:KVM_GET_STATS_FD failed: ENOTTY on a "
                                   "KVM_X86_DEFAULT_VM on emulated KVM"})
    assert r.returncode == 0, r.stdout
    assert "skipped on one side only for a non-KVM reason: 1" in r.stdout


def test_compare_nothing_in_common_is_an_error(tmp_path: Path) -> None:
    r = compare(tmp_path, {"t[kvm]": "pass"}, {"other[emu]": "pass"})
    assert r.returncode == 2


# -- build-kernel ------------------------------------------------------------------------------

def test_build_kernel_rejects_a_non_kernel_tree(tmp_path: Path) -> None:
    r = subprocess.run([str(CI / "build-kernel"), "--source", str(tmp_path), "--config-only"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "not a kernel source tree" in r.stderr or "missing tools" in r.stderr


# -- build-selftests ---------------------------------------------------------------------------

def build_selftests(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CI / "build-selftests"), *args], capture_output=True, text=True,
                          timeout=60)


def fake_kernel_tree(root: Path) -> Path:
    kvm = root / "tools" / "testing" / "selftests" / "kvm"
    (kvm / "x86_64").mkdir(parents=True)
    (root / "Makefile").write_text("kernelversion:\n\t@echo 6.12.0\n")
    (kvm / "Makefile").write_text("")
    for t in ("guest_memfd_test", "x86_64/private_mem_kvm_exits_test"):
        (kvm / f"{t}.c").write_text("")
    return root


def test_build_selftests_needs_source_and_out(tmp_path: Path) -> None:
    r = build_selftests("--source", str(tmp_path))
    assert r.returncode == 2 and "--source and --out are required" in r.stderr


def test_build_selftests_rejects_a_non_kernel_tree(tmp_path: Path) -> None:
    r = build_selftests("--source", str(tmp_path), "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert "not a kernel source tree" in r.stderr or "missing tools" in r.stderr


def test_build_selftests_rejects_an_extra_that_is_not_c(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("")
    r = build_selftests("--source", str(fake_kernel_tree(tmp_path / "k")), "--out",
                        str(tmp_path / "o"), "--extra", str(tmp_path / "x.txt"))
    assert r.returncode == 2
    assert "is not a .c file" in r.stderr or "missing tools" in r.stderr


def test_build_selftests_names_a_test_the_tree_lacks(tmp_path: Path) -> None:
    """x86/NAME maps to x86_64/NAME on a pre-6.13 tree; a name in neither fails before make."""
    tree = fake_kernel_tree(tmp_path / "k")
    r = build_selftests("--source", str(tree), "--out", str(tmp_path / "o"), "--tests",
                        "x86/private_mem_kvm_exits_test x86/no_such_test")
    assert r.returncode == 2
    assert ("x86_64/no_such_test.c is not in" in r.stderr and "6.12.0" in r.stderr) or \
        "missing tools" in r.stderr


def test_kernel_fragment_asks_for_what_the_suite_needs() -> None:
    text = (CI / "kernel.config").read_text()
    for sym in ("CONFIG_KVM_SW_PROTECTED_VM=y", "CONFIG_EXPERT=y", "CONFIG_KVM_AMD=y",
                "CONFIG_KVM_INTEL=y", "CONFIG_9P_FS=y", "CONFIG_NET_9P_VIRTIO=y",
                "CONFIG_VIRTIO_PCI=y", "CONFIG_OVERLAY_FS=y", "CONFIG_SERIAL_8250_CONSOLE=y"):
        assert f"\n{sym}\n" in text, sym


def test_shared_kernel_config_satisfies_the_fragment() -> None:
    """The prebuilt kernel's config has every symbol the fragment needs for the suite and for
    booting under vm-run (the fragment's extras for a fuller upstream config are not checked)."""
    config = SHARED_KERNEL.with_name("config")
    if not config.exists():
        pytest.skip(f"{config} not present")
    have = config.read_text()
    needed = ["CONFIG_KVM_SW_PROTECTED_VM=y", "CONFIG_KVM_AMD=y", "CONFIG_9P_FS=y",
              "CONFIG_NET_9P_VIRTIO=y", "CONFIG_OVERLAY_FS=y", "CONFIG_DEVTMPFS=y",
              "CONFIG_TMPFS=y", "CONFIG_SERIAL_8250_CONSOLE=y", "CONFIG_BLK_DEV_INITRD=y"]
    for sym in needed:
        assert f"\n{sym}\n" in have, sym


# -- kernel-mutants: the campaign's bookkeeping, with a fake make and a fake vm-run -------------

kernel_mutants = load_script("kernel-mutants")

FAKE_MAKE = r'''import sys, pathlib
args = sys.argv[1:]
src = pathlib.Path(args[args.index("-C") + 1])
obj = pathlib.Path(next(a[2:] for a in args if a.startswith("O=")))
if "bzImage" in args:
    text = (src / "kvm.c").read_text()
    if "broken" in text:
        print("kvm.c:1: error: broken"); sys.exit(2)
    img = obj / "arch/x86/boot/bzImage"
    if img.exists() and img.read_text() == text:
        sys.exit(0)  # up to date, like make
    img.parent.mkdir(parents=True, exist_ok=True)
    img.write_text(text)
    with open(obj / "builds", "a") as f:
        f.write(text)
'''

FAKE_VM_RUN = r'''import json, os, pathlib, signal, sys
args = sys.argv[1:]
kernel = pathlib.Path(args[args.index("--kernel") + 1]).read_text().strip()
res = pathlib.Path(args[args.index("--results") + 1]); res.mkdir(parents=True, exist_ok=True)
assert "-x" in args and "not default" in args, args
die = pathlib.Path(os.environ["FAKE_DIE_ONCE"])
if kernel == "die" and die.exists():
    die.unlink(); os.kill(os.getppid(), signal.SIGKILL); sys.exit(9)
case = {"fail": '<failure message="boom"/>', "cap": '<skipped message="KVM_CAP_X=0 here"/>',
        "slow": '<failure message="Failed: Timeout (&gt;180.0s) from pytest-timeout."/>'}
assert args[args.index("--timeout", args.index("--") + 1) + 1] == "180", args
inner = case.get(kernel, "")
(res / "junit.xml").write_text(
    '<testsuites><testsuite><testcase classname="selftests.test_a" name="t[sw_protected-kvm]">'
    + inner + "</testcase></testsuite></testsuites>")
(res / "console.log").write_text("[3/9] pass 2 fail 0 skip 0 5s  selftests/test_a.py::t[x]\n")
rc = {"fail": 1, "slow": 1, "hang": 124, "panic": 3, "noboot": 3}.get(kernel, 0)
rel = "" if kernel == "noboot" else "6.12.117"
json.dump({"status": f"fake {kernel}", "guest_release": rel}, open(res / "vm-run.json", "w"))
sys.exit(rc)
'''


def _mutant_campaign(tmp_path: Path) -> tuple[list[str], Path]:
    src = tmp_path / "linux"
    src.mkdir()
    (src / "Makefile").write_text("# fake\n")
    (src / "kvm.c").write_text("base\n")
    pdir = tmp_path / "mutants"
    pdir.mkdir()
    for name, new in [("001-fails", "fail"), ("002-passes", "pass"), ("003-broken", "broken"),
                      ("004-cap-lost", "cap"), ("005-hangs", "hang"), ("006-panics", "panic"),
                      ("007-no-boot", "noboot"), ("008-dies", "die"), ("010-slow", "slow")]:
        (pdir / f"{name}.patch").write_text(
            f"{name}: one line\n\n--- a/kvm.c\n+++ b/kvm.c\n@@ -1 +1 @@\n-base\n+{new}\n")
    (pdir / "009-stale.patch").write_text(
        "does not apply\n\n--- a/kvm.c\n+++ b/kvm.c\n@@ -1 +1 @@\n-other\n+x\n")
    (tmp_path / "make.py").write_text(FAKE_MAKE)
    (tmp_path / "vm.py").write_text(FAKE_VM_RUN)
    emu = junit(tmp_path / "emu.xml", {"t[sw_protected-emu]": "pass"})
    cfg = tmp_path / "config"
    cfg.write_text("CONFIG_KVM=y\n")
    argv = [sys.executable, str(CI / "kernel-mutants"), "--source", str(src), "--patches",
            str(pdir), "--obj", str(tmp_path / "obj"), "--config", str(cfg), "--results",
            str(tmp_path / "res"), "--make", f"{sys.executable} {tmp_path / 'make.py'}",
            "--vm-run", f"{sys.executable} {tmp_path / 'vm.py'}", "--emu-junit", str(emu),
            "--timeout", "60", "--test-timeout", "180"]
    return argv, src


def test_kernel_mutants_verdicts_resume_and_revert(tmp_path: Path) -> None:
    if not shutil.which("patch"):
        pytest.skip("patch(1) not installed")
    argv, src = _mutant_campaign(tmp_path)
    env = {**__import__("os").environ, "FAKE_DIE_ONCE": str(tmp_path / "die-once")}
    (tmp_path / "die-once").touch()
    # First run: killed (SIGKILL from the fake vm-run) while 008 is applied.
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == -9, r.stdout + r.stderr
    assert (src / "kvm.c").read_text() == "die\n"
    assert (tmp_path / "res/applied.txt").read_text().strip() == "008-dies.patch"
    done = kernel_mutants.load_results(tmp_path / "res/results.json")
    assert sorted(done) == [f"00{i}-{n}" for i, n in enumerate(
        ["fails", "passes", "broken", "cap-lost", "hangs", "panics", "no-boot"], 1)]
    # Second run: reverts 008, skips the seven scored, scores 008 and 009.
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "reverting 008-dies.patch" in r.stdout
    assert r.stdout.count("already scored") == 7
    assert (src / "kvm.c").read_text() == "base\n"
    assert not (tmp_path / "res/applied.txt").exists()
    res = kernel_mutants.load_results(tmp_path / "res/results.json")
    verdicts = {k: v["verdict"] for k, v in res.items()}
    assert verdicts == {"001-fails": "killed", "002-passes": "survived",
                        "003-broken": "build-failed", "004-cap-lost": "killed-by-compare",
                        "005-hangs": "killed-by-timeout", "006-panics": "killed-by-crash",
                        "007-no-boot": "boot-failed", "008-dies": "survived",
                        "009-stale": "apply-failed", "010-slow": "killed-by-timeout"}
    assert res["001-fails"]["killed_by"] == ["selftests/test_a.py::t[sw_protected-kvm]"]
    assert res["004-cap-lost"]["killed_by"] == [
        "CAPABILITY MISMATCH selftests.test_a::t[sw_protected]"]
    assert res["001-fails"]["description"] == "001-fails: one line"
    assert "last progress line: selftests/test_a.py::t[x]" in res["006-panics"]["note"]
    # the baseline was built, then each mutant that applied; after the interruption the
    # reverted tree is built again before 008 is scored again
    assert (tmp_path / "obj/builds").read_text().split() == [
        "base", "fail", "pass", "cap", "hang", "panic", "noboot", "die", "base", "die", "slow"]
    # 5 kills of 7 that built and booted (boot-, build- and apply-failed do not count)
    assert "score: 5 of 7 built-and-booted mutants killed (71%)" in r.stdout
    assert "| 001-fails | killed | selftests/test_a.py::t[sw_protected-kvm] |" in r.stdout
    t = subprocess.run([*argv[:2], "--results", str(tmp_path / "res"), "--table"],
                       capture_output=True, text=True, timeout=60)
    assert t.returncode == 0 and t.stdout == (tmp_path / "res/table.md").read_text()
    # --rescore forgets these verdicts and scores only those mutants again, in the order given
    r = subprocess.run([*argv, "--rescore", "004-cap-lost", "002-passes"], capture_output=True,
                       text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stdout
    assert r.stdout.index("[1/2] 004-cap-lost") < r.stdout.index("[2/2] 002-passes"), r.stdout
    assert len(kernel_mutants.load_results(tmp_path / "res/results.json")) == 10


def test_kernel_mutants_score_and_failing_tests(tmp_path: Path) -> None:
    res = {"a": {"verdict": "killed"}, "b": {"verdict": "survived"},
           "c": {"verdict": "build-failed"}, "d": {"verdict": "killed-by-timeout"}}
    assert kernel_mutants.score(res) == (2, 3)
    j = junit(tmp_path / "j.xml", {"x[kvm]": "fail", "y[kvm]": "pass", "z[kvm]": "error"})
    assert kernel_mutants.failing_tests(j) == ["selftests/test_a.py::x[kvm]",
                                               "selftests/test_a.py::z[kvm]"]
    assert kernel_mutants.failing_tests(tmp_path / "missing.xml") == []
