"""ctypes mirrors of the KVM uapi structures used by kvmpy (x86_64 layouts).

Sizes and offsets are pinned by tests/test_uapi_layout.py and cross-checked against the
machine's installed headers by tests/test_uapi_drift.py.
"""

from __future__ import annotations

import ctypes
from ctypes import c_uint8, c_uint16, c_uint32, c_uint64
from typing import Any, TypeVar

_INT_RANGES: dict[Any, tuple[int, int]] = {}
for _u in (ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64):
    _INT_RANGES[_u] = (0, (1 << (8 * ctypes.sizeof(_u))) - 1)
for _s in (ctypes.c_int8, ctypes.c_int16, ctypes.c_int32, ctypes.c_int64):
    _INT_RANGES[_s] = (-(1 << (8 * ctypes.sizeof(_s) - 1)), (1 << (8 * ctypes.sizeof(_s) - 1)) - 1)

# Per struct class: field name -> (lo, hi, array length or 0, array type or None).
_Limits = dict[str, tuple[int, int, int, Any]]
_LIMITS: dict[type, _Limits] = {}


def _limits(cls: type) -> _Limits:
    lim: _Limits = {}
    for f in cls._fields_:  # type: ignore[attr-defined]
        name, t = f[0], f[1]
        if t in _INT_RANGES:
            lo, hi = _INT_RANGES[t]
            lim[name] = (lo, hi, 0, None)
        elif isinstance(t, type) and issubclass(t, ctypes.Array) and t._type_ in _INT_RANGES:
            elem: Any = t._type_
            lo, hi = _INT_RANGES[elem]
            lim[name] = (lo, hi, ctypes.sizeof(t) // ctypes.sizeof(elem), t)
    _LIMITS[cls] = lim
    return lim


def check_int(what: str, value: object, lo: int, hi: int, width: str = "") -> int:
    """``value`` if it is an int in [lo, hi]; else TypeError/OverflowError naming ``what`` (the
    one integer check of kvmpy: struct fields, ioctl arguments, libc arguments)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__} ({value!r})")
    if not lo <= value <= hi:
        fit = f"its {width} field" if width else f"[{lo:#x}, {hi:#x}]"
        raise OverflowError(f"{what}={value:#x} does not fit {fit}")
    return int(value)


# ctypes.Structure's own setter, called directly: super() costs ~0.1 us per field store.
_struct_setattr = ctypes.Structure.__setattr__


class KvmStruct(ctypes.Structure):
    """Base with a readable repr and byte helpers (the emulated backend decodes raw bytes).

    Integer fields refuse values their uapi width cannot hold (ctypes would store them modulo
    the width: ``memory_size=2**64`` would become 0 and delete a memslot). An integer-array
    field also takes a sequence, element by element checked, no longer than the array.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        lim = _LIMITS.get(type(self))
        if lim is None:
            lim = _limits(type(self))
        b = lim.get(name)
        if b is not None:
            lo, hi, n, arr = b
            if n == 0:
                # The common case (an int or IntEnum in range) without building check_int's
                # message arguments: kvm_run fields are set on every KVM_RUN of the emulated KVM.
                if not (isinstance(value, int) and not isinstance(value, bool)
                        and lo <= value <= hi):
                    check_int(f"{type(self).__name__}.{name}", value, lo, hi, _width(lo, hi))
            elif not isinstance(value, ctypes.Array):
                items = list(value)
                if len(items) > n:
                    raise ValueError(f"{type(self).__name__}.{name} holds {n} values, got "
                                     f"{len(items)}")
                for i, v in enumerate(items):
                    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                        raise OverflowError(f"{type(self).__name__}.{name}[{i}]={v!r} does not "
                                            f"fit its {_width(lo, hi)} elements")
                value = arr(*items)
        _struct_setattr(self, name, value)

    def __repr__(self) -> str:
        parts = []
        for f in self._fields_:
            name = f[0]
            if name.startswith("pad") or name in ("reserved", "padding"):
                continue
            parts.append(f"{name}={_fmt(getattr(self, name))}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def to_bytes(self) -> bytes:
        return ctypes.string_at(ctypes.addressof(self), ctypes.sizeof(self))

    @classmethod
    def from_bytes(cls, data: bytes) -> Any:
        return cls.from_buffer_copy(data[: ctypes.sizeof(cls)])


_K = TypeVar("_K", bound=KvmStruct)


def build_struct(cls: type[_K], fields: dict[str, Any]) -> _K:
    """``cls(**fields)``, the same struct and the same refusals, but a plain int in range is
    stored by ctypes' own setter instead of through KvmStruct.__setattr__ (~0.4 us a field;
    every memslot ioctl builds a struct, issue 15); anything else takes __setattr__."""
    lim = _LIMITS.get(cls)
    if lim is None:
        lim = _limits(cls)
    s = cls()
    for name, value in fields.items():
        b = lim.get(name)
        if b is not None and not b[2] and type(value) is int and b[0] <= value <= b[1]:
            _struct_setattr(s, name, value)
        else:
            setattr(s, name, value)
    return s


def _width(lo: int, hi: int) -> str:
    bits = (hi - lo).bit_length()
    return f"{'s' if lo else 'u'}{bits}"


def _fmt(v: object) -> str:
    if isinstance(v, int):
        return hex(v) if v > 9 else str(v)
    if isinstance(v, ctypes.Array):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return repr(v)


class kvm_userspace_memory_region(KvmStruct):
    _fields_ = [
        ("slot", c_uint32),
        ("flags", c_uint32),
        ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64),
        ("userspace_addr", c_uint64),
    ]


class kvm_userspace_memory_region2(KvmStruct):
    _fields_ = [
        ("slot", c_uint32),
        ("flags", c_uint32),
        ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64),
        ("userspace_addr", c_uint64),
        ("guest_memfd_offset", c_uint64),
        ("guest_memfd", c_uint32),
        ("pad1", c_uint32),
        ("pad2", c_uint64 * 14),
    ]


