// SPDX-License-Identifier: GPL-2.0-only
/* Freestanding memory and string helpers (gcc may emit calls to memset/memcpy itself). */
#include "kvmpy_guest.h"

void *memset(void *s, int c, size_t n)
{
	/* rep stosb: one instruction for the whole range, cheap even where guest
	 * instructions are emulated one by one. */
	void *d = s;

	__asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
	return s;
}

void *memcpy(void *dst, const void *src, size_t n)
{
	void *d = dst;

	__asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(n) : : "memory");
	return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const u8 *x = a, *y = b;
	size_t i;

	for (i = 0; i < n; i++)
		if (x[i] != y[i])
			return x[i] < y[i] ? -1 : 1;
	return 0;
}

size_t strnlen(const char *s, size_t max)
{
	size_t n = 0;

	while (n < max && s[n])
		n++;
	return n;
}

size_t strlen(const char *s)
{
	return strnlen(s, ~0UL);
}
