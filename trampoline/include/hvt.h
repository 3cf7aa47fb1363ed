/*
 * libhvt: hvjit's trampoline into Linux KVM.
 *
 * The only code in hvjit that issues ioctls. Every function is hvt_<object>_<verb>, keeps no
 * hidden state, and returns a count (>= 0) or -errno. Policy lives above, in Python and Numba.
 * Structures are the kernel's own (linux/kvm.h); hvjit mirrors them as numpy dtypes and a
 * test checks sizes and offsets against this header.
 */
#ifndef HVT_H
#define HVT_H

#include <stdint.h>
#include <linux/kvm.h>

#define HVT_EXPORT __attribute__((visibility("default")))

/* ---- sys.c: /dev/kvm itself ---------------------------------------------------------- */
HVT_EXPORT int hvt_sys_open(const char *path);
HVT_EXPORT int hvt_sys_close(int fd);
HVT_EXPORT int hvt_sys_api_version(int kvm_fd);
/* Works on the /dev/kvm fd and on a VM fd (VM-specific answers). */
HVT_EXPORT int hvt_sys_check_extension(int fd, long cap);
HVT_EXPORT int hvt_sys_vcpu_mmap_size(int kvm_fd);
/* Fill up to max entries; returns the count, or -E2BIG with *needed set. */
HVT_EXPORT int hvt_sys_get_supported_cpuid(int kvm_fd, struct kvm_cpuid_entry2 *entries,
                                           int max, int *needed);
HVT_EXPORT int hvt_sys_get_msr_index_list(int kvm_fd, uint32_t *indices, int max, int *needed);
HVT_EXPORT int hvt_sys_get_msr_feature_index_list(int kvm_fd, uint32_t *indices, int max,
                                                  int *needed);
/* KVM_GET_MSRS on the system fd: the values of feature MSRs. Returns how many were read. */
HVT_EXPORT int hvt_sys_get_feature_msrs(int kvm_fd, struct kvm_msr_entry *entries, int count);
/* The call path alone, for measuring it (VirtualBox's fast-ioctl NOP). */
HVT_EXPORT int hvt_sys_nop(void);
/* One real but trivial syscall into KVM (KVM_CHECK_EXTENSION), for measuring ioctl cost. */
HVT_EXPORT int hvt_sys_nop_ioctl(int kvm_fd);
HVT_EXPORT uint64_t hvt_sys_rdtsc(void);
HVT_EXPORT uint64_t hvt_sys_rdtscp(uint32_t *aux);
/* Install the no-op handler for the signal used to kick a vCPU thread out of KVM_RUN. */
HVT_EXPORT int hvt_sys_init_kick_signal(void);
HVT_EXPORT int hvt_sys_kick_signal(void);

/* ---- vm.c ------------------------------------------------------------------------------ */
HVT_EXPORT int hvt_vm_create(int kvm_fd, unsigned long type);
/* size == 0 deletes the slot. flags: KVM_MEM_READONLY, KVM_MEM_LOG_DIRTY_PAGES. */
HVT_EXPORT int hvt_vm_set_user_memory(int vm_fd, uint32_t slot, uint32_t flags, uint64_t gpa,
                                      uint64_t size, void *host_addr);
HVT_EXPORT int hvt_vm_set_tss_addr(int vm_fd, uint64_t gpa);
HVT_EXPORT int hvt_vm_set_identity_map_addr(int vm_fd, uint64_t gpa);
HVT_EXPORT int hvt_vm_create_irqchip(int vm_fd);
HVT_EXPORT int hvt_vm_create_pit2(int vm_fd, uint32_t flags);
HVT_EXPORT int hvt_vm_irq_line(int vm_fd, uint32_t irq, uint32_t level);
/* KVM_SET_GSI_ROUTING with the variable-length kvm_irq_routing header built here. */
HVT_EXPORT int hvt_vm_set_gsi_routing(int vm_fd, const struct kvm_irq_routing_entry *entries,
                                      int count);
