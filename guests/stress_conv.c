// SPDX-License-Identifier: GPL-2.0-only
/*
 * Guest of selftests/test_stress.py: several vCPUs read and write pages while the host
 * converts (KVM_SET_MEMORY_ATTRIBUTES) and punches (fallocate PUNCH_HOLE) them.
 *
 * The host publishes each page's state in `ctl` (low memory) as epoch << 2 | kind and moves a
 * page only after a grace period: it stores TRANSITION, waits until every vCPU has started two
 * more iterations (ack), then converts/punches, then publishes the new epoch. So an iteration
 * that read a stable state did all its accesses under that state, and the guest can check:
 *
 *   SHARED  q0 is the host's value of this epoch and not older than hostseq[p] (no lost host
 *           write), q1 == 0 (no private data visible as shared); writes q2 (for the host).
 *   PRIVATE q0 == 0 (the host's shared data is not visible as private, and private memory
 *           starts zeroed: every private epoch begins with a punched guest_memfd range),
 *           q1 is 0 or private data of this epoch (no stale private data from before the
 *           punch); writes q1.
 * Returns (shared accesses << 32) | private accesses.
 */
#include "kvmpy_guest.h"

#define KIND_TRANSITION 0
#define KIND_SHARED 1
#define KIND_PRIVATE 2

#define TAG_HOST 0x48UL
#define TAG_PRIV 0x50UL
#define TAG_SG 0x53UL
#define TAG(v) ((v) >> 56)
#define EPOCH(v) (((v) >> 24) & 0xffffffUL)
#define SEQ(v) ((v) & 0xffffffUL)

#define MAX_PAGES 64
#define MAX_VCPUS 8
#define ACK_DONE (1UL << 63)

struct stress_ctl {
	u64 stop;
	u64 npages;
	u64 base;
	u64 max_iters;
	u64 state[MAX_PAGES];
	u64 hostseq[MAX_PAGES];
	u64 ack[MAX_VCPUS];
};

static u64 value(u64 tag, u64 epoch, u64 low)
{
	return tag << 56 | (epoch & 0xffffffUL) << 24 | (low & 0xffffffUL);
}

u64 guest_stress(struct stress_ctl *ctl, u64 me)
{
	u64 rnd = 0x9E3779B97F4A7C15UL * (me + 1), n_shared = 0, n_private = 0, it;

	for (it = 0; it < ctl->max_iters && !READ_ONCE(ctl->stop); it++) {
		u64 p, s, e, *pg, m0, m1, h;

		WRITE_ONCE(ctl->ack[me], it + 1);
		rnd = rnd * 6364136223846793005UL + 1442695040888963407UL;
		p = (rnd >> 33) % ctl->npages;
		s = READ_ONCE(ctl->state[p]);
		e = s >> 2;
		pg = (u64 *)(ctl->base + p * PAGE_SIZE);
		if ((s & 3) == KIND_SHARED) {
			h = READ_ONCE(ctl->hostseq[p]);
			m0 = READ_ONCE(pg[0]);
			m1 = READ_ONCE(pg[1]);
			GUEST_ASSERT_MSG(TAG(m0) == TAG_HOST && EPOCH(m0) == (e & 0xffffff) &&
					 SEQ(m0) >= SEQ(h),
					 "page %lu shared epoch %lu: q0 %#lx, host wrote %#lx (lost host write?)",
					 p, e, m0, h);
			GUEST_ASSERT_MSG(m1 == 0, "page %lu shared epoch %lu: q1 %#lx (private data visible as shared)",
					 p, e, m1);
			WRITE_ONCE(pg[2], value(TAG_SG, e, me << 16 | (it & 0xffff)));
			n_shared++;
		} else if ((s & 3) == KIND_PRIVATE) {
			m0 = READ_ONCE(pg[0]);
			m1 = READ_ONCE(pg[1]);
			GUEST_ASSERT_MSG(m0 == 0, "page %lu private epoch %lu: q0 %#lx (shared data or stale memory visible as private)",
					 p, e, m0);
			GUEST_ASSERT_MSG(m1 == 0 || (TAG(m1) == TAG_PRIV && EPOCH(m1) == (e & 0xffffff)),
					 "page %lu private epoch %lu: q1 %#lx (stale private data: punch-hole lost?)",
					 p, e, m1);
			WRITE_ONCE(pg[1], value(TAG_PRIV, e, me << 16 | (it & 0xffff)));
			n_private++;
		}
	}
	WRITE_ONCE(ctl->ack[me], ACK_DONE);
	return n_shared << 32 | n_private;
}
