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
