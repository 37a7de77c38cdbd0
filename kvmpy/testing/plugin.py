"""The kvmpy pytest plugin: backend selection, the force-KVM switch, and reporting.

Options (each also an environment variable):
  --backend {auto,kvm,emu,both}   KVMPY_BACKEND   which KVM the tests talk to
  --require-kvm                   KVMPY_REQUIRE_KVM=1   a missing /dev/kvm fails instead of skipping
  --emu-profile {upstream,6.12,host}  KVMPY_EMU_PROFILE   the kernel the emulated KVM presents
Test ids end in [kvm] or [emu]; the report header names the backend(s) and kernel.
"""

from __future__ import annotations

import importlib
import os
import platform
from collections.abc import Generator, Iterator
from typing import Any

import pytest

from ..backend import Backend
from ..backend.select import (
    BACKEND_CHOICES,
    EMU_PROFILES,
    ConfigError,
    check_environment,
    env_bool,
    kvm_available,
    kvm_summary,
    make_backend,
)
from ..errors import KvmUnavailable
from ..system import Kvm
from .known_issues import known_issue
from .require import NOT_APPLICABLE

BACKENDS = BACKEND_CHOICES


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("kvmpy")
    g.addoption("--backend", choices=BACKENDS, default=os.environ.get("KVMPY_BACKEND", "auto"),
                help="KVM backend: auto (real if /dev/kvm opens, else emulated), kvm, emu, or "
                     "both (each test on each). Env: KVMPY_BACKEND")
    g.addoption("--emu-profile", choices=EMU_PROFILES,
                default=os.environ.get("KVMPY_EMU_PROFILE", "upstream"),
                help="kernel profile of the emulated KVM: upstream (6.18+), 7.3, 6.12, or host "
                     "(mirrors this machine's /dev/kvm, probed). Env: KVMPY_EMU_PROFILE")
    g.addoption("--require-kvm", action="store_true",
                default=_require_kvm_default(),
                help="fail (not skip) when real KVM is wanted but /dev/kvm cannot be opened. "
                     "Env: KVMPY_REQUIRE_KVM=1")


def _require_kvm_default() -> bool:
    try:
        return env_bool("KVMPY_REQUIRE_KVM")
    except ConfigError:
        return False  # pytest_configure reports it as a usage error


def pytest_configure(config: pytest.Config) -> None:
    # Option defaults come from the environment, which pytest's choices= never checks.
    try:
        check_environment()
    except ConfigError as e:
        raise pytest.UsageError(str(e)) from None


def selected_backends(config: pytest.Config) -> list[str]:
    choice = config.getoption("--backend")
    if choice == "both":
        return ["kvm", "emu"]
    if choice == "auto":
        ok, _ = kvm_available()
        if ok or config.getoption("--require-kvm"):
            return ["kvm"]
        return ["emu"]
    return [choice]


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = [f"kvmpy backends: {', '.join(selected_backends(config))} "
             f"(--backend {config.getoption('--backend')}); kernel {platform.release()}"]
    if "emu" in selected_backends(config):
        lines.append(f"emulated KVM profile: {config.getoption('--emu-profile')} "
                     "(--emu-profile / KVMPY_EMU_PROFILE)")
    return [*lines, f"real KVM: {kvm_summary()}"]


# trylast: parametrize the backend after every other parametrization (markers included), so
# that test ids end in [...-kvm] / [...-emu] as documented above.
@pytest.hookimpl(trylast=True)
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend_name" in metafunc.fixturenames:
        names = selected_backends(metafunc.config)
        metafunc.parametrize("backend_name", names, ids=names, scope="session")


@pytest.fixture(scope="session")
def backend(backend_name: str, request: pytest.FixtureRequest) -> Backend:
    """The backend under test (real or emulated); skips or fails when it cannot be had."""
    if backend_name == "kvm":
        ok, why = kvm_available()
        if not ok:
            msg = f"real KVM unavailable: {why}"
            if request.config.getoption("--require-kvm"):
                pytest.fail(f"{msg} (--require-kvm / KVMPY_REQUIRE_KVM=1)", pytrace=False)
            pytest.skip(msg)
    try:
        return make_backend(backend_name, request.config.getoption("--emu-profile"))
    except NotImplementedError as e:
        pytest.skip(str(e))


def open_kvm(backend: Backend) -> Kvm:
    """/dev/kvm (or its emulated equivalent) on ``backend``; skips the test if it cannot be
    opened."""
    try:
        return Kvm(backend)
    except KvmUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture
def kvm(backend: Backend) -> Iterator[Kvm]:
    """An open /dev/kvm (or emulated equivalent); closes everything created from it."""
    with open_kvm(backend) as k:
        yield k


#: Fds opened while a session fixture was set up (a backend's, for the process's life): the
#: selftests' fd-leak check does not count them. A plugin hook, not a conftest one: a session
#: fixture is set up through the session's hooks, which see no conftest below the rootdir.
SESSION_FDS: set[int] = set()


def _fds() -> set[int]:
    """Open fds, without the one listdir used for the listing (closed by now)."""
    out = set()
    for n in os.listdir("/proc/self/fd"):
        try:
            os.readlink(f"/proc/self/fd/{n}")
        except OSError:
            continue
        out.add(int(n))
    return out


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[Any],
                         request: pytest.FixtureRequest) -> Generator[None, Any, Any]:
    if fixturedef.scope != "session":
        return (yield)
    before = _fds()
    try:
        return (yield)
    finally:
        SESSION_FDS.update(_fds() - before)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
        item: pytest.Item,
        call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A not-applicable skip carries a JUnit property of its own (outcome: not_applicable)."""
    report: pytest.TestReport = yield
    if report.skipped and isinstance(report.longrepr, tuple) and \
            str(report.longrepr[2]).removeprefix("Skipped: ").startswith(NOT_APPLICABLE):
        item.user_properties.append(("outcome", "not_applicable"))
        report.user_properties = list(item.user_properties)
    return report


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every result carries the backend that produced it (JUnit properties, KTAP lines)."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        name = callspec.params.get("backend_name") if callspec else None
        if name:
            issue = known_issue(item.nodeid, name)
            if issue:
                item.add_marker(pytest.mark.xfail(
                    strict=False, reason=f"known bug of Linux < {issue.fixed_in[0]}."
                    f"{issue.fixed_in[1]} ({platform.release()}): {issue.reason}"))
            kind = "real KVM" if name == "kvm" else (
                f"emulated KVM (profile {item.config.getoption('--emu-profile')})")
            item.user_properties.append(("backend", name))
            item.user_properties.append(("backend_description",
                                         f"{kind} on Linux {platform.release()}"))
            # Which machine: results merged from several (pytest-xdist --tx ssh=HOST ...,
            # --dist each) still name each case's host (docs/running.md).
            item.user_properties.append(("host", platform.node()))


def pytest_collection_finish(session: pytest.Session) -> None:
    """KVMPY_PREWARM_IMPORTS=mod,mod: import these once collection is done, for `kvmpy vm`'s
    bytecode prewarm. They are what tests import later (hypothesis with the model): pytest
    assertion-rewrites every module of a plugin distribution (hypothesis has a pytest11 entry
    point), so their rewritten bytecode exists only if imported in a session; in a 7.3 TCG VM
    rewriting hypothesis's 77 modules took ~8 s of the first model test."""
    for name in filter(None, os.environ.get("KVMPY_PREWARM_IMPORTS", "").split(",")):
        try:
            importlib.import_module(name)
        except ImportError:
            pass
