/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * IDT stubs and the return trampoline.
 *
 * guest_idt_stubs: 256 stubs, 16 bytes apart (the host points IDT vector v at
 * guest_idt_stubs + 16 * v and checks the table's size). Vectors without a CPU error code
 * push a 0 so every frame looks alike: vector, error code, then the CPU's iret frame.
 */
	.section .text.idt, "ax"
	.balign 16
	.globl guest_idt_stubs
guest_idt_stubs:
	vec = 0
	.rept 256
	.balign 16
	.if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
	.else
	pushq $0
	.endif
	pushq $vec
	jmp __idt_common
	vec = vec + 1
	.endr
	.balign 16
	.globl guest_idt_stubs_end
guest_idt_stubs_end:

__idt_common:
	/* struct ex_regs: rax first in memory, so push in reverse. */
	pushq %r15
	pushq %r14
	pushq %r13
	pushq %r12
	pushq %r11
	pushq %r10
	pushq %r9
	pushq %r8
	pushq %rbp
	pushq %rdi
	pushq %rsi
	pushq %rdx
	pushq %rcx
	pushq %rbx
	pushq %rax
	movq %rsp, %rdi
	movq %rsp, %rbx
	andq $-16, %rsp
	call __guest_exception
	movq %rbx, %rsp
	popq %rax
	popq %rbx
	popq %rcx
	popq %rdx
	popq %rsi
	popq %rdi
	popq %rbp
	popq %r8
	popq %r9
	popq %r10
	popq %r11
	popq %r12
	popq %r13
	popq %r14
	popq %r15
	addq $16, %rsp
	iretq

	.text
	/* The host puts this address under the guest function's first stack slot: returning
	 * from the guest function lands here and sends UCALL_DONE(return value). */
	.globl guest_return_trampoline
guest_return_trampoline:
	movq %rax, %rdi
	andq $-16, %rsp
	call __guest_returned
1:	hlt
	jmp 1b

	.section .note.GNU-stack, "", @progbits
