// SPDX-License-Identifier: GPL-2.0-only
/*
 * Guests for selftests/test_guest_smoke.py and bench/bench_guest.py.
 * Each function is a guest entry point: the host calls it by name with register arguments.
 * Loops stay tiny: on hosts where KVM emulates guest instructions one by one, each costs µs.
 */
#include "kvmpy_guest.h"

/* SYNC stages 0..n-1 (with stage*stage as a second value), then DONE. */
void guest_sync_stages(u64 n)
{
	u64 i;

	for (i = 0; i < n; i++)
		GUEST_SYNC(i, i * i);
	GUEST_DONE();
}

/* A guest assert that fails when a != b. */
void guest_assert_eq(u64 a, u64 b)
{
	GUEST_ASSERT_EQ(a, b);
	GUEST_DONE();
}

/* GUEST_ASSERT_MSG with a formatted message. */
void guest_assert_msg(u64 v)
{
	GUEST_ASSERT_MSG(v < 10, "v=%lu is not below %d", v, 10);
	GUEST_DONE();
}

/* A PRINTF, then the return value travels back in DONE's args[0]. */
u64 guest_say_hello(u64 v)
{
	GUEST_PRINTF("hello from the guest: v=%lu hex=%#lx str=%s", v, v, "ok");
	return v + 1;
}

/* Read a u64 at addr (a #PF when addr is not mapped) and SYNC it. */
void guest_read_addr(u64 addr)
{
	GUEST_SYNC(*(volatile u64 *)addr);
	GUEST_DONE();
}

/* An invalid opcode. */
void guest_ud(void)
{
	__asm__ volatile("ud2");
	GUEST_DONE();
}

/* Never exits: the watchdog must stop it. */
void guest_spin(void)
{
	for (;;)
		cpu_relax();
}

/*
 * Check that [gva, gva+size) holds `expect` at the first and last byte of every page, then
 * fill the range with `fill` and report the first qword read back.
 */
void guest_mem_rw(u64 gva, u64 size, u64 expect, u64 fill)
{
	volatile u8 *p = (volatile u8 *)gva;
	u64 off;

	for (off = 0; off < size; off += PAGE_SIZE) {
		GUEST_ASSERT_EQ(p[off], expect);
		GUEST_ASSERT_EQ(p[off + PAGE_SIZE - 1], expect);
	}
	memset((void *)gva, (int)fill, size);
	GUEST_SYNC(*(volatile u64 *)gva);
	GUEST_DONE();
}

/*
 * Rendezvous of n vCPUs: each increments *counter and waits until all n have arrived, so the
 * guests only finish if they run at the same time.
 */
void guest_rendezvous(u64 counter, u64 n, u64 id)
{
	volatile u64 *c = (volatile u64 *)counter;

	__atomic_fetch_add(c, 1, __ATOMIC_SEQ_CST);
	while (*c < n)
		cpu_relax();
	GUEST_SYNC(id, *c);
	GUEST_DONE();
}

/* SYNC n times with no other work: the ucall round trip, for the benchmark. */
void guest_ucall_loop(u64 n)
{
	u64 i;

	for (i = 0; i < n; i++)
		GUEST_SYNC(i);
	GUEST_DONE();
}

/* Return at once (DONE with the return value): VM setup cost, for the benchmark. */
u64 guest_nop(void)
{
	return 0;
}

/* Unbounded recursion: runs into the unmapped guard page below the vCPU's stack. */
u64 guest_stack_overflow(u64 n)
{
	volatile u64 pad[8];

	pad[0] = n;
	return n ? guest_stack_overflow(n + 1) + pad[0] : 0;
}

/* One KVM hypercall (vmcall or vmmcall by CPU vendor); SYNC its return value. */
void guest_hypercall(u64 nr, u64 a0, u64 a1, u64 a2)
{
	GUEST_SYNC(kvm_hypercall(nr, a0, a1, a2, 0));
	GUEST_DONE();
}

static u64 handled_vector;

static void skip_ud2(struct ex_regs *regs)
{
	WRITE_ONCE(handled_vector, regs->vector);
	regs->rip += 2; /* ud2 is 0f 0b */
}

/* A guest-installed #UD handler: the exception is handled in the guest, which goes on. */
void guest_handled_ud(u64 magic)
{
	u64 kept = magic;

	guest_install_handler(6, skip_ud2);
	__asm__ volatile("ud2" : "+r"(kept));
	guest_install_handler(6, NULL);
	GUEST_SYNC(READ_ONCE(handled_vector), kept);
	GUEST_DONE();
}

/* The formats vsnprintf supports, for comparison with the host's formatting. */
void guest_printf_formats(s64 neg, u64 big)
{
	GUEST_PRINTF("[%d] [%5u] [%-4x] [%08lx] [%c] [%%] [%s] [%lld] [%#X] [%zu]",
		     (int)neg, 42u, 0xabu, big, 'z', "str", neg, 0xbeefu, (size_t)7);
}