HVT_EXPORT int hvt_vm_enable_cap(int vm_fd, uint32_t cap, uint64_t arg0, uint64_t arg1);
HVT_EXPORT int hvt_vm_set_msr_filter(int vm_fd, struct kvm_msr_filter *filter);
/* chip->chip_id selects the PIC master, PIC slave or IOAPIC. */
HVT_EXPORT int hvt_vm_get_irqchip(int vm_fd, struct kvm_irqchip *chip);
HVT_EXPORT int hvt_vm_set_irqchip(int vm_fd, const struct kvm_irqchip *chip);
HVT_EXPORT int hvt_vm_get_pit2(int vm_fd, struct kvm_pit_state2 *pit);
HVT_EXPORT int hvt_vm_set_pit2(int vm_fd, const struct kvm_pit_state2 *pit);
/* kvmclock: the guest's clock in ns (KVM_GET_CLOCK / KVM_SET_CLOCK). */
HVT_EXPORT int hvt_vm_get_clock(int vm_fd, struct kvm_clock_data *clock);
HVT_EXPORT int hvt_vm_set_clock(int vm_fd, const struct kvm_clock_data *clock);
/* KVM_GET_DIRTY_LOG: one bit a page of `slot`, written to `bitmap`; KVM clears its own log
 * (with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 enabled it keeps it: see hvt_vm_clear_dirty_log). */
HVT_EXPORT int hvt_vm_get_dirty_log(int vm_fd, uint32_t slot, uint64_t *bitmap);
/* KVM_CLEAR_DIRTY_LOG (manual protection): forget the pages set in `bitmap` (bit i = page
 * first_page + i) and write-protect them again, so the guest's next write is logged. */
HVT_EXPORT int hvt_vm_clear_dirty_log(int vm_fd, uint32_t slot, uint64_t first_page, uint32_t num_pages,
                                      uint64_t *bitmap);

/* ---- dirty_ring.c: KVM_CAP_DIRTY_LOG_RING ---------------------------------------------- */
/* Maps vCPU `vcpu_fd`'s dirty ring (`bytes`, as enabled on its VM) at *ring_out. 0 or -errno. */
HVT_EXPORT int hvt_dirty_ring_map(int vcpu_fd, uint32_t bytes, struct kvm_dirty_gfn **ring_out);
HVT_EXPORT int hvt_dirty_ring_unmap(struct kvm_dirty_gfn *ring, uint32_t bytes);
/* A VM's dirty rings and what their harvest fills. */
struct hvt_dirty_rings {
    struct kvm_dirty_gfn **rings; /* `count` of them (NULL: that vCPU has none yet) */
    uint32_t *fetch;       /* per ring, the free-running index of the next entry to read */
    int32_t count;
    uint32_t entries;      /* per ring, a power of two */
    uint64_t **bitmaps;    /* by KVM slot id (`nslots` of them; NULL: not tracked): a bit a page */
    const uint64_t *npages; /* by KVM slot id */
    int32_t nslots;
    uint32_t pad;
    uint64_t stray;        /* out, counting: entries for no tracked page (a slot deleted since) */
};
/* Reads every ring from its fetch index to the first entry KVM has not filled: sets the page's
 * bit, marks the entry for KVM_RESET_DIRTY_RINGS. Returns the entries read, or -EINVAL. */
HVT_EXPORT int64_t hvt_dirty_rings_harvest(struct hvt_dirty_rings *rings);
/* KVM_RESET_DIRTY_RINGS: the pages of the entries marked so far are write-protected again
 * and their entries free. Returns how many, or -errno. */
HVT_EXPORT int hvt_vm_reset_dirty_rings(int vm_fd);

/* One memory slot of a fast reset: hvt_mem_reset_pages's arguments. */
struct hvt_reset_slot {
    int32_t slot;          /* KVM slot whose dirty log is read; < 0: none (read-only memory, rings) */
    uint32_t pad;
    uint64_t npages;
    void *dst;             /* the guest's memory */
    const void *src;       /* the snapshot's copy of it */
    uint64_t *bitmap;      /* out: the pages copied (KVM's log | extra | host_dirty) */
    const uint64_t *extra; /* pages to copy besides KVM's log; NULL: none */
    uint8_t *host_dirty;   /* a byte a page, nonzero where the host wrote; cleared; NULL: none */
    const uint64_t *logged; /* the slot's bitmap of a VM with dirty rings (read instead of KVM's
                             * log: `slot` is then < 0); NULL: none */
};
/* One vCPU of a fast reset: hvt_vcpu_reset's arguments, the state only CPL0 code changes
 * (each NULL: not set), and the answer. */
