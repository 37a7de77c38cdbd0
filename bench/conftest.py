"""Options of the benchmarks in bench/ (the kvmpy plugin comes from the root conftest.py).

  --c-selftests DIR   a directory of the kernel's built KVM selftests (tools/testing/selftests/
                      kvm, e.g. after `make -C tools/testing/selftests TARGETS=kvm`), to time
                      the C tests next to their kvmpy counterparts (bench/bench_suite.py).
                      Env: KVMPY_C_SELFTESTS.
  --suite PATHS       comma-separated pytest paths the suite wall-time benchmark runs
                      (default: selftests). Env: KVMPY_BENCH_SUITE.
"""

from __future__ import annotations

import os

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("kvmpy benchmarks")
    g.addoption("--c-selftests", default=os.environ.get("KVMPY_C_SELFTESTS", ""),
                metavar="DIR", help="directory of the kernel's built KVM C selftests "
                                    "(side-by-side timings). Env: KVMPY_C_SELFTESTS")
    g.addoption("--suite", default=os.environ.get("KVMPY_BENCH_SUITE", "selftests"),
                help="comma-separated pytest paths for the suite wall-time benchmark "
                     "(default: selftests). Env: KVMPY_BENCH_SUITE")
