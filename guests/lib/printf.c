// SPDX-License-Identifier: GPL-2.0-only
/* A small vsnprintf for guest messages (GUEST_PRINTF, GUEST_ASSERT_MSG). */
#include "kvmpy_guest.h"

struct out {
	char *buf;
	size_t size;
	size_t len;
};

static void put(struct out *o, char c)
{
	if (o->len + 1 < o->size)
		o->buf[o->len] = c;
	o->len++;
}

static void put_num(struct out *o, u64 v, unsigned int base, bool upper, bool neg,
		    const char *prefix, int width, bool zero, bool left)
{
	const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
	char tmp[24];
	int n = 0, plen = 0, pad, i;

	do {
		tmp[n++] = digits[v % base];
		v /= base;
	} while (v);
	if (neg)
		plen = 1;
	else if (prefix)
		plen = (int)strlen(prefix);
	pad = width - n - plen;
	if (!left && !zero)
		for (; pad > 0; pad--)
			put(o, ' ');
	if (neg)
		put(o, '-');
	else if (prefix)
		for (i = 0; prefix[i]; i++)
			put(o, prefix[i]);
	if (!left && zero)
		for (; pad > 0; pad--)
			put(o, '0');
	while (n)
		put(o, tmp[--n]);
	for (; left && pad > 0; pad--)
		put(o, ' ');
}

int vsnprintf(char *buf, size_t size, const char *fmt, __builtin_va_list ap)
{
	struct out o = { buf, size, 0 };
	const char *s;

	for (; *fmt; fmt++) {
		bool alt = false, zero = false, left = false, upper = false;
		int width = 0, lng = 0;
		u64 v;

		if (*fmt != '%') {
			put(&o, *fmt);
			continue;
		}
		fmt++;
		for (;; fmt++) {
			if (*fmt == '#')
				alt = true;
			else if (*fmt == '0')
				zero = true;
			else if (*fmt == '-')
				left = true;
			else
				break;
		}
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		while (*fmt == 'l' || *fmt == 'z') {
			lng++;
			fmt++;
		}
		switch (*fmt) {
		case 'd':
		case 'i': {
			s64 x = lng ? __builtin_va_arg(ap, s64) : __builtin_va_arg(ap, int);

			put_num(&o, x < 0 ? -(u64)x : (u64)x, 10, false, x < 0, NULL, width, zero, left);
			break;
		}
		case 'u':
			v = lng ? __builtin_va_arg(ap, u64) : __builtin_va_arg(ap, unsigned int);
			put_num(&o, v, 10, false, false, NULL, width, zero, left);
			break;
		case 'X':
			upper = true;
			/* fall through */
		case 'x':
			v = lng ? __builtin_va_arg(ap, u64) : __builtin_va_arg(ap, unsigned int);
			put_num(&o, v, 16, upper, false, alt ? (upper ? "0X" : "0x") : NULL, width, zero, left);
			break;
		case 'p':
			v = (u64)__builtin_va_arg(ap, void *);
			put_num(&o, v, 16, false, false, "0x", width, zero, left);
			break;
		case 'c':
			put(&o, (char)__builtin_va_arg(ap, int));
			break;
		case 's':
			s = __builtin_va_arg(ap, const char *);
			if (!s)
				s = "(null)";
			for (; *s; s++)
				put(&o, *s);
			break;
		case '%':
			put(&o, '%');
			break;
		case 0:
			fmt--;
			break;
		default:
			put(&o, '%');
			put(&o, *fmt);
		}
	}
	if (size)
		buf[o.len < size ? o.len : size - 1] = 0;
	return (int)o.len;
}

int snprintf(char *buf, size_t size, const char *fmt, ...)
{
	__builtin_va_list ap;
	int n;

	__builtin_va_start(ap, fmt);
	n = vsnprintf(buf, size, fmt, ap);
	__builtin_va_end(ap);
	return n;
}
