"""KVM_GET_MSRS / KVM_SET_MSRS (api.rst 4.18) on real KVM and on the emulated KVM: x86.c
msr_io() -> __msr_io() processes the entries in order until the first one do_get_msr() /
do_set_msr() refuses and returns how many it processed; a refused read zeroes that entry's data
(kvm_do_msr_access()), the entries after it are copied back untouched; nmsrs >= MAX_IO_MSRS is
E2BIG. Host-initiated writes skip the guest's checks (set_efer(): LMA is the vCPU's, whatever
was written) but keep the value checks (canonical bases, kvm_pat_valid(), EFER reserved bits,
kvm_apic_set_base()). The same calls run on HostBackend and EmuBackend(profile=host) and the
transcripts must match; the MSRs the guest then reads with RDMSR are compared too."""

from __future__ import annotations

import errno

import pytest

from kvmpy.uapi import make_msrs

from .test_differential_guest import (
    Probe,
    Transcript,
    assert_same,
    differential,
    host_cpuid,
    run_rec,
)

STAR, LSTAR, CSTAR, SFMASK = 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084
FS_BASE, GS_BASE, KERNEL_GS_BASE, TSC_AUX = 0xC0000100, 0xC0000101, 0xC0000102, 0xC0000103
EFER, PAT, APIC_BASE = 0xC0000080, 0x277, 0x1B
SYSENTER_CS, SYSENTER_ESP, SYSENTER_EIP = 0x174, 0x175, 0x176
UNKNOWN = 0x12345          # no such MSR: KVM_MSR_RET_UNSUPPORTED, not advertised
SENTINEL = 0x5A5A5A5A5A5A5A5A

# Values every vendor keeps as written (32-bit SYSENTER_* and SFMASK: AMD drops the high half of
# SYSENTER_ESP/EIP for an AMD guest, Intel refuses FMASK bits 63:32).
ROUND_TRIP = [
    (STAR, 0x0023001000000000), (LSTAR, 0xFFFFFFFF81000000), (CSTAR, 0x7FFF00001000),
    (SFMASK, 0x47700), (FS_BASE, 0x7F0000001000), (GS_BASE, 0xFFFF888000000000),
    (KERNEL_GS_BASE, 0x12345000), (SYSENTER_CS, 0x10), (SYSENTER_ESP, 0x8000F000),
    (SYSENTER_EIP, 0x80001000), (PAT, 0x0007040600070406 ^ 0x0100000000000000),
    (TSC_AUX, 3), (APIC_BASE, 0xFEE00900), (EFER, 0x501),
]
ALL = [i for i, _ in ROUND_TRIP]


def _msrs(pairs: list[tuple[int, int]]) -> object:
    buf = make_msrs(len(pairs))
    for k, (idx, v) in enumerate(pairs):
        buf.entries[k].index, buf.entries[k].data = idx, v
    return buf


def _get(p: Probe, t: Transcript, label: str, indices: list[int], vcpu: object = None) -> None:
    v = vcpu or p.vcpu
    buf: object = _msrs([(i, SENTINEL) for i in indices])
    err, n = v.try_get_msrs(buf)  # type: ignore[attr-defined]
    t.append((label, int(err), n,
              tuple((e.index, e.data) for e in buf.entries)))  # type: ignore[attr-defined]


def _set(p: Probe, t: Transcript, label: str, pairs: list[tuple[int, int]],
         vcpu: object = None) -> None:
    v = vcpu or p.vcpu
    err, n = v.try_set_msrs(_msrs(pairs))  # type: ignore[attr-defined]
    t.append((label, int(err), n))


