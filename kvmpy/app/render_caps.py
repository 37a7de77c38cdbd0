"""``kvmpy caps`` as a table (rich)."""

from __future__ import annotations

from typing import Any

from ..caps import CAPS_OF_INTEREST, CapReport, _flag_names


def render(report: CapReport) -> Any:
    """A rich renderable of the report."""
    from rich.console import Group
    from rich.table import Table

    head = Table.grid(padding=(0, 1))
    head.add_row("backend", report.backend)
    head.add_row("kernel", report.kernel)
    head.add_row("API version", str(report.api_version))
    head.add_row("VM types", ", ".join(report.vm_types))
    head.add_row("guest_memfd flags", f"{report.guest_memfd_flags:#x} "
                 f"({'|'.join(_flag_names(report.guest_memfd_flags)) or 'none'})")
    t = Table(title="capabilities")
    t.add_column("capability")
    t.add_column("/dev/kvm", justify="right")
    for vt in report.vm:
        t.add_column(vt, justify="right")
    t.add_column("enables in the suite")
    for c, what in CAPS_OF_INTEREST.items():
        key = f"KVM_CAP_{c.name}"
        vals = [_v(report.system.get(key, 0))] + [_v(report.vm[vt].get(key, 0)) for vt in report.vm]
        t.add_row(key, *vals, what)
    return Group(head, t)


def _v(x: int) -> str:
    return hex(x) if x > 9 else str(x)
