"""The KVM uAPI for x86_64: numbers (constants, ioctls) and ctypes structs."""

from .constants import *  # noqa: F403
from .ioctls import Ioctl
from .structs import *  # noqa: F403
from .structs import KvmStruct, make_cpuid2, make_msrs

__all__ = ["Ioctl", "KvmStruct", "make_cpuid2", "make_msrs"]