class kvm_create_guest_memfd(KvmStruct):
    _fields_ = [
        ("size", c_uint64),
        ("flags", c_uint64),
        ("reserved", c_uint64 * 6),
    ]


class kvm_memory_attributes(KvmStruct):
    _fields_ = [
        ("address", c_uint64),
        ("size", c_uint64),
        ("attributes", c_uint64),
        ("flags", c_uint64),
    ]


class kvm_pre_fault_memory(KvmStruct):
    _fields_ = [
        ("gpa", c_uint64),
        ("size", c_uint64),
        ("flags", c_uint64),
        ("padding", c_uint64 * 5),
    ]


class kvm_enable_cap(KvmStruct):
    _fields_ = [
        ("cap", c_uint32),
        ("flags", c_uint32),
        ("args", c_uint64 * 4),
        ("pad", c_uint8 * 64),
    ]


class kvm_regs(KvmStruct):
    _fields_ = [
        (name, c_uint64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
            "rip", "rflags",
        )
    ]


class kvm_segment(KvmStruct):
    _fields_ = [
        ("base", c_uint64),
        ("limit", c_uint32),
        ("selector", c_uint16),
        ("type", c_uint8),
        ("present", c_uint8),
        ("dpl", c_uint8),
        ("db", c_uint8),
        ("s", c_uint8),
        ("l", c_uint8),
        ("g", c_uint8),
        ("avl", c_uint8),
        ("unusable", c_uint8),
        ("padding", c_uint8),
    ]


class kvm_dtable(KvmStruct):
    _fields_ = [
        ("base", c_uint64),
        ("limit", c_uint16),
        ("padding", c_uint16 * 3),
    ]


class kvm_sregs(KvmStruct):
    _fields_ = [
        ("cs", kvm_segment),
        ("ds", kvm_segment),
        ("es", kvm_segment),
        ("fs", kvm_segment),
        ("gs", kvm_segment),
        ("ss", kvm_segment),
        ("tr", kvm_segment),
        ("ldt", kvm_segment),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        ("cr0", c_uint64),
        ("cr2", c_uint64),
        ("cr3", c_uint64),
        ("cr4", c_uint64),
        ("cr8", c_uint64),
        ("efer", c_uint64),
        ("apic_base", c_uint64),
        ("interrupt_bitmap", c_uint64 * 4),
    ]


class kvm_cpuid_entry2(KvmStruct):
    _fields_ = [
        ("function", c_uint32),
        ("index", c_uint32),
        ("flags", c_uint32),
        ("eax", c_uint32),
        ("ebx", c_uint32),
        ("ecx", c_uint32),
        ("edx", c_uint32),
        ("padding", c_uint32 * 3),
    ]


class kvm_cpuid2(KvmStruct):
    """Header only; use :func:`make_cpuid2` for a buffer with room for entries."""

    _fields_ = [
        ("nent", c_uint32),
        ("padding", c_uint32),
    ]


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0


