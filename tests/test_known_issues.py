"""The known-kernel-bug table: which tests become non-strict xfails, where."""

import pytest

from kvmpy.testing.known_issues import (
    KNOWN_ISSUES,
    OPEN_ISSUES,
    kernel_version,
    known_issue,
    open_issue,
)

PREFAULT = "selftests/test_pre_fault_memory.py::test_pre_fault_memory[shared-sw_protected-at_4g-kvm]"


@pytest.mark.parametrize("release,want", [("6.12.117", (6, 12)), ("6.18.44-fc-v669", (6, 18)),
                                          ("7.0.0-rc1", (7, 0)), ("weird", (0, 0))])
def test_kernel_version(release: str, want: tuple[int, int]) -> None:
    assert kernel_version(release) == want


def test_prefault_race_is_known_on_6_12_real_kvm_only() -> None:
    issue = known_issue(PREFAULT, "kvm", "6.12.117")
    assert issue is not None and "memslot" in issue.reason
    assert known_issue(PREFAULT, "kvm", "6.18.44") is None, "fixed kernels are not marked"
    assert known_issue(PREFAULT.replace("-kvm]", "-emu]"), "emu", "6.12.117") is None
    other = "selftests/test_pre_fault_memory.py::test_pre_fault_flags[default-shared-at_4g-kvm]"
    assert known_issue(other, "kvm", "6.12.117") is None


def test_every_issue_names_a_fix() -> None:
    for issue in KNOWN_ISSUES:
        assert issue.fixed_in > (0, 0) and issue.reason and issue.nodeid.startswith("selftests/")


MMIO = "selftests/test_known_issue_mmio_spte.py::test_private_noslot_gpa_after_mmio_exit_is_memory_fault[kvm]"


def test_stale_mmio_spte_is_open_on_every_real_kernel_only() -> None:
    issue = open_issue(MMIO, "kvm")
    assert issue is not None and "6.12.117" in issue.seen_in and "7.3.4" in issue.seen_in
    assert "MMIO SPTE" in issue.reason and issue.details == "docs/findings.md"
    assert open_issue(MMIO.replace("[kvm]", "[emu]"), "emu") is None
    control = MMIO.replace("after_mmio_exit", "without_prior_mmio")
    assert open_issue(control, "kvm") is None, "the control case is documented behaviour"
    assert known_issue(MMIO, "kvm", "7.3.4") is None, "open issues are not in the fixed table"


def test_every_open_issue_names_kernels_and_a_test_file() -> None:
    for issue in OPEN_ISSUES:
        assert issue.seen_in and issue.reason and issue.nodeid.startswith("selftests/")
        path = issue.nodeid.split("::")[0]
        from pathlib import Path
        assert (Path(__file__).resolve().parent.parent / path).exists(), path
