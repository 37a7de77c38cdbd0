// SPDX-License-Identifier: GPL-2.0-only
/*
 * Guest of selftests/test_guest_memfd_guest.py: guest_memfd_test's test_guest_memfd_guest
 * (guest_memfd_test.c, test_guest_memfd_guest).
 */
#include "kvmpy_guest.h"

/* Every byte of [gpa, gpa+size) must be 0xaa (the host's fill); then fill it with 0xff. */
void guest_check_aa_write_ff(u64 gpa, u64 size)
{
	volatile u8 *mem = (volatile u8 *)gpa;
	u64 i;

	for (i = 0; i < size; i++)
		GUEST_ASSERT_MSG(mem[i] == 0xaa, "byte %lu of gpa %#lx is %#x, not 0xaa",
				 i, gpa, mem[i]);
	memset((void *)gpa, 0xff, size);
	GUEST_DONE();
}

/* SYNC once: the probe that tells whether KVM emulates this guest's instructions. */
void guest_sync_once(void)
{
	GUEST_SYNC(0);
	GUEST_DONE();
}
