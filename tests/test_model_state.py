"""Unit tests of the reference model (kvmpy/model/state.py): pure Python, no KVM."""

from __future__ import annotations

import errno

import pytest

from kvmpy.model.state import (
    ATTR_PRIVATE,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    GMEM_FLAG_INIT_SHARED,
    GMEM_FLAG_MMAP,
    MEM_EXIT_FLAG_PRIVATE,
    OK,
    PAGE,
    Config,
    Fault,
    Mem,
    Mmio,
    Model,
)

KEEP, PUNCH = FALLOC_FL_KEEP_SIZE, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
BASE = 1 << 32


def model(attributes: int = ATTR_PRIVATE, flags: int = GMEM_FLAG_MMAP | GMEM_FLAG_INIT_SHARED,
          overlap: frozenset[int] = frozenset({errno.EEXIST})) -> Model:
    return Model(Config(guest_memfd=True, gmem_flags=flags, attributes=attributes,
                        bind_overlap_errnos=overlap))


@pytest.mark.parametrize(("size", "flags", "want"), [
    (PAGE, 0, OK),
    (4 * PAGE, GMEM_FLAG_MMAP, OK),
    (0, 0, {errno.EINVAL}),
    (PAGE + 1, 0, {errno.EINVAL}),
    (PAGE, 1 << 63, {errno.EINVAL}),
], ids=["page", "mmap", "zero", "unaligned", "unknown-flag"])
def test_create_gmem_validation(size: int, flags: int, want: set[int]) -> None:
    m = model()
    got, gid = m.create_gmem(size, flags)
    assert got == want
    assert (gid is not None) == (want == OK)


def test_create_gmem_flags_outside_cap_are_einval() -> None:
    m = model(flags=0)
    assert m.create_gmem(PAGE, GMEM_FLAG_MMAP)[0] == {errno.EINVAL}


@pytest.mark.parametrize(("mode", "off", "length", "want"), [
    (KEEP, 0, 2 * PAGE, OK),
    (PUNCH, 0, PAGE, OK),
    (PUNCH, 8 * PAGE, PAGE, OK),               # a hole past i_size is a no-op
    (KEEP, 2 * PAGE, 4 * PAGE, {errno.EINVAL}),  # allocation past i_size
    (0, 0, PAGE, {errno.EOPNOTSUPP}),           # KEEP_SIZE is required
    (KEEP | 0x10, 0, PAGE, {errno.EOPNOTSUPP}),  # only PUNCH_HOLE may be added
    (KEEP, 0x200, PAGE, {errno.EINVAL}),
    (PUNCH, 0, 0x800, {errno.EINVAL}),
    (KEEP, 0, 0, {errno.EINVAL}),
])
def test_fallocate_rules(mode: int, off: int, length: int, want: set[int]) -> None:
    m = model()
    _, gid = m.create_gmem(4 * PAGE, 0)
    assert gid is not None
    assert m.fallocate(gid, mode, off, length) == want


def test_punch_hole_zeroes_only_the_range() -> None:
    m = model()
    _, gid = m.create_gmem(4 * PAGE, GMEM_FLAG_MMAP | GMEM_FLAG_INIT_SHARED)
    assert gid is not None
    for p in range(4):
        m.host_write_gmem(gid, p * PAGE, 0x10 + p)
    assert m.fallocate(gid, PUNCH, PAGE, 2 * PAGE) == OK
    assert [m.host_read_gmem(gid, p * PAGE) for p in range(4)] == [0x10, 0, 0, 0x13]
    # Allocation keeps contents.
    assert m.fallocate(gid, KEEP, 0, 4 * PAGE) == OK
    assert m.host_read_gmem(gid, 0) == 0x10


