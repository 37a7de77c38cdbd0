/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * kvmpy guest library: what a guest program includes.
 *
 * Guests are freestanding x86-64 code run by kvmpy's VM builder (kvmpy/guest/): long mode,
 * CPL 0, the low memslot identity-mapped (so the address of anything on a guest stack or in the
 * image is also its guest-physical address), arguments in RDI, RSI, RDX, RCX, R8, R9.
 * Returning from the guest function sends UCALL_DONE with the return value in args[0].
 *
 * ucall: the guest fills a struct ucall (on its own stack) and executes `in al, dx` with
 * DX = 0x1000 and RDI = the struct's guest-physical address; the host reads the struct from
 * guest memory (kvmpy/guest/ucall.py mirrors this layout; keep the two in sync).
 */
#ifndef KVMPY_GUEST_H
#define KVMPY_GUEST_H

typedef unsigned long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef long s64;
typedef int s32;
typedef unsigned long size_t;
typedef _Bool bool;
#define true 1
#define false 0
#define NULL ((void *)0)

#define PAGE_SIZE 4096UL
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

#define UCALL_PIO_PORT 0x1000

enum {
	UCALL_NONE = 0,
	UCALL_SYNC = 1,
	UCALL_ABORT = 2,
	UCALL_PRINTF = 3,
	UCALL_DONE = 4,
	UCALL_UNHANDLED = 5,
};

#define UCALL_MAX_ARGS 7
#define UCALL_FILE_LEN 128
#define UCALL_EXPR_LEN 256
#define UCALL_BUFFER_LEN 512

/* Layout shared with kvmpy/guest/ucall.py (976 bytes). */
struct ucall {
	u64 cmd;                        /* 0 */
	u64 nargs;                      /* 8 */
	u64 args[UCALL_MAX_ARGS];       /* 16 */
	u64 line;                       /* 72 */
	char file[UCALL_FILE_LEN];      /* 80 */
	char expr[UCALL_EXPR_LEN];      /* 208 */
	char buffer[UCALL_BUFFER_LEN];  /* 464 */
};

/* Send a ucall with up to UCALL_MAX_ARGS values. */
void ucall_send(u64 cmd, u64 nargs, const u64 *args);
void ucall_send_full(u64 cmd, u64 nargs, const u64 *args, const char *file, u64 line,
		     const char *expr, const char *buffer);

/* GUEST_SYNC(stage, values...): args[0] = stage, args[1..] = values (at most 7 in all). */
#define GUEST_SYNC(...)                                                        \
	do {                                                                   \
		const u64 __uc_args[] = { __VA_ARGS__ };                       \
		_Static_assert(ARRAY_SIZE(__uc_args) <= UCALL_MAX_ARGS,        \
			       "GUEST_SYNC takes at most 7 values");          \
		ucall_send(UCALL_SYNC, ARRAY_SIZE(__uc_args), __uc_args);      \
	} while (0)

#define GUEST_DONE() ucall_send(UCALL_DONE, 0, NULL)

/* printf-style formatting: %d %i %u %x %X %p %s %c %% with flags '#', '0', '-', width, l/ll/z. */
int vsnprintf(char *buf, size_t size, const char *fmt, __builtin_va_list ap);
int snprintf(char *buf, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void guest_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
#define GUEST_PRINTF(...) guest_printf(__VA_ARGS__)

void __guest_assert_fail(const char *expr, const char *file, u64 line, u64 nvalues,
			 const u64 *values, const char *fmt, ...)
	__attribute__((noreturn, format(printf, 6, 7)));

/* GUEST_ASSERT(cond): on failure the host raises GuestAssertionError naming file:line. */
#define GUEST_ASSERT(cond)                                                     \
	do {                                                                   \
		if (!(cond))                                                   \
			__guest_assert_fail(#cond, __FILE__, __LINE__, 0, NULL, NULL); \
	} while (0)

#define GUEST_ASSERT_MSG(cond, ...)                                            \
	do {                                                                   \
		if (!(cond))                                                   \
			__guest_assert_fail(#cond, __FILE__, __LINE__, 0, NULL, __VA_ARGS__); \
	} while (0)

#define __GUEST_ASSERT_CMP(a, op, b)                                           \
	do {                                                                   \
		u64 __l = (u64)(a), __r = (u64)(b);                            \
		if (!(__l op __r)) {                                           \
			const u64 __v[2] = { __l, __r };                       \
			__guest_assert_fail(#a " " #op " " #b, __FILE__, __LINE__, 2, __v, NULL); \
		}                                                              \
	} while (0)

/* The host shows both values: args[0] = left, args[1] = right. */
#define GUEST_ASSERT_EQ(a, b) __GUEST_ASSERT_CMP(a, ==, b)
#define GUEST_ASSERT_NE(a, b) __GUEST_ASSERT_CMP(a, !=, b)

#define GUEST_FAIL(...) __guest_assert_fail("GUEST_FAIL", __FILE__, __LINE__, 0, NULL, __VA_ARGS__)

/* Memory helpers (gcc may also call these implicitly). */
void *memset(void *s, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
size_t strnlen(const char *s, size_t max);

/* KVM hypercall: vmcall on Intel, vmmcall on AMD/Hygon (chosen from CPUID leaf 0).
 * RAX = nr, RBX = a0, RCX = a1, RDX = a2, RSI = a3; returns RAX. */
u64 kvm_hypercall(u64 nr, u64 a0, u64 a1, u64 a2, u64 a3);
bool cpu_is_amd(void);

static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}

static inline u64 read_cr2(void)
{
	u64 v;
	__asm__ volatile("mov %%cr2, %0" : "=r"(v));
	return v;
}

static inline void cpu_relax(void)
{
	__asm__ volatile("pause" ::: "memory");
}

#define READ_ONCE(x) (*(volatile __typeof__(x) *)&(x))
#define WRITE_ONCE(x, v) (*(volatile __typeof__(x) *)&(x) = (v))

/* Exceptions: the host's IDT sends every vector to a stub that saves the registers below and
 * calls the handler installed for that vector, or reports UCALL_UNHANDLED with args
 * (vector, error_code, rip, cr2, rsp) when there is none. A handler may change rip. */
struct ex_regs {
	u64 rax, rbx, rcx, rdx, rsi, rdi, rbp;
	u64 r8, r9, r10, r11, r12, r13, r14, r15;
	u64 vector, error_code;
	u64 rip, cs, rflags, rsp, ss;
};
typedef void (*guest_handler_t)(struct ex_regs *regs);
void guest_install_handler(int vector, guest_handler_t handler);

#endif
