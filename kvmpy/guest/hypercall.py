"""KVM_EXIT_HYPERCALL for KVM_HC_MAP_GPA_RANGE: the host half of a guest's MAP_GPA_RANGE
(kvm_util's kvm_hypercall_map_gpa_range pairs with each test's own handler).

KVM exits to userspace for the hypercalls whose bit is enabled in KVM_CAP_EXIT_HYPERCALL
(api.rst 7.37); ``kvm_run.hypercall`` carries nr and args, and the ``ret`` userspace writes is
copied to the guest's RAX by the next KVM_RUN (Documentation/virt/kvm/x86/hypercalls.rst
"KVM_HC_MAP_GPA_RANGE": a0 gpa, a1 number of 4 KiB pages, a2 attributes).
"""

from __future__ import annotations

import dataclasses

from ..uapi import PAGE_SIZE, Cap, ExitReason, Hypercall
from ..vcpu import Exit, Vcpu
from ..vm import Vm

#: KVM_CAP_EXIT_HYPERCALL bit for KVM_HC_MAP_GPA_RANGE.
MAP_GPA_RANGE_BIT = 1 << Hypercall.MAP_GPA_RANGE


def enable_map_gpa_range_exit(vm: Vm) -> None:
    """KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL, BIT(KVM_HC_MAP_GPA_RANGE))."""
    vm.enable_cap(Cap.EXIT_HYPERCALL, MAP_GPA_RANGE_BIT)


@dataclasses.dataclass(frozen=True)
class MapGpaRange:
    """One decoded KVM_HC_MAP_GPA_RANGE exit."""

    gpa: int
    size: int
    attributes: int

    @classmethod
    def decode(cls, ex: Exit) -> MapGpaRange:
        h = ex.hypercall
        if ex.reason != ExitReason.HYPERCALL or h is None:
            raise AssertionError(f"expected KVM_EXIT_HYPERCALL, got {ex}")
        if h.nr != Hypercall.MAP_GPA_RANGE:
            raise AssertionError(f"hypercall.nr {h.nr}, expected KVM_HC_MAP_GPA_RANGE (12)")
        return cls(h.args[0], h.args[1] * PAGE_SIZE, h.args[2])


def complete_hypercall(vcpu: Vcpu, ret: int = 0) -> None:
    """Set ``hypercall.ret``, which the next KVM_RUN hands to the guest in RAX."""
    vcpu.run_struct.exit.hypercall.ret = ret & ((1 << 64) - 1)


__all__ = ["MAP_GPA_RANGE_BIT", "MapGpaRange", "complete_hypercall", "enable_map_gpa_range_exit"]