def test_memslot_rules() -> None:
    m = model()
    _, gid = m.create_gmem(4 * PAGE, 0)
    assert m.set_slot(0, BASE, 2 * PAGE, "backing", None, 0) == OK
    assert m.set_slot(1, BASE + PAGE, 2 * PAGE, "backing", None, 0) == {errno.EEXIST}
    assert m.set_slot(0, BASE + 8 * PAGE, 2 * PAGE, "backing", None, 0) == {errno.EINVAL}
    assert m.set_slot(1, BASE + 0x800, PAGE, "backing", None, 0) == {errno.EINVAL}
    assert m.set_slot(1, BASE + 4 * PAGE, 2 * PAGE, "backing", gid, 3 * PAGE) == {errno.EINVAL}
    assert m.set_slot(1, BASE + 4 * PAGE, 2 * PAGE, "backing", gid, 0) == OK
    # The same file range again, at another GPA: the version-dependent overlap errno.
    assert m.set_slot(2, BASE + 8 * PAGE, PAGE, "backing", gid, PAGE) == {errno.EEXIST}
    assert m.set_slot(2, BASE + 8 * PAGE, PAGE, "backing", gid, 2 * PAGE) == OK
    # A guest_memfd slot is immutable: only deletion.
    assert m.set_slot(1, BASE + 12 * PAGE, 2 * PAGE, "backing", gid, 0) == {errno.EINVAL}
    assert m.delete_slot(1) == OK
    assert m.delete_slot(1) == {errno.EINVAL}
    assert m.set_slot(1, BASE + 4 * PAGE, 2 * PAGE, "backing", gid, 0) == OK


def test_attribute_validation() -> None:
    m = model()
    assert m.set_attributes(BASE, PAGE, ATTR_PRIVATE) == OK
    assert m.set_attributes(BASE, 0, ATTR_PRIVATE) == {errno.EINVAL}
    assert m.set_attributes(BASE + 8, PAGE, ATTR_PRIVATE) == {errno.EINVAL}
    assert m.set_attributes(BASE, PAGE, 1) == {errno.EINVAL}
    assert m.set_attributes(BASE, PAGE, ATTR_PRIVATE, flags=1) == {errno.EINVAL}
    assert model(attributes=0).set_attributes(BASE, PAGE, ATTR_PRIVATE) \
        == {errno.ENOTTY, errno.EINVAL}


def test_access_outcomes() -> None:
    """No slot: MMIO; private without guest_memfd: MEMORY_FAULT(PRIVATE, page); private with:
    the file; shared: the backing; a closed file: private faults, shared still the backing."""
    m = model()
    _, gid = m.create_gmem(4 * PAGE, 0)
    assert gid is not None
    assert m.set_slot(0, BASE, 2 * PAGE, "backing", gid, 0) == OK
    assert m.set_slot(1, BASE + 2 * PAGE, PAGE, "backing", None, 0) == OK
    assert m.guest_read(BASE + 8 * PAGE) == Mmio(BASE + 8 * PAGE, False)
    assert m.guest_write(BASE, 0x5) == Mem(0x5, "shared")
    m.set_attributes(BASE, 3 * PAGE, ATTR_PRIVATE)
    assert m.guest_read(BASE) == Mem(0, "gmem")
    assert m.guest_write(BASE + 16, 0x7) == Mem(0x7, "gmem")
    assert m.guest_read(BASE + 2 * PAGE + 8) == Fault(MEM_EXIT_FLAG_PRIVATE, BASE + 2 * PAGE)
    m.set_attributes(BASE, 3 * PAGE, 0)
    assert m.guest_read(BASE) == Mem(0x5, "shared")
    m.set_attributes(BASE, PAGE, ATTR_PRIVATE)
    assert m.guest_read(BASE + 16) == Mem(0x7, "gmem")     # private contents persist
    m.close_gmem(gid)
    assert m.guest_read(BASE + 16) == Fault(MEM_EXIT_FLAG_PRIVATE, BASE)
    m.set_attributes(BASE, PAGE, 0)
    assert m.guest_read(BASE) == Mem(0x5, "shared")