def make_cpuid2(nent: int) -> Any:
    """A kvm_cpuid2 with a flexible array of ``nent`` kvm_cpuid_entry2."""

    class kvm_cpuid2_n(KvmStruct):
        _fields_ = [
            ("nent", c_uint32),
            ("padding", c_uint32),
            ("entries", kvm_cpuid_entry2 * nent),
        ]

    buf = kvm_cpuid2_n()
    buf.nent = nent
    return buf


class kvm_msr_entry(KvmStruct):
    _fields_ = [("index", c_uint32), ("reserved", c_uint32), ("data", c_uint64)]


class kvm_msrs(KvmStruct):
    """Header only; use :func:`make_msrs` for a buffer with room for entries."""

    _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32)]


def make_msrs(nmsrs: int) -> Any:
    """A kvm_msrs with a flexible array of ``nmsrs`` kvm_msr_entry (KVM_GET/SET_MSRS)."""

    class kvm_msrs_n(KvmStruct):
        _fields_ = [
            ("nmsrs", c_uint32),
            ("pad", c_uint32),
            ("entries", kvm_msr_entry * nmsrs),
        ]

    buf = kvm_msrs_n()
    buf.nmsrs = nmsrs
    return buf


class kvm_signal_mask(KvmStruct):
    """Header only (``__u8 sigset[0]`` follows); see kvm_signal_mask_x86."""

    _fields_ = [("len", c_uint32)]


class kvm_signal_mask_x86(KvmStruct):
    """kvm_signal_mask with the kernel's 8-byte sigset_t (KVM_SET_SIGNAL_MASK checks
    len == sizeof(sigset_t): kvm_vcpu_ioctl, virt/kvm/kvm_main.c)."""

    _pack_ = 4
    _fields_ = [("len", c_uint32), ("sigset", c_uint64)]


class kvm_mp_state(KvmStruct):
    _fields_ = [("mp_state", c_uint32)]


# --- kvm_run and its exit union -------------------------------------------------


class kvm_run_io(KvmStruct):
    _fields_ = [
        ("direction", c_uint8),
        ("size", c_uint8),
        ("port", c_uint16),
        ("count", c_uint32),
        ("data_offset", c_uint64),
    ]


class kvm_run_mmio(KvmStruct):
    _fields_ = [
        ("phys_addr", c_uint64),
        ("data", c_uint8 * 8),
        ("len", c_uint32),
        ("is_write", c_uint8),
    ]


class kvm_run_hypercall(KvmStruct):
    _fields_ = [
        ("nr", c_uint64),
        ("args", c_uint64 * 6),
        ("ret", c_uint64),
        # union { __u32 longmode; __u64 flags; }
        ("flags", c_uint64),
    ]


class kvm_run_internal(KvmStruct):
    _fields_ = [
        ("suberror", c_uint32),
        ("ndata", c_uint32),
        ("data", c_uint64 * 16),
    ]


class kvm_run_memory_fault(KvmStruct):
    _fields_ = [
        ("flags", c_uint64),
        ("gpa", c_uint64),
        ("size", c_uint64),
    ]


class kvm_run_fail_entry(KvmStruct):
    _fields_ = [
        ("hardware_entry_failure_reason", c_uint64),
        ("cpu", c_uint32),
    ]


class kvm_run_ex(KvmStruct):
    _fields_ = [
        ("exception", c_uint32),
        ("error_code", c_uint32),
    ]


class kvm_run_exit(ctypes.Union):
    _fields_ = [
        ("io", kvm_run_io),
        ("mmio", kvm_run_mmio),
        ("hypercall", kvm_run_hypercall),
        ("internal", kvm_run_internal),
        ("memory_fault", kvm_run_memory_fault),
        ("fail_entry", kvm_run_fail_entry),
        ("ex", kvm_run_ex),
        ("padding", c_uint8 * 256),
    ]


class kvm_run(KvmStruct):
    _fields_ = [
        ("request_interrupt_window", c_uint8),
        ("immediate_exit", c_uint8),
        ("padding1", c_uint8 * 6),
        ("exit_reason", c_uint32),
        ("ready_for_interrupt_injection", c_uint8),
        ("if_flag", c_uint8),
        ("flags", c_uint16),
        ("cr8", c_uint64),
        ("apic_base", c_uint64),
        ("exit", kvm_run_exit),
        ("kvm_valid_regs", c_uint64),
        ("kvm_dirty_regs", c_uint64),
        ("s", c_uint8 * 2048),
    ]


