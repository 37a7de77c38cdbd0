"""Host backings for test memslots (kvmpy/guest/backing.py), without a VM."""

from __future__ import annotations

import os

import pytest

from kvmpy.backend.host import HostBackend
from kvmpy.guest.backing import (
    BackingUnavailable,
    MemRegion,
    hugetlb_available,
    make_backing,
    thp_available,
)
from kvmpy.guest.x86 import PAGE_2M


@pytest.fixture
def host() -> HostBackend:
    return HostBackend()


@pytest.mark.parametrize("kind", ["shmem", "anonymous"])
def test_backing_is_usable_memory(host: HostBackend, kind: str) -> None:
    b = make_backing(host, kind, 3 * 4096)
    try:
        assert (b.kind, b.size) == (kind, 3 * 4096)
        b.mapping.write(4096, b"abc")
        assert b.mapping.read(4095, 5) == b"\0abc\0"
    finally:
        b.close()
    assert b.mapping.closed


def test_shmem_backing_is_a_memfd(host: HostBackend) -> None:
    """shmem is file-backed, so the emulated KVM can alias it by mapping the fd."""
    b = make_backing(host, "shmem", 4096)
    try:
        assert b._shared is not None and b._shared.fd >= 0
        b.mapping.write(0, b"xyz")
        assert os.pread(b._shared.fd, 3, 0) == b"xyz"
    finally:
        b.close()


def test_thp_backing_is_2m_aligned(host: HostBackend) -> None:
    ok, why = thp_available()
    if not ok:
        pytest.skip(why)
    b = make_backing(host, "thp", 2 * PAGE_2M)
    try:
        assert b.addr % PAGE_2M == 0 and b.size == 2 * PAGE_2M
        b.mapping.fill(0, b.size, 7)
        assert b.mapping.read(b.size - 1, 1) == b"\x07"
    finally:
        b.close()


def test_hugetlb_unavailable_names_the_resource(host: HostBackend) -> None:
    ok, why = hugetlb_available(1 << 40)
    assert not ok and "HugePages_Free=" in why
    with pytest.raises(BackingUnavailable, match="HugePages_Free="):
        make_backing(host, "hugetlb", 1 << 40)


def test_hugetlb_2m_unavailable_names_the_resource(host: HostBackend) -> None:
    with pytest.raises(BackingUnavailable, match="2 MiB hugetlb backing"):
        make_backing(host, "hugetlb_2m", 1 << 40)


def test_unknown_backing(host: HostBackend) -> None:
    with pytest.raises(ValueError, match="unknown backing 'nvdimm'"):
        make_backing(host, "nvdimm", 4096)


def test_region_without_host_view() -> None:
    r = MemRegion(slot=1, gpa=1 << 32, size=4096, gva=None, flags=4, userspace_addr=0)
    assert r.host is None
    with pytest.raises(ValueError, match="no host mapping"):
        r.read(0, 8)
