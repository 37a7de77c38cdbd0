"""x86-64 pieces of the emulated KVM's vCPU: the unicorn engine wrapper (engine), guest-physical
memory (physmem), page walks (paging), IDT delivery (events) and vCPU scheduling (sched)."""