struct hvt_reset_vcpu {
    int32_t fd;
    int32_t done;          /* out: HVT_RESET_DID_* steps, or -errno */
    struct kvm_run *run;
    const struct kvm_regs *regs;
    const struct kvm_sregs *sregs;
    const struct kvm_vcpu_events *events; /* NULL: none */
    const void *xsave;     /* NULL: not set */
    const struct kvm_xcrs *xcrs;
    const struct kvm_msr_entry *msrs; /* `nmsrs` of them; KVM taking fewer stops here */
    int32_t nmsrs;
    int32_t msrs_set;      /* out: how many KVM_SET_MSRS took */
    const struct kvm_mp_state *mp_state;
    const struct kvm_lapic_state *lapic;
    const struct kvm_debugregs *debugregs;
    uint32_t flags;        /* HVT_RESET_OUT_SETTLED */
    uint32_t pad;
};
/* This host's KVM finishes an OUT before it reports the exit (RIP is past it and nothing
 * pending rewrites registers): after an OUT exit the registers are set without the
 * completing KVM_RUN, all of them left in kvm_run for the next KVM_RUN. Only for a record
 * without CPL0 state (that must follow the SREGS). */
#define HVT_RESET_OUT_SETTLED 1
#define HVT_RESET_DID_PRIVILEGED 32 /* XCRs, MSRs, MP state, LAPIC, debug registers: all set */
#define HVT_RESET_MSRS_SHORT 64     /* KVM took only `msrs_set` MSRs: the rest was not set */
/* The VM-wide part of a fast reset (each NULL: not set). */
struct hvt_reset_vmstate {
    const struct kvm_irqchip *irqchip; /* `nirqchip` of them */
    int32_t nirqchip;
    uint32_t pad;
    const struct kvm_pit_state2 *pit2;
    const struct kvm_clock_data *clock; /* set last */
};
/* The device state rows of a fast reset: a row goes back when its live copy differs from the
 * saved one (every guest access to a device counts in its row) or its slot is `touched`. */
struct hvt_reset_rows {
    char *live;            /* the bus's rows, `row_bytes` apart, by slot */
    const char *saved;     /* the snapshot's rows, in `slots` order */
    const int64_t *slots;  /* `count` of them, each below 64 */
    int32_t count;
    uint32_t row_bytes;
    uint64_t touched;      /* in: slots put back even if equal (buffers Python was handed) */
    uint64_t python;       /* in: slots left to the caller (their buffer goes back first) */
    uint64_t changed;      /* out: the slots that differed or were touched */
};
/* What a fast reset did, over all its vCPUs, so that the caller need not read each record. */
struct hvt_reset_tally {
    int32_t completed;     /* vCPUs whose pending exit a KVM_RUN finished (HVT_RESET_DID_COMPLETE) */
    int32_t synced;        /* ... whose SREGS or events went in through a KVM_RUN (.._DID_SYNC) */
    int32_t settled;       /* ... stopped at an OUT that needed no KVM_RUN (.._DID_SKIP) */
    uint32_t left;         /* HVT_RESET_LEFT_*: what the call left to the caller */
};
#define HVT_RESET_LEFT_ROWS 1 /* rows of `rows->python` slots changed: the caller puts them back */
#define HVT_RESET_LEFT_MSRS 2 /* some vCPU's KVM_SET_MSRS took fewer (HVT_RESET_MSRS_SHORT) */
/*
 * A VM's fast reset in one call: hvt_mem_reset_rows on `rows` (NULL: none), each vCPU's
 * pending exit finished, hvt_mem_reset_pages for each slot, the irqchips and PIT of `vmstate`
 * (NULL: none), the rest of hvt_vcpu_reset and the vCPU's CPL0 state for each vCPU, then
 * kvmclock. Returns the pages copied, or the first -errno (each vCPU's `done` says which
 * vCPU; all positive: the VM-wide part). `rings` (NULL: none) are harvested into the slots'
 * `logged` bitmaps once the pending exits are finished. `tally` (NULL: none) sums the vCPUs'
 * `done` after a call that returned the pages copied.
 */