def test_gmem_only_slot_serves_shared_from_the_file() -> None:
    """6.18: a slot whose guest_memfd has GUEST_MEMFD_FLAG_MMAP is guest_memfd only."""
    m = model()
    _, gid = m.create_gmem(2 * PAGE, GMEM_FLAG_MMAP)
    assert gid is not None
    assert m.set_slot(0, BASE, 2 * PAGE, "backing", gid, 0) == OK
    m.host_write_backing(0, 0, 0x99)
    assert m.guest_write(BASE + 8, 0x1) == Mem(0x1, "gmem")
    assert m.guest_read(BASE) == Mem(0, "gmem")
    assert m.host_read_backing(0, 8) == 0
    assert m.fallocate(gid, PUNCH, 0, PAGE) == OK
    assert m.guest_read(BASE + 8) == Mem(0, "gmem")


def test_private_gfn_without_memslot_is_a_memory_fault() -> None:
    """kvm_handle_noslot_fault() (6.10+): a private gfn with no memslot is
    KVM_EXIT_MEMORY_FAULT(PRIVATE), a shared one MMIO."""
    m = model()
    m.set_attributes(BASE, PAGE, ATTR_PRIVATE)
    assert m.guest_read(BASE + 8) == Fault(MEM_EXIT_FLAG_PRIVATE, BASE)
    assert m.guest_write(BASE + PAGE, 1) == Mmio(BASE + PAGE, True)


# --- the known issue "stale MMIO SPTE" (docs/findings.md) -------------------------------------
def stale_model() -> Model:
    return Model(Config(guest_memfd=True, gmem_flags=GMEM_FLAG_MMAP, attributes=ATTR_PRIVATE,
                        stale_mmio_spte=True))


@pytest.mark.parametrize("stale", [False, True], ids=["documented", "known_issue"])
def test_private_noslot_after_mmio(stale: bool) -> None:
    """What real 6.12.117 / 7.3.4 did in the VM (selftests/test_known_issue_mmio_spte.py)
    versus the documented behaviour the emulator keeps."""
    m = stale_model() if stale else model()
    assert m.guest_read(BASE) == Mmio(BASE, False)
    assert m.set_attributes(BASE, PAGE, ATTR_PRIVATE) == OK
    want = Mmio(BASE, False) if stale else Fault(MEM_EXIT_FLAG_PRIVATE, BASE)
    assert m.guest_read(BASE) == want
    # A memslot created elsewhere makes the MMIO SPTE stale: a shared-access fault (flags 0).
    assert m.set_slot(0, BASE + 16 * PAGE, PAGE, "backing", None, 0) == OK
    assert m.guest_read(BASE) == (Fault(0, BASE) if stale else Fault(MEM_EXIT_FLAG_PRIVATE, BASE))
    # Deleting a memslot zaps everything (KVM_X86_QUIRK_SLOT_ZAP_ALL): documented again.
    assert m.delete_slot(0) == OK
    assert m.guest_read(BASE) == Fault(MEM_EXIT_FLAG_PRIVATE, BASE)


def test_stale_mmio_spte_over_a_new_gmem_slot_until_attributes_zap() -> None:
    m = stale_model()
    assert m.guest_read(BASE) == Mmio(BASE, False)
    m.set_attributes(BASE, PAGE, ATTR_PRIVATE)
    _, gid = m.create_gmem(PAGE, 0)
    assert gid is not None
    assert m.set_slot(0, BASE, PAGE, "backing", gid, 0) == OK
    assert m.guest_read(BASE) == Fault(0, BASE)          # observed on 7.3.4
    # An attribute change inside the memslot zaps the SPTE: served as documented after it.
    m.set_attributes(BASE, PAGE, 0)
    assert m.guest_read(BASE) == Mem(0, "shared")
    m.set_attributes(BASE, PAGE, ATTR_PRIVATE)
    assert m.guest_read(BASE) == Mem(0, "gmem")


def test_attribute_noop_does_not_zap_and_shared_mmio_stays_mmio() -> None:
    m = stale_model()
    assert m.guest_read(BASE) == Mmio(BASE, False)
    assert m.set_attributes(BASE, PAGE, 0) == OK         # already shared: no-op
    assert m.guest_read(BASE) == Mmio(BASE, False)
    assert m.set_slot(0, BASE + 16 * PAGE, PAGE, "backing", None, 0) == OK
    assert m.guest_read(BASE) == Mmio(BASE, False)       # shared: the slow path, MMIO again
