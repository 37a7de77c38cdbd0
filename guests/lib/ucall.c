// SPDX-License-Identifier: GPL-2.0-only
/* ucall: guest -> host messages over PIO port 0x1000 (see kvmpy_guest.h). */
#include "kvmpy_guest.h"

static void copy_str(char *dst, const char *src, size_t cap)
{
	size_t i = 0;

	if (src)
		for (; i < cap - 1 && src[i]; i++)
			dst[i] = src[i];
	dst[i] = 0;
}

static void pio_exit(struct ucall *uc)
{
	/* The IN exits to the host with RIP at the instruction; RDI is the struct's
	 * guest-physical address (identity-mapped stack). AL receives the host's data. */
	__asm__ volatile("in %%dx, %%al"
			 : : "D"(uc), "d"((u16)UCALL_PIO_PORT) : "rax", "memory");
}

void ucall_send_full(u64 cmd, u64 nargs, const u64 *args, const char *file, u64 line,
		     const char *expr, const char *buffer)
{
	struct ucall uc;
	u64 i;

	if (nargs > UCALL_MAX_ARGS)
		nargs = UCALL_MAX_ARGS;
	uc.cmd = cmd;
	uc.nargs = nargs;
	for (i = 0; i < nargs; i++)
		uc.args[i] = args[i];
	uc.line = line;
	/* Only the strings a command uses are filled: guest code runs slowly on some hosts. */
	uc.file[0] = 0;
	uc.expr[0] = 0;
	uc.buffer[0] = 0;
	if (file)
		copy_str(uc.file, file, sizeof(uc.file));
	if (expr)
		copy_str(uc.expr, expr, sizeof(uc.expr));
	if (buffer)
		copy_str(uc.buffer, buffer, sizeof(uc.buffer));
	pio_exit(&uc);
}

void ucall_send(u64 cmd, u64 nargs, const u64 *args)
{
	ucall_send_full(cmd, nargs, args, NULL, 0, NULL, NULL);
}

void guest_printf(const char *fmt, ...)
{
	struct ucall uc;
	__builtin_va_list ap;

	uc.cmd = UCALL_PRINTF;
	uc.nargs = 0;
	uc.line = 0;
	uc.file[0] = 0;
	uc.expr[0] = 0;
	__builtin_va_start(ap, fmt);
	vsnprintf(uc.buffer, sizeof(uc.buffer), fmt, ap);
	__builtin_va_end(ap);
	pio_exit(&uc);
}

void __guest_assert_fail(const char *expr, const char *file, u64 line, u64 nvalues,
			 const u64 *values, const char *fmt, ...)
{
	char msg[UCALL_BUFFER_LEN];
	__builtin_va_list ap;

	msg[0] = 0;
	if (fmt) {
		__builtin_va_start(ap, fmt);
		vsnprintf(msg, sizeof(msg), fmt, ap);
		__builtin_va_end(ap);
	}
	/* The host raises on ABORT; if it resumes us anyway, keep reporting. */
	for (;;)
		ucall_send_full(UCALL_ABORT, nvalues, values, file, line, expr, msg);
}

/* Where a guest function returns to (its return address is set up by the host). */
void __guest_returned(u64 ret)
{
	for (;;)
		ucall_send(UCALL_DONE, 1, &ret);
}
