// SPDX-License-Identifier: GPL-2.0-only
/*
 * A guest read of a gpa without memslot installs an MMIO SPTE. Making the gpa
 * private must not let a later access be emulated as MMIO (or treated as a
 * shared access): it must exit with KVM_EXIT_MEMORY_FAULT(PRIVATE), or be
 * served from guest_memfd once a guest_memfd memslot covers the gpa.
 *
 * KVM_SET_MEMORY_ATTRIBUTES zaps only memslot ranges (kvm_handle_gfn_range()
 * walks memslots), and kvm_mmu_page_fault() does not mark reserved-bit faults
 * private, so the cached MMIO SPTE keeps serving the gpa (docs/findings.md 1).
 *
 * Build: as a tools/testing/selftests/kvm/x86/ test, or here with
 *   ci/build-selftests --source TREE --out DIR --extra ci/repro/private_mem_stale_mmio_test.c
 * Each case runs in its own process (kselftest_harness); with kvm.mmio_caching=0
 * on the host command line every case passes.
 */
#include <linux/kvm.h>
#include <stdint.h>

#include "kvm_util.h"
#include "processor.h"
#include "test_util.h"
#include "ucall_common.h"
#include "kselftest_harness.h"

#define TEST_GPA	0xc0000000ul
#define TEST_GVA	TEST_GPA
#define TEST_SLOT	10
#define OTHER_GPA	0xd0000000ul
#define OTHER_SLOT	11

#define REQUIRE_SW_PROTECTED_VM()						\
do {										\
	if (!(kvm_check_cap(KVM_CAP_VM_TYPES) & BIT(KVM_X86_SW_PROTECTED_VM)))	\
		SKIP(return, "KVM_X86_SW_PROTECTED_VM not in KVM_CAP_VM_TYPES");	\
} while (0)

static const struct vm_shape protected_vm_shape = {
	.mode = VM_MODE_DEFAULT,
	.type = KVM_X86_SW_PROTECTED_VM,
};

static void guest_read_twice(void)
{
	(void)READ_ONCE(*(volatile uint64_t *)TEST_GVA);	/* no memslot: MMIO */
	GUEST_SYNC(1);
	(void)READ_ONCE(*(volatile uint64_t *)TEST_GVA);	/* private now */
	GUEST_DONE();
}

static void guest_read_once(void)
{
	(void)READ_ONCE(*(volatile uint64_t *)TEST_GVA);
	GUEST_DONE();
}

static struct kvm_vm *create_vm(struct kvm_vcpu **vcpu, void *guest_code)
{
	struct kvm_vm *vm;

	vm = vm_create_shape_with_one_vcpu(protected_vm_shape, vcpu, guest_code);
	virt_map(vm, TEST_GVA, TEST_GPA, 1);
	return vm;
}

/* Step 1 (guest reads TEST_GPA: MMIO) and step 2 (TEST_GPA made private). */
static struct kvm_vm *first_read_is_mmio(struct kvm_vcpu **vcpu)
{
	struct kvm_vm *vm = create_vm(vcpu, guest_read_twice);
	struct kvm_run *run = (*vcpu)->run;

	vcpu_run(*vcpu);
	TEST_ASSERT_KVM_EXIT_REASON(*vcpu, KVM_EXIT_MMIO);
	TEST_ASSERT_EQ(run->mmio.phys_addr, TEST_GPA);
	TEST_ASSERT(!run->mmio.is_write, "expected an MMIO read");
	memset(run->mmio.data, 0, sizeof(run->mmio.data));

	vcpu_run(*vcpu);			/* completes the read */
	TEST_ASSERT_EQ(get_ucall(*vcpu, NULL), UCALL_SYNC);

	vm_mem_set_private(vm, TEST_GPA, PAGE_SIZE);
	return vm;
}

static void expect_private_fault(struct kvm_vcpu *vcpu)
{
	struct kvm_run *run = vcpu->run;
	int r = _vcpu_run(vcpu);

	TEST_ASSERT(r == -1 && errno == EFAULT,
		    "private gpa without memslot: expected KVM_EXIT_MEMORY_FAULT, got r = %d, exit %s",
		    r, exit_reason_str(run->exit_reason));
	TEST_ASSERT_EQ(run->exit_reason, KVM_EXIT_MEMORY_FAULT);
	TEST_ASSERT(run->memory_fault.flags == KVM_MEMORY_EXIT_FLAG_PRIVATE,
		    "expected a private access (flags 0x%llx), got flags 0x%llx",
		    (unsigned long long)KVM_MEMORY_EXIT_FLAG_PRIVATE,
		    (unsigned long long)run->memory_fault.flags);
	TEST_ASSERT_EQ(run->memory_fault.gpa, TEST_GPA);
	TEST_ASSERT_EQ(run->memory_fault.size, PAGE_SIZE);
}

/* The control: without a first MMIO read, KVM behaves as documented. */
TEST(private_noslot_without_prior_mmio)
{
	struct kvm_vcpu *vcpu;
	struct kvm_vm *vm;

	REQUIRE_SW_PROTECTED_VM();
	vm = create_vm(&vcpu, guest_read_once);
	vm_mem_set_private(vm, TEST_GPA, PAGE_SIZE);
	expect_private_fault(vcpu);
	kvm_vm_free(vm);
}

/* Fails on 6.12/7.3: the second read exits with KVM_EXIT_MMIO. */
TEST(private_noslot_after_mmio)
{
	struct kvm_vcpu *vcpu;
	struct kvm_vm *vm;

	REQUIRE_SW_PROTECTED_VM();
	vm = first_read_is_mmio(&vcpu);
	expect_private_fault(vcpu);
	kvm_vm_free(vm);
}

/*
 * Fails on 6.12/7.3: a memslot elsewhere bumps the memslot generation, the MMIO
 * SPTE no longer matches and the slow path runs as a shared access:
 * KVM_EXIT_MEMORY_FAULT with flags 0.
 */
TEST(private_noslot_after_mmio_and_other_memslot)
{
	struct kvm_vcpu *vcpu;
	struct kvm_vm *vm;

	REQUIRE_SW_PROTECTED_VM();
	vm = first_read_is_mmio(&vcpu);
	vm_userspace_mem_region_add(vm, VM_MEM_SRC_ANONYMOUS, OTHER_GPA,
				    OTHER_SLOT, 1, 0);
	expect_private_fault(vcpu);
	kvm_vm_free(vm);
}

/*
 * Fails on 6.12/7.3: KVM_EXIT_MEMORY_FAULT with flags 0 for every retry, the
 * private page of the new guest_memfd memslot is never mapped.
 */
TEST(private_gmem_slot_after_mmio)
{
	struct kvm_vcpu *vcpu;
	struct kvm_vm *vm;
	struct kvm_run *run;
	int r;

	REQUIRE_SW_PROTECTED_VM();
	vm = first_read_is_mmio(&vcpu);
	run = vcpu->run;
	vm_userspace_mem_region_add(vm, VM_MEM_SRC_ANONYMOUS, TEST_GPA,
				    TEST_SLOT, 1, KVM_MEM_GUEST_MEMFD);
	r = _vcpu_run(vcpu);
	TEST_ASSERT(!r, "private gpa in a guest_memfd memslot: KVM_RUN failed (r = %d, errno %d), exit %s, memory_fault.flags 0x%llx",
		    r, errno, exit_reason_str(run->exit_reason),
		    (unsigned long long)run->memory_fault.flags);
	TEST_ASSERT_EQ(get_ucall(vcpu, NULL), UCALL_DONE);
	kvm_vm_free(vm);
}

TEST_HARNESS_MAIN
