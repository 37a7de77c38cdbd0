"""kvmpy: a Python, kernel-selftest-style harness for KVM guest_memfd and private memory."""

from .errors import KvmError, KvmUnavailable, NotModelled
from .gmem import GuestMemfd
from .memory import Mapping, SharedMemory
from .system import Kvm
from .vcpu import Exit, Vcpu
from .vm import Memslot, Vm

__version__ = "0.1.0"

__all__ = [
           "Exit",
           "GuestMemfd",
           "Kvm",
           "KvmError",
           "KvmUnavailable",
           "Mapping",
           "Memslot",
           "NotModelled",
           "SharedMemory",
           "Vcpu",
           "Vm",
]
