"""Guest programs for kvmpy: build (guests/), load (ELF), bring up in long mode, and run
with ucall decoding and a watchdog. See docs/guests.md."""

from .backing import BACKINGS, BackingUnavailable, MemRegion
from .build import GuestBuildError, build
from .elf import GuestImage
from .threads import VcpuThread, join_all
from .ucall import (
    GuestAssertionError,
    GuestError,
    GuestException,
    GuestTimeout,
    Ucall,
    UcallCmd,
    UnexpectedExit,
    UnexpectedUcall,
    decode_ucall,
)
from .vm import TEST_MEM_BASE, GuestVm

__all__ = [
    "BACKINGS",
    "TEST_MEM_BASE",
    "BackingUnavailable",
    "GuestAssertionError",
    "GuestBuildError",
    "GuestError",
    "GuestException",
    "GuestImage",
    "GuestTimeout",
    "GuestVm",
    "MemRegion",
    "Ucall",
    "UcallCmd",
    "UnexpectedExit",
    "UnexpectedUcall",
    "VcpuThread",
    "build",
    "decode_ucall",
    "join_all",
]
