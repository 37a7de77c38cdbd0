/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * Guest side shared by the private-memory guests (private_mem_conversions.c,
 * private_mem_beyond.c): the KVM_HC_MAP_GPA_RANGE request with the conversions test's own a2
 * bits (KVM passes a2 through to userspace unread; the host side is selftests/test_private_mem_conversions.py),
 * the SYNC stages, and page-aligned pattern fill/check with qword string instructions: one
 * instruction for the whole range (cheap where guest instructions are emulated one by one), and
 * 8 bytes per iteration where an emulator iterates.
 */
#ifndef KVMPY_PRIVATE_MEM_H
#define KVMPY_PRIVATE_MEM_H

#include "kvmpy_guest.h"

#define KVM_HC_MAP_GPA_RANGE 12

#define MAP_GPA_SET_ATTRIBUTES (1UL << 0)
#define MAP_GPA_SHARED (1UL << 1)
#define MAP_GPA_DO_FALLOCATE (1UL << 2)

#define SYNC_SHARED 1
#define SYNC_PRIVATE 2

#define QWORDS(b) ((u64)(u8)(b) * 0x0101010101010101UL)

static inline void fill(u64 gpa, u8 p, u64 size)
{
	void *d = (void *)gpa;
	u64 n = size / 8;

	__asm__ volatile("rep stosq" : "+D"(d), "+c"(n) : "a"(QWORDS(p)) : "memory");
}

/* Check that [gpa, gpa+size) holds `p` everywhere; on a mismatch name the first bad byte. */
static inline void __check_pattern(u64 gpa, u8 p, u64 size, const char *what)
{
	u64 *cur = (u64 *)gpa;
	u64 left = size / 8, q = QWORDS(p);
	u8 *b;
	int i;

	if (!size)
		return;
	__asm__ volatile("repe scasq" : "+D"(cur), "+c"(left) : "a"(q) : "cc", "memory");
	/* After a mismatch RDI is one qword past the bad one. */
	if (!left && cur[-1] == q)
		return;
	b = (u8 *)(cur - 1);
	for (i = 0; i < 7 && b[i] == p; i++)
		;
	GUEST_FAIL("%s: gpa %#lx holds byte %#x, expected %#x (range %#lx+%#lx)",
		   what, (u64)(b + i), b[i], p, gpa, size);
}

#define __str(x) #x
#define __xstr(x) __str(x)
/* The failure names the check's source line, unless a phase label is given. */
#define check_pattern(gpa, p, size) __check_pattern(gpa, p, size, "check at line " __xstr(__LINE__))

static inline void map_gpa_range(u64 gpa, u64 size, u64 flags)
{
	u64 ret = kvm_hypercall(KVM_HC_MAP_GPA_RANGE, gpa, size / PAGE_SIZE, flags, 0);

	GUEST_ASSERT_EQ(ret, 0);
}

#endif