def test_msr_ioctls_match_real_kvm() -> None:
    """Reset values on a fresh vCPU, a round trip of every modelled MSR (LMA dropped from a
    host write of EFER in real mode, kept in long mode), stop-at-first-unsupported counts for
    reads and writes, refused values, E2BIG; then the guest's RDMSR sees the host's writes (it
    reports with an IN: RIP stays at the IN on every KVM, while an OUT exit's RIP is after the
    OUT on this host's kvm_pvm and at it on kvm_amd/kvm_intel, kvm_fast_pio_out())."""
    src = """
    mov ecx, 0xC0000081
    rdmsr
    mov r8, rax
    mov r9, rdx
    mov ecx, 0xC0000102
    rdmsr
    mov r10, rax
    mov r11, rdx
    mov ecx, 0xC0000082
    mov eax, 0x2000
    mov edx, 0xFFFFFFFF
    wrmsr
    mov dx, 1
    in al, dx
    hlt
    """

    def body(p: Probe, t: Transcript) -> None:
        fresh = p.vm.create_vcpu(1)
        fresh.set_cpuid2(host_cpuid())
        _get(p, t, "reset", ALL, fresh)
        _set(p, t, "set-real-mode", ROUND_TRIP, fresh)
        _get(p, t, "get-real-mode", ALL, fresh)
        _set(p, t, "set-long-mode", ROUND_TRIP)
        _get(p, t, "get-long-mode", ALL)
        # Stop at the first unsupported entry: one processed, the rest untouched.
        _set(p, t, "set-stop", [(STAR, 0x0033002000000000), (UNKNOWN, 0), (LSTAR, 0x1000)])
        _get(p, t, "get-stop", [STAR, UNKNOWN, LSTAR])
        _get(p, t, "get-first-unknown", [UNKNOWN, STAR])
        # Refused values stop the batch too.
        # Non-canonical for 48- and 57-bit hosts (max_host_virt_addr_bits()).
        _set(p, t, "lstar-noncanonical", [(CSTAR, 0x2000), (LSTAR, 0x0100000000000000)])
        _set(p, t, "efer-reserved", [(EFER, 0xD04)])
        _set(p, t, "apic-extd-without-en", [(APIC_BASE, 0xFEE00500)])
        _get(p, t, "after-refusals", [CSTAR, LSTAR, PAT, EFER, APIC_BASE])
        _set(p, t, "empty", [])
        big = make_msrs(256)
        err, n = p.vcpu.try_get_msrs(big)
        t.append(("e2big", int(err), n))
        _set(p, t, "guest-values", [(STAR, 0x0023001000000000), (KERNEL_GS_BASE, 0x1234_5000)])
        run_rec(p, t, "guest")
        _get(p, t, "after-guest", [LSTAR])
        # MSR_IA32_SMBASE and KVM_SMI exist only with SMM (0x30000 / 0; else stop / ENOTTY).
        _get(p, t, "smbase", [0x9E])
        t.append(("smi", int(p.vcpu.try_smi())))

    kvm_t, emu_t = differential(src, body)
    assert_same(kvm_t, emu_t)
    # The properties themselves (so that two equally wrong backends cannot pass).
    rows = {r[0]: r for r in emu_t}
    assert rows["set-stop"][1:] == (0, 1)
    assert rows["get-stop"][2] == 1 and rows["get-stop"][3][1] == (UNKNOWN, 0)
    assert rows["get-stop"][3][2] == (LSTAR, SENTINEL)
    assert rows["get-first-unknown"][2] == 0
    assert rows["e2big"][1] == errno.E2BIG
    assert dict(rows["get-real-mode"][3])[EFER] == 0x101
    assert dict(rows["get-long-mode"][3])[EFER] == 0x501 | 0x400


def test_invalid_pat_host_write_divergence_pinned() -> None:
    """kvm_set_msr_common() refuses a PAT with a reserved memory type (2 or 3) through
    kvm_pat_valid(), host-initiated or not, on kvm_intel and kvm_amd; the emulator follows it.
    This host's kvm_pvm (an out-of-tree PVM module on 6.18) accepts the write: pinned here, the
    kernel's answer elsewhere."""
    import os

    def body(p: Probe, t: Transcript) -> None:
        _set(p, t, "pat-invalid", [(PAT, 0x0007040600070402)])

    kvm_t, emu_t = differential("hlt", body)
    pvm = os.path.isdir("/sys/module/kvm_pvm")
    assert (kvm_t[0][2], emu_t[0][2]) == ((1 if pvm else 0), 0)


@pytest.mark.parametrize("bad", ["nmsrs", "entries"])
def test_msr_ioctl_bad_pointer_is_efault_on_both(bad: str) -> None:
    """msr_io(): a header or entries array the kernel cannot copy is EFAULT, never a crash."""
    import ctypes

    from kvmpy.uapi import Ioctl

    def body(p: Probe, t: Transcript) -> None:
        with p.vcpu._use("KVM_GET_MSRS") as fd:
            if bad == "nmsrs":
                arg = 8
            else:
                hdr = (ctypes.c_uint32 * 2)(4, 0)    # 4 entries promised, none there
                page = p.kvm.backend.mmap(-1, 8192, 3, 0x22, 0)
                p.kvm.backend.munmap(page + 4096, 4096)
                ctypes.memmove(page + 4096 - 8, hdr, 8)
                arg = page + 4096 - 8
            try:
                p.kvm.backend.ioctl(fd, Ioctl.KVM_GET_MSRS, arg)
                t.append(("ok",))
            except OSError as e:
                t.append(("err", e.errno))
            if bad != "nmsrs":
                p.kvm.backend.munmap(page, 4096)

    kvm_t, emu_t = differential("hlt", body)
    assert_same(kvm_t, emu_t)
    assert kvm_t == [("err", errno.EFAULT)]
