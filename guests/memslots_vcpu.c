// SPDX-License-Identifier: GPL-2.0-only
/*
 * Guests of selftests/test_memslots_vcpu.py: set_memory_region_test.c's vCPU cases
 * (guest_code_move_memory_region, guest_code_delete_memory_region,
 * guest_code_mmio_during_vectoring), written for kvmpy's guest library.
 */
#include "kvmpy_guest.h"

/* What the host supplies for an MMIO read of the test region (upstream's MMIO_VAL). */
#define MMIO_VAL 0xbeefull
/* A non-canonical address: dereferencing it is a #GP (upstream's NONCANONICAL). */
#define NONCANONICAL 0xaaaaaaaaaaaaaaaaull

struct desc_ptr {
	u16 size;
	u64 address;
} __attribute__((packed));

static void load_idt(u64 base, u16 size)
{
	struct desc_ptr d = { .size = size, .address = base };

	__asm__ volatile("lidt %0" : : "m"(d) : "memory");
}

/*
 * Spin while *gpa == spin_val, then SYNC and return what was read. Always inlined, as upstream's
 * static inline guest_spin_on_val() is at -O2: guest_delete_region() brackets its last spin
 * with final_rip_start/end, and an out-of-line loop lies outside the brackets.
 */
static inline __attribute__((always_inline)) u64 spin_on_val(u64 gpa, u64 spin_val)
{
	u64 val;

	do {
		val = READ_ONCE(*(u64 *)gpa);
	} while (val == spin_val);
	GUEST_SYNC(0);
	return val;
}

void guest_move_region(u64 gpa)
{
	u64 val;

	GUEST_SYNC(0);
	/* The region moves to gpa - 4K: the guest sees the host's "1" late, or MMIO. */
	val = spin_on_val(gpa, 0);
	GUEST_ASSERT_MSG(val == 1 || val == MMIO_VAL, "expected 1 or MMIO, got %#lx", val);
	val = spin_on_val(gpa, MMIO_VAL);
	GUEST_ASSERT_MSG(val == 1 || val == 0, "expected 0 or 1 (no MMIO), got %#lx", val);
	val = spin_on_val(gpa, 0);
	GUEST_ASSERT_MSG(val == 1 || val == MMIO_VAL, "expected 1 or MMIO, got %#lx", val);
	val = spin_on_val(gpa, MMIO_VAL);
	GUEST_ASSERT_EQ(val, 1);
	GUEST_DONE();
}

void guest_delete_region(u64 gpa)
{
	u64 val;

	/* No IDT: a #PF once the page tables are gone escalates to a triple fault. */
	load_idt(0, 0);
	GUEST_SYNC(0);
	val = spin_on_val(gpa, 0);		/* deleted: MMIO */
	GUEST_ASSERT_EQ(val, MMIO_VAL);
	val = spin_on_val(gpa, MMIO_VAL);	/* recreated: zero */
	GUEST_ASSERT_EQ(val, 0);
	val = spin_on_val(gpa, 0);		/* deleted again */
	GUEST_ASSERT_EQ(val, MMIO_VAL);
	__asm__ volatile("1:\n\t"
			 ".pushsection .rodata\n\t"
			 ".global final_rip_start\n\t"
			 "final_rip_start: .quad 1b\n\t"
			 ".popsection");
	/* Spin until slot 0 (code, stack, page tables) is deleted. */
	spin_on_val(gpa, MMIO_VAL);
	__asm__ volatile("1:\n\t"
			 ".pushsection .rodata\n\t"
			 ".global final_rip_end\n\t"
			 "final_rip_end: .quad 1b\n\t"
			 ".popsection");
	GUEST_ASSERT(0);
}

void guest_mmio_during_vectoring(u64 idt_gpa)
{
	load_idt(idt_gpa, 0xfff);
	*(volatile u8 *)NONCANONICAL = 1;
	GUEST_ASSERT(0);
}

/* SYNC once: the probe that tells whether KVM emulates this guest's instructions. */
void guest_sync_once(void)
{
	GUEST_SYNC(0);
	GUEST_DONE();
}
