// SPDX-License-Identifier: GPL-2.0-only
/*
 * Guests of selftests/test_private_mem_beyond.py: private-memory cases beyond the kernel's
 * selftests (userspace-resolved memory faults, conversions next to busy vCPUs, punch-hole
 * re-reads, KVM_HC_MAP_GPA_RANGE edge cases). The a2 bits of KVM_HC_MAP_GPA_RANGE are the
 * conversions test's (selftests/test_private_mem_conversions.py).
 */
#include "private_mem.h"

/* --- userspace resolves memory faults ------------------------------------------------------ */

/*
 * Write page idx of [base, base + npages pages) with byte idx + 1, visiting the pages in the
 * order idx = i * stride % npages (stride coprime to npages). Each page the host left private
 * in a slot without guest_memfd faults; the host converts it and re-runs, and the interrupted
 * rep stosq resumes. Then every page is read back.
 */
void guest_fault_loop(u64 base, u64 npages, u64 stride)
{
	u64 i, idx;

	for (i = 0; i < npages; i++) {
		idx = i * stride % npages;
		fill(base + idx * PAGE_SIZE, (u8)(idx + 1), PAGE_SIZE);
	}
	GUEST_SYNC(1);
	for (idx = 0; idx < npages; idx++)
		check_pattern(base + idx * PAGE_SIZE, (u8)(idx + 1), PAGE_SIZE);
	GUEST_DONE();
}

/* Write `p` over a private page, SYNC, then read the page back (after the host's changes). */
void guest_write_sync_read(u64 gpa, u64 p)
{
	fill(gpa, (u8)p, PAGE_SIZE);
	GUEST_SYNC(1);
	check_pattern(gpa, (u8)p, PAGE_SIZE);
	GUEST_DONE();
}

/* --- conversions while other vCPUs access neighbouring pages ---------------------------------- */

/* Shared between the vCPUs (guest .bss, identity-mapped low memory). */
static volatile u64 workers_started;
static volatile u64 stop_workers;

/*
 * Converter: for `rounds` rounds, each target page (base + 2k pages, k < ntargets) goes private,
 * is written and checked, the host checks its shared backing is untouched (SYNC_PRIVATE), goes
 * shared again, and the guest checks it reads the host's byte back (0x5a from the host fill).
 */
void guest_converter(u64 base, u64 ntargets, u64 rounds, u64 nworkers)
{
	u64 r, k;

	while (workers_started < nworkers)
		cpu_relax();
	for (r = 0; r < rounds; r++) {
		for (k = 0; k < ntargets; k++) {
			u64 gpa = base + 2 * k * PAGE_SIZE;
			u8 p = (u8)(0x80 + r * 8 + k);

			map_gpa_range(gpa, PAGE_SIZE, MAP_GPA_SET_ATTRIBUTES);
			fill(gpa, p, PAGE_SIZE);
			check_pattern(gpa, p, PAGE_SIZE);
			GUEST_SYNC(SYNC_PRIVATE, gpa, PAGE_SIZE, 0x5a);
			map_gpa_range(gpa, PAGE_SIZE, MAP_GPA_SET_ATTRIBUTES | MAP_GPA_SHARED |
				      MAP_GPA_DO_FALLOCATE);
			check_pattern(gpa, 0x5a, PAGE_SIZE);
		}
	}
	stop_workers = 1;
	GUEST_DONE();
}

/*
 * Worker: rewrite and re-check page `gpa` (a neighbour of the converted pages) with a new byte
 * each iteration until the converter is done; report the iterations and the last byte.
 */
void guest_neighbour(u64 gpa)
{
	u64 iter = 0;
	u8 p = 0;

	__atomic_fetch_add(&workers_started, 1, __ATOMIC_SEQ_CST);
	while (!stop_workers) {
		p = (u8)(iter * 13 + 1);
		fill(gpa, p, PAGE_SIZE);
		check_pattern(gpa, p, PAGE_SIZE);
		iter++;
	}
	GUEST_SYNC(1, iter, p);
	GUEST_DONE();
}

/* --- punch-hole, then re-read ----------------------------------------------------------------- */

/*
 * Two private pages a and b: write both, punch a (DO_FALLOCATE|SHARED without SET_ATTRIBUTES:
 * the host only frees a's guest_memfd page), re-read: a is zero, b intact. Then a is written
 * again (faulted back in) and the host checks neither write reached the shared backing.
 */
void guest_punch_reread(u64 a, u64 b)
{
	map_gpa_range(a, PAGE_SIZE, MAP_GPA_SET_ATTRIBUTES);
	map_gpa_range(b, PAGE_SIZE, MAP_GPA_SET_ATTRIBUTES);
	fill(a, 0x5a, PAGE_SIZE);
	fill(b, 0xa5, PAGE_SIZE);
	map_gpa_range(a, PAGE_SIZE, MAP_GPA_DO_FALLOCATE | MAP_GPA_SHARED);
	__check_pattern(a, 0, PAGE_SIZE, "punched private page must read back as zero");
	__check_pattern(b, 0xa5, PAGE_SIZE, "the neighbour of a punched page must keep its data");
	fill(a, 0x77, PAGE_SIZE);
	check_pattern(a, 0x77, PAGE_SIZE);
	GUEST_SYNC(SYNC_PRIVATE, a, PAGE_SIZE, 0x3c);
	GUEST_SYNC(SYNC_PRIVATE, b, PAGE_SIZE, 0x3c);
	GUEST_DONE();
}

/* --- KVM_HC_MAP_GPA_RANGE edge cases ---------------------------------------------------------- */

/* One raw KVM_HC_MAP_GPA_RANGE; the return value (RAX) travels back in DONE's args[0]. */
u64 guest_map_gpa_range_raw(u64 gpa, u64 npages, u64 attrs)
{
	return kvm_hypercall(KVM_HC_MAP_GPA_RANGE, gpa, npages, attrs, 0);
}

/* A guest that SYNCs once (probe for how KVM reaches guest memory). */
void guest_sync_once(void)
{
	GUEST_SYNC(0);
	GUEST_DONE();
}

/* --- a scripted guest (reproducers): ops written by the host into guest memory ------------- */
enum { OP_FILL = 1, OP_CHECK = 2, OP_MAP = 3, OP_SYNC = 4 };

struct op {
	u64 kind, gpa, size, arg;
};

/* Run `n` ops at `ops`: FILL/CHECK (gpa, size, byte), MAP (gpa, size, a2 flags), SYNC(arg). */
void guest_script(u64 ops, u64 n)
{
	const struct op *o = (const struct op *)ops;
	u64 i;

	for (i = 0; i < n; i++, o++) {
		switch (o->kind) {
		case OP_FILL:
			fill(o->gpa, (u8)o->arg, o->size);
			break;
		case OP_CHECK:
			check_pattern(o->gpa, (u8)o->arg, o->size);
			break;
		case OP_MAP:
			map_gpa_range(o->gpa, o->size, o->arg);
			break;
		case OP_SYNC:
			GUEST_SYNC(o->arg, i);
			break;
		default:
			GUEST_FAIL("op %lu: unknown kind %lu", i, o->kind);
		}
	}
	GUEST_DONE();
}
