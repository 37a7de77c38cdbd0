"""The in-process emulated x86 KVM (docs/emulator.md).

``EmuBackend(profile="upstream" | "6.12" | "host")`` implements kvmpy.backend.Backend: it decodes
the same ioctl numbers and struct bytes as the kernel and hands out real fds.
"""

from __future__ import annotations

from .backend import EmuBackend
from .gmem import EmuGmem
from .memslots import EmuMemslot
from .profiles import PROFILES, Profile, get_profile
from .vm import EmuVm

__all__ = ["PROFILES", "EmuBackend", "EmuGmem", "EmuMemslot", "EmuVm", "Profile", "get_profile"]
