// SPDX-License-Identifier: GPL-2.0-only
/* Exception dispatch: called by the IDT stubs in entry.S. */
#include "kvmpy_guest.h"

static guest_handler_t handlers[256];

void guest_install_handler(int vector, guest_handler_t handler)
{
	if (vector >= 0 && vector < 256)
		WRITE_ONCE(handlers[vector], handler);
}

void __guest_exception(struct ex_regs *regs)
{
	guest_handler_t h = READ_ONCE(handlers[regs->vector & 0xff]);
	u64 args[5];

	if (h) {
		h(regs);
		return;
	}
	args[0] = regs->vector;
	args[1] = regs->error_code;
	args[2] = regs->rip;
	args[3] = read_cr2();
	args[4] = regs->rsp;
	for (;;)
		ucall_send(UCALL_UNHANDLED, 5, args);
}
