"""KVM_X86_QUIRK_FIX_HYPERCALL_INSN on and off: what KVM does when a guest executes the other
vendor's hypercall instruction (tools/testing/selftests/kvm/x86/fix_hypercall_test.c).

KVM intercepts #UD; its instruction emulator decodes vmcall/vmmcall as a hypercall
(arch/x86/kvm/emulate.c em_hypercall -> x86.c emulator_fix_hypercall). With the quirk enabled
(the default) KVM rewrites the instruction in guest memory to the one its vendor module
executes natively (vmx: vmcall, svm: vmmcall; kvm_x86_ops.patch_hypercall) and the guest, which
re-executes it, gets the hypercall's result. With the quirk disabled through
KVM_CAP_DISABLE_QUIRKS2, emulator_fix_hypercall() synthesizes #UD and leaves guest memory alone
(Documentation/virt/kvm/api.rst 7.31 KVM_CAP_DISABLE_QUIRKS2, KVM_X86_QUIRK_FIX_HYPERCALL_INSN).

"Native" is decided by the vCPU's CPUID vendor (as the C test's host_cpu_is_intel /
host_cpu_is_amd_compatible, which read the CPUID the guest also sees), never by a host name.
The guest is smoke.c's guest_hypercall: the host overwrites the instruction kvm_hypercall()
would execute for this vendor with the other vendor's, before the vCPU first runs.

The emulated KVM executes either instruction as a hypercall and does not model the patching or
the quirk (KVM_CAP_DISABLE_QUIRKS2 is 0 there): these cases run on real KVM only.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvmpy.backend.host import kvm_module
from kvmpy.guest import GuestException, GuestTimeout, GuestVm, UcallCmd
from kvmpy.system import Kvm
from kvmpy.testing.require import require_cap
from kvmpy.uapi import Cap, Quirk

pytestmark = pytest.mark.guest

VMCALL = b"\x0f\x01\xc1"       # Intel (VMX)
VMMCALL = b"\x0f\x01\xd9"      # AMD (SVM)
KVM_HC_MAP_GPA_RANGE = 12
KVM_ENOSYS = 1000              # include/uapi/linux/kvm_para.h


@pytest.fixture
def g(kvm: Kvm) -> Iterator[GuestVm]:
    if not kvm.backend.is_real:
        pytest.skip("hypercall patching (KVM_X86_QUIRK_FIX_HYPERCALL_INSN) is not modelled by "
                    f"the emulated KVM ({kvm.backend.describe()})")
    with GuestVm(kvm, "smoke", timeout=20.0) as gvm:
        yield gvm


# The instruction each vendor module executes natively, i.e. what kvm_x86_ops.patch_hypercall
# writes (vmx.c vmx_patch_hypercall: vmcall; svm.c svm_patch_hypercall: vmmcall). kvm_pvm (out of
# tree) is not tied to the CPU vendor: it patched vmmcall to vmcall on an Intel host and ran
# vmcall after #UD on an AMD host (both seen here).
MODULE_NATIVE = {"kvm_intel": VMCALL, "kvm_amd": VMMCALL, "kvm_pvm": VMCALL}


def executed_native_other(g: GuestVm) -> tuple[bytes, bytes, bytes]:
    """(what kvm_hypercall() executes for the vCPU's CPUID vendor, the instruction the KVM module
    executes natively, the other one). Unknown modules: the CPUID vendor's."""
    leaf0 = next(e for e in g.cpuid if e.function == 0)
    amd = leaf0.ebx.to_bytes(4, "little") in (b"Auth", b"Hygo")   # AuthenticAMD, HygonGenuine
    executed = VMMCALL if amd else VMCALL
    native = MODULE_NATIVE.get(kvm_module(), executed)
    return executed, native, (VMCALL if native == VMMCALL else VMMCALL)


def plant_other_insn(g: GuestVm) -> tuple[int, bytes, bytes]:
    """Make the instruction kvm_hypercall() executes the one KVM does not run natively (already
    so under kvm_pvm on AMD); returns (its gpa, native, other)."""
    executed, native, other = executed_native_other(g)
    base = g.image.symbol("kvm_hypercall")
    code = g.read_phys(base, 256)
    at = code.find(executed)
    assert at >= 0 and other in code, f"kvm_hypercall has no {executed.hex()} / {other.hex()}"
    g.write_phys(base + at, other)
    return base + at, native, other


def test_fix_hypercall_quirk_enabled_patches_native_insn(g: GuestVm) -> None:
    """Quirk enabled (default): KVM patches the other vendor's instruction to its native one
    and the hypercall completes (-KVM_ENOSYS: KVM_HC_MAP_GPA_RANGE without
    KVM_CAP_EXIT_HYPERCALL enabled). Where KVM's instruction emulator runs the whole guest
    (kvm_pvm) the patched vmcall is re-executed until a signal (see test_guest_smoke's
    test_hypercall_uses_vendor_instruction): the watchdog stops it at the patched site."""
    gpa, native, other = plant_other_insn(g)
    vcpu = g.vcpu("guest_hypercall", KVM_HC_MAP_GPA_RANGE, 1 << 32, 1, 0)
    try:
        uc = g.run_until_ucall(vcpu, timeout=5.0)
    except GuestTimeout as e:
        assert e.rip == gpa, g.image.symbolize(e.rip)
    else:
        assert uc.cmd == UcallCmd.SYNC and uc.args == ((-KVM_ENOSYS) & (2**64 - 1),), str(uc)
    assert g.read_phys(gpa, 3) == native, (
        f"guest memory at {g.image.symbolize(gpa)} holds {g.read_phys(gpa, 3).hex()}, "
        f"KVM should have patched {other.hex()} to {native.hex()}")


def test_fix_hypercall_quirk_disabled_injects_ud(g: GuestVm) -> None:
    """Quirk disabled (KVM_CAP_DISABLE_QUIRKS2): the other vendor's instruction raises #UD in
    the guest with RIP at it, and guest memory keeps the guest's own bytes."""
    require_cap(g.vm, Cap.DISABLE_QUIRKS2, Quirk.FIX_HYPERCALL_INSN)
    g.vm.enable_cap(Cap.DISABLE_QUIRKS2, Quirk.FIX_HYPERCALL_INSN)
    gpa, _, other = plant_other_insn(g)
    vcpu = g.vcpu("guest_hypercall", KVM_HC_MAP_GPA_RANGE, 1 << 32, 1, 0)
    with pytest.raises(GuestException, match=r"#UD \(vector 6\)") as ei:
        g.run(vcpu)
    assert ei.value.rip == gpa, g.image.symbolize(ei.value.rip)
    assert g.read_phys(gpa, 3) == other, "KVM patched the instruction with the quirk disabled"
