"""Choosing a backend by name: "kvm" (real), "emu" (emulated), "auto"."""

from __future__ import annotations

import os

from . import Backend, default_device


def kvm_available(device: str | None = None) -> tuple[bool, str]:
    """Whether the KVM device opens, and if not, why."""
    dev = device or default_device()
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return False, f"{dev}: {e.strerror}"
    os.close(fd)
    return True, ""


def make_backend(name: str, emu_profile: str | None = None) -> Backend:
    """``emu_profile`` (emulated backend only): upstream, 6.12 or host; default
    $KVMPY_EMU_PROFILE or upstream."""
    backend = _make_backend(name, emu_profile)
    # Fault-injection hook of the regression-power self-check (python -m kvmpy.faultcheck,
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
        backend: Backend = EmuBackend(profile=profile)
        return backend
    raise ValueError(f"unknown backend {name!r} (kvm, emu, auto)")