HVT_EXPORT int hvt_vm_reset(int vm_fd, struct hvt_reset_slot *slots, int nslots,
                            struct hvt_reset_vcpu *vcpus, int nvcpus,
                            const struct hvt_reset_vmstate *vmstate, struct hvt_reset_rows *rows,
                            struct hvt_dirty_rings *rings, struct hvt_reset_tally *tally);

/* ---- vcpu.c ---------------------------------------------------------------------------- */
/* Creates vCPU `id` and maps its kvm_run page (*run_out, mmap_size bytes). Returns the fd. */
HVT_EXPORT int hvt_vcpu_create(int vm_fd, int id, int mmap_size, struct kvm_run **run_out);
/* Unmaps the run page and closes the fd. */
HVT_EXPORT int hvt_vcpu_destroy(int vcpu_fd, struct kvm_run *run, int mmap_size);
/* One KVM_RUN. 0 on an exit to user space; -EINTR when kicked or interrupted. */
HVT_EXPORT int hvt_vcpu_run(int vcpu_fd);
/* CLOCK_MONOTONIC in ns just before the process's first KVM_RUN (through hvt_vcpu_run); 0: none yet. */
HVT_EXPORT int64_t hvt_vcpu_first_run_ns(void);
/* Ask a vCPU thread (pthread id) that may be inside KVM_RUN to leave it now. */
HVT_EXPORT int hvt_vcpu_kick(uint64_t thread, struct kvm_run *run);
HVT_EXPORT int hvt_vcpu_get_regs(int vcpu_fd, struct kvm_regs *regs);
HVT_EXPORT int hvt_vcpu_set_regs(int vcpu_fd, const struct kvm_regs *regs);
HVT_EXPORT int hvt_vcpu_get_sregs(int vcpu_fd, struct kvm_sregs *sregs);
HVT_EXPORT int hvt_vcpu_set_sregs(int vcpu_fd, const struct kvm_sregs *sregs);
HVT_EXPORT int hvt_vcpu_get_fpu(int vcpu_fd, struct kvm_fpu *fpu);
HVT_EXPORT int hvt_vcpu_set_fpu(int vcpu_fd, const struct kvm_fpu *fpu);
/* Returns how many of `count` entries KVM read/wrote (it stops at the first failing MSR). */
HVT_EXPORT int hvt_vcpu_get_msrs(int vcpu_fd, struct kvm_msr_entry *entries, int count);
HVT_EXPORT int hvt_vcpu_set_msrs(int vcpu_fd, const struct kvm_msr_entry *entries, int count);
HVT_EXPORT int hvt_vcpu_get_events(int vcpu_fd, struct kvm_vcpu_events *events);
HVT_EXPORT int hvt_vcpu_set_events(int vcpu_fd, const struct kvm_vcpu_events *events);
HVT_EXPORT int hvt_vcpu_set_cpuid(int vcpu_fd, const struct kvm_cpuid_entry2 *entries, int count);
HVT_EXPORT int hvt_vcpu_get_tsc_khz(int vcpu_fd);
HVT_EXPORT int hvt_vcpu_set_guest_debug(int vcpu_fd, const struct kvm_guest_debug *dbg);
/* DR0-DR3, DR6, DR7 as the guest sees them (KVM_CAP_DEBUGREGS). */
HVT_EXPORT int hvt_vcpu_get_debugregs(int vcpu_fd, struct kvm_debugregs *regs);
HVT_EXPORT int hvt_vcpu_set_debugregs(int vcpu_fd, const struct kvm_debugregs *regs);
/* A file descriptor for the vCPU's binary statistics (KVM_GET_STATS_FD); -errno on failure. */
HVT_EXPORT int hvt_vcpu_stats_fd(int vcpu_fd);
/* The XSAVE area (standard format; `size` from KVM_CAP_XSAVE2 on the VM fd, at least 4096). */
HVT_EXPORT int hvt_vcpu_get_xsave(int vcpu_fd, void *area, int size);
HVT_EXPORT int hvt_vcpu_set_xsave(int vcpu_fd, const void *area);
HVT_EXPORT int hvt_vcpu_get_xcrs(int vcpu_fd, struct kvm_xcrs *xcrs);
HVT_EXPORT int hvt_vcpu_set_xcrs(int vcpu_fd, const struct kvm_xcrs *xcrs);
HVT_EXPORT int hvt_vcpu_get_lapic(int vcpu_fd, struct kvm_lapic_state *lapic);
HVT_EXPORT int hvt_vcpu_get_mp_state(int vcpu_fd, struct kvm_mp_state *state);
HVT_EXPORT int hvt_vcpu_set_mp_state(int vcpu_fd, const struct kvm_mp_state *state);
HVT_EXPORT int hvt_vcpu_set_lapic(int vcpu_fd, const struct kvm_lapic_state *lapic);
/* KVM_GET_CPUID2: what KVM_SET_CPUID2 set. Returns the count, or -E2BIG if max is too small. */
HVT_EXPORT int hvt_vcpu_get_cpuid(int vcpu_fd, struct kvm_cpuid_entry2 *entries, int max);
/* KVM_NMI: queue an NMI. */
HVT_EXPORT int hvt_vcpu_inject_nmi(int vcpu_fd);
/* KVM_INTERRUPT: an external interrupt (without an in-kernel PIC; -ENXIO with one). */
HVT_EXPORT int hvt_vcpu_inject_interrupt(int vcpu_fd, uint32_t vector);
HVT_EXPORT int hvt_vcpu_set_tsc_khz(int vcpu_fd, uint32_t khz);
/* KVM_{HAS,GET,SET}_DEVICE_ATTR on the vCPU fd (e.g. group 0 = KVM_VCPU_TSC_CTRL). */
HVT_EXPORT int hvt_vcpu_has_attr(int vcpu_fd, uint32_t group, uint64_t attr);
HVT_EXPORT int hvt_vcpu_get_attr(int vcpu_fd, uint32_t group, uint64_t attr, void *value);
HVT_EXPORT int hvt_vcpu_set_attr(int vcpu_fd, uint32_t group, uint64_t attr, const void *value);
/* Whether KVM has an exit to finish on the next KVM_RUN (port IO, MMIO, ...), from
 * kvm_run.exit_reason: 1 or 0. */
