// SPDX-License-Identifier: GPL-2.0-only
/*
 * Guest of the model-based tests (kvmpy/model/harness.py, selftests/test_model_statemachine.py).
 *
 * One qword access per command: the host writes {op, gpa, val} into the mailbox (low memory,
 * identity mapped), the guest performs it and reports. An access that exits (KVM_EXIT_MMIO is
 * completed by the next KVM_RUN; KVM_EXIT_MEMORY_FAULT is not, the host restarts the loop at
 * its entry) is what the model predicts; the loop itself keeps no state, so a restart is safe.
 */
#include "kvmpy_guest.h"

#define OP_STOP 0
#define OP_READ 1
#define OP_WRITE 2

struct model_cmd {
	u64 op;
	u64 gpa;
	u64 val;
};

void guest_model_loop(struct model_cmd *cmd)
{
	u64 v;

	for (;;) {
		GUEST_SYNC(0);
		switch (READ_ONCE(cmd->op)) {
		case OP_READ:
			v = *(volatile u64 *)READ_ONCE(cmd->gpa);
			GUEST_SYNC(OP_READ, v);
			break;
		case OP_WRITE:
			*(volatile u64 *)READ_ONCE(cmd->gpa) = READ_ONCE(cmd->val);
			GUEST_SYNC(OP_WRITE);
			break;
		default:
			GUEST_DONE();
		}
	}
}
