// SPDX-License-Identifier: GPL-2.0-only
/*
 * Guests of selftests/test_private_mem_kvm_exits.py (the kernel's
 * x86/private_mem_kvm_exits_test).
 */
#include "kvmpy_guest.h"

/* Read the u64 at `gva` forever: only an exit (here: KVM_EXIT_MEMORY_FAULT) stops it. */
void guest_repeatedly_read(u64 gva)
{
	volatile u64 v;

	for (;;)
		v = *(volatile u64 *)gva;
	(void)v;
}

/* SYNC once (so the host knows the guest runs), then read `gva` forever. */
void guest_sync_then_read(u64 gva)
{
	volatile u64 v;

	GUEST_SYNC(0);
	for (;;)
		v = *(volatile u64 *)gva;
	(void)v;
}