HVT_EXPORT int hvt_vcpu_exit_pending(const struct kvm_run *run);
/*
 * A vCPU's part of a fast reset (needs KVM_CAP_SYNC_REGS), all in one call:
 *  1. If an exit is pending (hvt_vcpu_exit_pending), an immediate-exit KVM_RUN finishes it
 *     and, through kvm_run's sync area, reports the SREGS and events as they are now. With
 *     `flags` HVT_RESET_OUT_SETTLED an OUT exit is left as it is (HVT_RESET_DID_SKIP) and
 *     REGS, SREGS and events all go into kvm_run for the next KVM_RUN, no ioctl now.
 *  2. The registers: where the SREGS and events reported in step 1 equal the wanted ones,
 *     REGS alone go into kvm_run's sync area with kvm_dirty_regs set: the next KVM_RUN
 *     applies them, no ioctl now (call hvt_vcpu_flush_sync before any other register
 *     ioctl); else REGS, SREGS and events through kvm_run at once (one immediate KVM_RUN).
 *  3. `xsave` (if not NULL): KVM_SET_XSAVE.
 * `events` may be NULL (no KVM_CAP_VCPU_EVENTS). Returns the HVT_RESET_DID_* steps taken, or
 * -errno; -EBUSY when KVM went on to a new exit (a repeated string I/O instruction).
 */
