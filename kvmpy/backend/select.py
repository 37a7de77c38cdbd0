"""Choosing a backend by name: "kvm" (real), "emu" (emulated), "auto"."""

from __future__ import annotations

import fcntl
import os
import stat

from ..uapi import KVM_API_VERSION, Ioctl
from . import Backend, default_device


def kvm_available(device: str | None = None) -> tuple[bool, str]:
    """Whether the KVM device opens, and if not, why."""
    dev = device or default_device()
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return False, f"{dev}: {e.strerror}"
    os.close(fd)
    # An openable /dev/null is not a KVM: "auto" must not pick it.
    why = not_a_kvm_device(dev)
    return (False, why) if why else (True, "")


def kvm_summary(device: str | None = None) -> str:
    """The real KVM in one line for run headers: the device, the loaded module and the parameters
    that matter for reports ('/dev/kvm, module kvm_amd kvm.tdp_mmu=Y'), or 'unavailable: why'."""
    ok, why = kvm_available(device)
    if not ok:
        return f"unavailable: {why}"
    from .host import kvm_module, kvm_module_params

    params = " ".join(f"{k}={v}" for k, v in kvm_module_params().items())
    return f"{device or default_device()}, module {kvm_module()} {params}".rstrip()


def make_backend(name: str, emu_profile: str | None = None) -> Backend:
    """``emu_profile`` (emulated backend only): upstream, 6.12 or host; default
    $KVMPY_EMU_PROFILE or upstream."""
    backend = _make_backend(name, emu_profile)
    # Fault-injection hook of the regression-power self-check (python -m kvmpy.app.faultcheck,
    # docs/beyond.md): $KVMPY_INJECT_FAULT names ONE fault of kvmpy.backend.faults to plant in
    # the backend. Unset (always, outside the self-check) it changes nothing.
    if os.environ.get("KVMPY_INJECT_FAULT"):
        from .faults import from_env

        backend = from_env(backend)
    return backend


def _make_backend(name: str, emu_profile: str | None) -> Backend:
    if name == "auto":
        name = "kvm" if kvm_available()[0] else "emu"
    if name == "kvm":
        from .host import HostBackend

        return HostBackend()
    if name == "emu":
        try:
            from .emu import EmuBackend
        except ImportError as e:
            raise NotImplementedError(f"the emulated KVM backend is not available: {e}") from e
        profile = emu_profile or os.environ.get("KVMPY_EMU_PROFILE", "upstream")
        if profile == "host":  # a real kernel's answers, probed above the seam
            from ..caps import probe_profile

            return EmuBackend(profile=probe_profile())
        backend: Backend = EmuBackend(profile=profile)
        return backend
    raise ValueError(f"unknown backend {name!r} (kvm, emu, auto)")


# -- validating what the user configured -------------------------------------------------------
# The CLI and the pytest plugin call check_environment() before anything runs, so a typo in an
# environment variable is one clear line instead of a traceback (or a wrong run) later.

BACKEND_CHOICES = ("auto", "kvm", "emu", "both")
EMU_PROFILES = ("upstream", "7.3", "6.12", "host")  # kvmpy.backend.emu.profiles.PROFILES
BOOL_CHOICES = {"": False, "0": False, "1": True, "false": False, "true": True,
                "no": False, "yes": True, "off": False, "on": True}


class ConfigError(ValueError):
    """A bad environment variable or option; the message is one line for the user."""


def choice(value: str, valid: tuple[str, ...], what: str) -> str:
    """``value`` if it is one of ``valid``, else ConfigError naming ``what`` and the choices."""
    if value not in valid:
        raise ConfigError(f"{what}: invalid value {value!r}; valid: {', '.join(valid)}")
    return value


def env_bool(name: str) -> bool:
    """A 0/1 switch from the environment (unset or empty: off)."""
    raw = os.environ.get(name, "")
    if raw.strip().lower() not in BOOL_CHOICES:
        raise ConfigError(f"{name}: invalid value {raw!r}; valid: 0, 1 (or false/true, no/yes, "
                          "off/on), or unset")
    return BOOL_CHOICES[raw.strip().lower()]


def not_a_kvm_device(dev: str) -> str | None:
    """Why ``dev`` exists but is not a KVM device, or None (it is one, it is missing, or it
    cannot be opened - absent or unreadable KVM is a skip, not bad input)."""
    try:
        st = os.stat(dev)
    except OSError:
        return None
    if not stat.S_ISCHR(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else \
            "a regular file" if stat.S_ISREG(st.st_mode) else "not a character device"
        return f"{dev} is {kind}, not a KVM device"
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        # What KVM answers first (api.rst 4.1); any other character device refuses it.
        version = fcntl.ioctl(fd, Ioctl.KVM_GET_API_VERSION, 0)
    except OSError as e:
        return f"{dev} is not a KVM device: KVM_GET_API_VERSION failed: {e.strerror}"
    finally:
        os.close(fd)
    if version != KVM_API_VERSION:
        return (f"{dev} is not a KVM device: KVM_GET_API_VERSION returned {version}, "
                f"not {KVM_API_VERSION}")
    return None


def _positive_int(name: str) -> None:
    raw = os.environ.get(name)
    if raw is None:
        return
    try:
        ok = int(raw) >= 1
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(f"{name}: invalid value {raw!r}; valid: an integer >= 1, or unset")


def check_environment() -> None:
    """Validate every KVMPY_* variable the CLI, the plugin and the suite read; ConfigError
    (one line naming the variable and the valid values) on the first bad one."""
    if "KVMPY_BACKEND" in os.environ:
        choice(os.environ["KVMPY_BACKEND"], BACKEND_CHOICES, "KVMPY_BACKEND")
    if "KVMPY_EMU_PROFILE" in os.environ:
        choice(os.environ["KVMPY_EMU_PROFILE"], EMU_PROFILES, "KVMPY_EMU_PROFILE")
    env_bool("KVMPY_REQUIRE_KVM")
    fault = os.environ.get("KVMPY_INJECT_FAULT", "")
    if fault:
        from .faults import FAULTS

        choice(fault, tuple(sorted(FAULTS)), "KVMPY_INJECT_FAULT")
    for name in ("KVMPY_MODEL_EXAMPLES", "KVMPY_MODEL_STEPS"):
        _positive_int(name)
    if "KVMPY_DEVICE" in os.environ:
        dev = os.environ["KVMPY_DEVICE"]
        if not dev:
            raise ConfigError("KVMPY_DEVICE is empty; valid: the path of a KVM device "
                              "(e.g. /dev/kvm), or unset")
        why = not_a_kvm_device(dev)
        if why:
            raise ConfigError(f"KVMPY_DEVICE: {why}; valid: the path of a KVM device "
                              "(e.g. /dev/kvm), or unset")
