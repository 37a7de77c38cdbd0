"""KVM binary statistics (KVM_GET_STATS_FD, Documentation/virt/kvm/api.rst 4.133)."""

from __future__ import annotations

import struct

from .._call import checked_ioctl
from ..uapi import Ioctl
from ..vcpu import Vcpu
from ..vm import Vm

# struct kvm_stats_header: flags, name_size, num_desc, id_offset, desc_offset, data_offset.
_HEADER = struct.Struct("<6I")
# struct kvm_stats_desc without its name: flags, exponent, size, offset, bucket_size.
_DESC = struct.Struct("<IhHII")


def read_stats(obj: Vcpu | Vm) -> dict[str, int]:
    """Every statistic of a vCPU or VM (first element of array stats), by name."""
    fd = checked_ioctl(obj.backend, obj.fd, Ioctl.KVM_GET_STATS_FD)
    try:
        b = obj.backend
        _, name_size, num_desc, _, desc_off, data_off = _HEADER.unpack(
            b.pread(fd, _HEADER.size, 0))
        dsize = _DESC.size + name_size
        descs = b.pread(fd, dsize * num_desc, desc_off)
        out: dict[str, int] = {}
        for i in range(num_desc):
            base = i * dsize
            _, _, size, offset, _ = _DESC.unpack_from(descs, base)
            raw = descs[base + _DESC.size: base + dsize]
            name = raw.split(b"\0", 1)[0].decode()
            if size:
                (out[name],) = struct.unpack("<Q", b.pread(fd, 8, data_off + offset))
        return out
    finally:
        obj.backend.close(fd)


__all__ = ["read_stats"]
