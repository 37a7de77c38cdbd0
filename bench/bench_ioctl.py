"""ioctl overhead: kvmpy's checked call against the raw syscall (pytest-benchmark).

    .venv/bin/pytest bench/bench_ioctl.py -m bench --backend kvm

The same cheap ioctl, KVM_CHECK_EXTENSION(KVM_CAP_USER_MEMORY) on the /dev/kvm fd, issued
four ways: kvmpy's object layer (Kvm.check_extension: checked_ioctl, errno -> KvmError, the
backend seam), the backend seam alone (Backend.ioctl), libc ioctl(2) through ctypes, and a C
loop (the syscall itself, no Python: ns per call in extra_info). On the emulated KVM only the
first two apply (there is no syscall behind them): the raw ones skip there.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from kvmpy.backend import default_device
from kvmpy.system import Kvm
from kvmpy.uapi import Cap, Ioctl

pytestmark = pytest.mark.bench

C_LOOP = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <time.h>
int main(int argc, char **argv)
{
	int fd = open(argv[1], O_RDWR | O_CLOEXEC);
	unsigned long req = strtoul(argv[2], 0, 0), arg = strtoul(argv[3], 0, 0);
	long n = atol(argv[4]), i;
	struct timespec a, b;
	if (fd < 0) { perror(argv[1]); return 2; }
	clock_gettime(CLOCK_MONOTONIC, &a);
	for (i = 0; i < n; i++)
		if (ioctl(fd, req, arg) < 0) { perror("ioctl"); return 3; }
	clock_gettime(CLOCK_MONOTONIC, &b);
	printf("%.1f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
	return 0;
}
"""


def test_ioctl_kvmpy_checked(benchmark: Any, kvm: Kvm) -> None:
    """Kvm.check_extension: the object layer's checked call."""
    assert benchmark(kvm.check_extension, Cap.USER_MEMORY) == 1
    benchmark.extra_info["backend"] = kvm.backend.describe()


def test_ioctl_backend_seam(benchmark: Any, kvm: Kvm) -> None:
    """Backend.ioctl with the request number: the seam without kvmpy's error layer."""
    b, fd = kvm.backend, kvm.fd
    assert benchmark(b.ioctl, fd, Ioctl.KVM_CHECK_EXTENSION, int(Cap.USER_MEMORY)) == 1
    benchmark.extra_info["backend"] = b.describe()


def _require_real(kvm: Kvm) -> None:
    if not kvm.backend.is_real:
        pytest.skip(f"raw ioctl(2) needs a real /dev/kvm; {kvm.backend.describe()} has no "
                    "syscall behind it")


def test_ioctl_raw_libc(benchmark: Any, kvm: Kvm) -> None:
    """libc ioctl(2) through ctypes: the floor for any Python caller."""
    _require_real(kvm)
    libc = ctypes.CDLL(None, use_errno=True)
    ioctl = libc.ioctl
    ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
    ioctl.restype = ctypes.c_int
    fd, req, arg = kvm.fd, int(Ioctl.KVM_CHECK_EXTENSION), int(Cap.USER_MEMORY)
    assert benchmark(ioctl, fd, req, arg) == 1


def test_ioctl_c_loop(benchmark: Any, kvm: Kvm, tmp_path: Path) -> None:
    """The syscall from C, 200000 calls per round: ns per call in extra_info."""
    _require_real(kvm)
    src = tmp_path / "ioctl_loop.c"
    exe = tmp_path / "ioctl_loop"
    src.write_text(C_LOOP)
    try:
        subprocess.run(["gcc", "-O2", "-o", str(exe), str(src)], check=True,
                       capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot build the C baseline with gcc: {e}")
    n = 200_000
    cmd = [str(exe), default_device(), hex(int(Ioctl.KVM_CHECK_EXTENSION)),
           str(int(Cap.USER_MEMORY)), str(n)]
    per_call: list[float] = []

    def run() -> None:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        per_call.append(float(out))

    benchmark.pedantic(run, rounds=5, iterations=1)
    benchmark.extra_info["calls_per_round"] = n
    benchmark.extra_info["ns_per_call_min"] = min(per_call)
    benchmark.extra_info["ns_per_call_median"] = sorted(per_call)[len(per_call) // 2]
    assert os.path.exists(exe)