#define HVT_RESET_DID_COMPLETE 1
#define HVT_RESET_DID_DEFER_REGS 2
#define HVT_RESET_DID_SYNC 4
#define HVT_RESET_DID_XSAVE 8
#define HVT_RESET_DID_SKIP 128 /* an OUT exit needed no completing KVM_RUN (HVT_RESET_OUT_SETTLED) */
HVT_EXPORT int hvt_vcpu_reset(int vcpu_fd, struct kvm_run *run, const struct kvm_regs *regs,
                              const struct kvm_sregs *sregs, const struct kvm_vcpu_events *events,
                              const void *xsave, uint32_t flags);
/* Registers left in kvm_run for the next KVM_RUN (kvm_dirty_regs): applied now, by an
 * immediate-exit KVM_RUN, so that a register ioctl sees or overwrites them in order. No
 * ioctl when nothing is left. 0 or -errno. */
HVT_EXPORT int hvt_vcpu_flush_sync(int vcpu_fd, struct kvm_run *run);

/* ---- mem.c: guest memory seen from the host -------------------------------------------- */
/* Copy every page whose bit is set in `bitmap` (bit i = page i) from src to dst; returns how
 * many pages were copied. */
HVT_EXPORT int hvt_mem_copy_pages(void *dst, const void *src, const uint64_t *bitmap,
                                  uint64_t npages, uint64_t page_size);
/*
 * One memory slot's part of a fast reset: the pages written, into `bitmap` — KVM's dirty log
 * of `slot` (slot >= 0), else a copy of `logged` (a VM with dirty rings), else none — OR'd
 * with `extra` (NULL: none) and with the pages whose `host_dirty` byte is set (NULL: none;
 * the bytes are cleared), then hvt_mem_copy_pages from src to dst. `bitmap` holds one bit a
 * page afterwards. Returns the pages copied, or -errno.
 */
HVT_EXPORT int hvt_mem_reset_pages(int vm_fd, int slot, void *dst, const void *src, uint64_t *bitmap,
                                   const uint64_t *logged, const uint64_t *extra, uint8_t *host_dirty,
                                   uint64_t npages, uint64_t page_size);
/*
 * The device rows of a fast reset (struct hvt_reset_rows): sets `changed` and copies each
 * changed row back, but the `python` ones. Returns `changed`.
 */
HVT_EXPORT uint64_t hvt_mem_reset_rows(struct hvt_reset_rows *rows);
/*
 * Compare-and-swap of the `size` bytes at `addr` (1, 2, 4, 8 or 16, naturally aligned): they
 * become *desired if they equal *expected. Returns 1 when swapped, 0 when not (*expected then
 * holds what was there), -EINVAL for a bad size or alignment. A locked cmpxchg (cmpxchg16b
 * for 16), atomic against vCPUs running on the same memory.
 */
HVT_EXPORT int hvt_mem_cas(void *addr, uint32_t size, void *expected, const void *desired);

/* ---- msr.c: host MSRs through /dev/cpu/N/msr ------------------------------------------- */
/* -ENOENT when the msr driver is absent; -EIO when the MSR faulted (#GP). */
HVT_EXPORT int hvt_msr_host_read(int cpu, uint32_t index, uint64_t *value);
HVT_EXPORT int hvt_msr_host_write(int cpu, uint32_t index, uint64_t value);

/* ---- loop.c: the C reference exit loop (for benchmarks) -------------------------------- */
struct hvt_loop_stats {
    uint64_t exits;      /* exits handled by the loop */
    uint64_t pio;        /* port-IO exits */
    uint64_t mmio;       /* MMIO exits */
    uint64_t hlt;        /* HLT exits */
    uint64_t last_reason; /* kvm_run.exit_reason of the exit that stopped the loop */
    uint64_t last_port;  /* port of the last OUT (the guest's stop signal) */
    uint64_t last_data;  /* data of the last OUT */
};
/*
 * Run until `max_exits` exits were handled, or an OUT to `stop_port`, or an exit the loop
 * does not know. Port IO: OUTs are counted, INs read 0. MMIO: reads return 0, writes are
 * dropped. HLT: resumed. Returns 0, or -errno from KVM_RUN.
 */
HVT_EXPORT int hvt_loop_reference(int vcpu_fd, struct kvm_run *run, uint64_t max_exits,
                                  uint16_t stop_port, struct hvt_loop_stats *stats);

#endif
