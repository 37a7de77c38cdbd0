// SPDX-License-Identifier: GPL-2.0-only
/*
 * Guest of selftests/test_private_mem_conversions.py (the kernel's
 * x86/private_mem_conversions_test).
 *
 * Each vCPU owns a per-CPU area at `base` (GVA == GPA, AREA_SIZE = 2 MiB + 4 KiB mapped) and
 * asks the host to convert ranges of it with KVM_HC_MAP_GPA_RANGE (hypercalls.rst). The third
 * hypercall argument carries this test's own bits (KVM passes a2 through to userspace
 * unread): SET_ATTRIBUTES, SHARED and DO_FALLOCATE, decoded by selftests/test_private_mem_conversions.py.
 * GUEST_SYNC(SYNC_SHARED, gpa, size, cur, new) asks the host to check that the shared backing
 * holds `cur` and to fill it with `new`; GUEST_SYNC(SYNC_PRIVATE, gpa, size, p) asks it to check
 * that the shared backing still holds `p` (private writes never reach it).
 */
#include "private_mem.h"

#define SZ_2M (2UL << 20)
#define AREA_SIZE (SZ_2M + PAGE_SIZE)

/* (offset, size) pairs within the area: the §5.2 range table. */
static const struct {
	u64 offset;
	u64 size;
} ranges[] = {
	{ 0, PAGE_SIZE },
	{ 0, SZ_2M },
	{ PAGE_SIZE, PAGE_SIZE },
	{ PAGE_SIZE, SZ_2M },
	{ SZ_2M, PAGE_SIZE },
};

static void map_shared(u64 gpa, u64 size, bool do_fallocate)
{
	map_gpa_range(gpa, size, MAP_GPA_SET_ATTRIBUTES | MAP_GPA_SHARED |
		      (do_fallocate ? MAP_GPA_DO_FALLOCATE : 0));
}

static void map_private(u64 gpa, u64 size, bool do_fallocate)
{
	map_gpa_range(gpa, size, MAP_GPA_SET_ATTRIBUTES |
		      (do_fallocate ? MAP_GPA_DO_FALLOCATE : 0));
}

/* DO_FALLOCATE|SHARED without SET_ATTRIBUTES: the host only punches the guest_memfd. */
static void punch_hole(u64 gpa, u64 size)
{
	map_gpa_range(gpa, size, MAP_GPA_DO_FALLOCATE | MAP_GPA_SHARED);
}

static void sync_shared(u64 gpa, u64 size, u8 cur, u8 new)
{
	GUEST_SYNC(SYNC_SHARED, gpa, size, cur, new);
}

static void sync_private(u64 gpa, u64 size, u8 p)
{
	GUEST_SYNC(SYNC_PRIVATE, gpa, size, p);
}

static void explicit_conversion(u64 base, bool do_fallocate)
{
	const u8 def_p = 0xaa, init_p = 0xcc;
	u64 i, j;

	/* The area starts shared: the host sees the guest's writes and the guest the host's. */
	fill(base, def_p, AREA_SIZE);
	sync_shared(base, AREA_SIZE, def_p, init_p);
	check_pattern(base, init_p, AREA_SIZE);

	for (i = 0; i < ARRAY_SIZE(ranges); i++) {
		const u8 p1 = 0x11, p2 = 0x22, p3 = 0x33, p4 = 0x44;
		u64 gpa = base + ranges[i].offset;
		u64 size = ranges[i].size;

		/* Written while shared, then converted: the shared backing keeps p1. */
		fill(gpa, p1, size);
		map_private(gpa, size, do_fallocate);

		if (size > PAGE_SIZE) {
			fill(gpa, p2, PAGE_SIZE);
			goto skip;
		}

		/* Private writes land in the guest_memfd; the host still sees p1. */
		fill(gpa, p2, size);
		sync_private(gpa, size, p1);
		check_pattern(gpa, p2, size);
		/* The rest of the area was not touched by the conversion. */
		check_pattern(base, init_p, gpa - base);
		check_pattern(gpa + size, init_p, base + AREA_SIZE - (gpa + size));

		/* Odd pages back to shared (the host's data shows), even pages stay private. */
		for (j = 0; j < size; j += PAGE_SIZE) {
			if ((j / PAGE_SIZE) & 1) {
				map_shared(gpa + j, PAGE_SIZE, do_fallocate);
				sync_shared(gpa + j, PAGE_SIZE, p1, p3);
				check_pattern(gpa + j, p3, PAGE_SIZE);
			} else {
				sync_private(gpa + j, PAGE_SIZE, p1);
			}
		}
skip:
		/* All shared again: a guest write is seen by the host and vice versa. */
		map_shared(gpa, size, do_fallocate);
		fill(gpa, p3, size);
		sync_shared(gpa, size, p3, p4);
		check_pattern(gpa, p4, size);

		fill(gpa, init_p, size);
		/* Free every private page so the next range starts clean. */
		map_shared(base, AREA_SIZE, true);
	}
}

static void punch_hole_test(u64 base, bool precise)
{
	const u8 init_p = 0xcc;
	u64 i;

	/* Private throughout: this phase is about the guest_memfd alone. */
	map_private(base, AREA_SIZE, false);

	for (i = 0; i < ARRAY_SIZE(ranges); i++) {
		u64 gpa = base + ranges[i].offset;
		u64 size = ranges[i].size;

		punch_hole(base, AREA_SIZE);
		if (precise) {
			fill(gpa, init_p, size);
			check_pattern(gpa, init_p, size);
		} else {
			fill(base, init_p, AREA_SIZE);
			check_pattern(base, init_p, AREA_SIZE);
		}
		/* Freed private memory faults back in zeroed. */
		punch_hole(gpa, size);
		__check_pattern(gpa, 0, size, "private memory read after PUNCH_HOLE must be zero");
	}
}

void guest_conversions(u64 base)
{
	explicit_conversion(base, false);
	explicit_conversion(base, true);
	punch_hole_test(base, false);
	punch_hole_test(base, true);
	GUEST_DONE();
}
