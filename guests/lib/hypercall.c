// SPDX-License-Identifier: GPL-2.0-only
/* KVM hypercalls: vmcall (Intel) or vmmcall (AMD), per Documentation/virt/kvm/x86/hypercalls.rst. */
#include "kvmpy_guest.h"

static int vendor_amd = -1;

bool cpu_is_amd(void)
{
	u32 a, b, c, d;

	if (READ_ONCE(vendor_amd) < 0) {
		cpuid(0, 0, &a, &b, &c, &d);
		/* "AuthenticAMD" / "HygonGenuine": EBX holds the first four characters. */
		WRITE_ONCE(vendor_amd, b == 0x68747541 /* Auth */ || b == 0x6f677948 /* Hygo */);
	}
	return READ_ONCE(vendor_amd) == 1;
}

u64 kvm_hypercall(u64 nr, u64 a0, u64 a1, u64 a2, u64 a3)
{
	u64 ret;

	if (cpu_is_amd())
		__asm__ volatile("vmmcall"
				 : "=a"(ret) : "a"(nr), "b"(a0), "c"(a1), "d"(a2), "S"(a3) : "memory");
	else
		__asm__ volatile("vmcall"
				 : "=a"(ret) : "a"(nr), "b"(a0), "c"(a1), "d"(a2), "S"(a3) : "memory");
	return ret;
}
