/* A vCPU: its fd, the mmap'd kvm_run page, KVM_RUN, and register/state access. */
#include "internal.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

_Static_assert(sizeof(((struct kvm_run *)0)->immediate_exit) == 1, "kvm_run.immediate_exit");

static int ioctl_rc(int rc)
{
    return rc < 0 ? -errno : rc;
}

int hvt_vcpu_create(int vm_fd, int id, int mmap_size, struct kvm_run **run_out)
{
    if (!run_out || mmap_size < (int)sizeof(struct kvm_run))
        return -EINVAL;
    int fd = ioctl(vm_fd, KVM_CREATE_VCPU, (unsigned long)id);
    if (fd < 0)
        return -errno;
    void *run = mmap(NULL, (size_t)mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (run == MAP_FAILED) {
        int err = errno;
        close(fd);
        return -err;
    }
    *run_out = run;
    return fd;
}

int hvt_vcpu_destroy(int vcpu_fd, struct kvm_run *run, int mmap_size)
{
    int rc = 0;
    if (run && munmap(run, (size_t)mmap_size) < 0)
        rc = -errno;
    if (close(vcpu_fd) < 0 && rc == 0)
        rc = -errno;
    return rc;
}

/* CLOCK_MONOTONIC (ns) taken just before this process's first KVM_RUN; 0 until then (also in a
 * forked child). The one process-wide value the trampoline keeps: start-up benchmarks read it
 * (`hvjit run --json`). */
static int64_t first_run_ns;

static void note_first_run(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    int64_t now = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec, none = 0;
    __atomic_compare_exchange_n(&first_run_ns, &none, now, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
}

/* A forked child is a new process: its first KVM_RUN is its own (`hvjit serve` forks a warmed
 * server that has run a guest). */
static void forget_first_run(void)
{
    first_run_ns = 0;
}

__attribute__((constructor)) static void reset_first_run_at_fork(void)
{
    pthread_atfork(NULL, NULL, forget_first_run);
}

int hvt_vcpu_run(int vcpu_fd)
{
    if (__builtin_expect(__atomic_load_n(&first_run_ns, __ATOMIC_RELAXED) == 0, 0))
        note_first_run();
    return ioctl_rc(ioctl(vcpu_fd, KVM_RUN, 0));
}

int64_t hvt_vcpu_first_run_ns(void)
{
    return __atomic_load_n(&first_run_ns, __ATOMIC_RELAXED);
}

int hvt_vcpu_kick(uint64_t thread, struct kvm_run *run)
{
    /* immediate_exit covers the window before the thread enters KVM_RUN; the signal covers
     * a thread already inside it. */
    __atomic_store_n(&run->immediate_exit, 1, __ATOMIC_SEQ_CST);
    return -pthread_kill((pthread_t)thread, hvt_sys_kick_signal());
}

int hvt_vcpu_get_regs(int fd, struct kvm_regs *regs)
{
    return ioctl_rc(ioctl(fd, KVM_GET_REGS, regs));
}

int hvt_vcpu_set_regs(int fd, const struct kvm_regs *regs)
{
    return ioctl_rc(ioctl(fd, KVM_SET_REGS, regs));
}

int hvt_vcpu_get_sregs(int fd, struct kvm_sregs *sregs)
{
    return ioctl_rc(ioctl(fd, KVM_GET_SREGS, sregs));
}

int hvt_vcpu_set_sregs(int fd, const struct kvm_sregs *sregs)
{
    return ioctl_rc(ioctl(fd, KVM_SET_SREGS, sregs));
}

int hvt_vcpu_get_fpu(int fd, struct kvm_fpu *fpu)
{
    return ioctl_rc(ioctl(fd, KVM_GET_FPU, fpu));
}

int hvt_vcpu_set_fpu(int fd, const struct kvm_fpu *fpu)
{
    return ioctl_rc(ioctl(fd, KVM_SET_FPU, fpu));
}

int hvt_vcpu_get_msrs(int fd, struct kvm_msr_entry *entries, int count)
{
    return hvt_msrs_ioctl(fd, KVM_GET_MSRS, entries, count);
}

int hvt_vcpu_set_msrs(int fd, const struct kvm_msr_entry *entries, int count)
{
    /* KVM does not write back on SET; the cast only satisfies the shared helper. */
    return hvt_msrs_ioctl(fd, KVM_SET_MSRS, (struct kvm_msr_entry *)entries, count);
}

int hvt_vcpu_get_events(int fd, struct kvm_vcpu_events *events)
{
    return ioctl_rc(ioctl(fd, KVM_GET_VCPU_EVENTS, events));
}

int hvt_vcpu_set_events(int fd, const struct kvm_vcpu_events *events)
{
    return ioctl_rc(ioctl(fd, KVM_SET_VCPU_EVENTS, events));
}

int hvt_vcpu_set_cpuid(int fd, const struct kvm_cpuid_entry2 *entries, int count)
{
    if (count < 0)
        return -EINVAL;
    struct kvm_cpuid2 *c = calloc(1, sizeof(*c) + (size_t)count * sizeof(*entries));
    if (!c)
        return -ENOMEM;
    c->nent = (uint32_t)count;
    memcpy(c->entries, entries, (size_t)count * sizeof(*entries));
    int rc = ioctl_rc(ioctl(fd, KVM_SET_CPUID2, c));
    free(c);
    return rc;
}

int hvt_vcpu_get_tsc_khz(int fd)
{
    return ioctl_rc(ioctl(fd, KVM_GET_TSC_KHZ, 0));
}

int hvt_vcpu_set_guest_debug(int fd, const struct kvm_guest_debug *dbg)
{
    return ioctl_rc(ioctl(fd, KVM_SET_GUEST_DEBUG, dbg));
}

int hvt_vcpu_stats_fd(int fd)
{
#ifndef KVM_GET_STATS_FD
#define KVM_GET_STATS_FD _IO(KVMIO, 0xce) /* Linux 5.14 */
#endif
    return ioctl_rc(ioctl(fd, KVM_GET_STATS_FD, 0));
}

int hvt_vcpu_get_debugregs(int fd, struct kvm_debugregs *regs)
{
    return ioctl_rc(ioctl(fd, KVM_GET_DEBUGREGS, regs));
}

int hvt_vcpu_set_debugregs(int fd, const struct kvm_debugregs *regs)
{
    return ioctl_rc(ioctl(fd, KVM_SET_DEBUGREGS, regs));
}

int hvt_vcpu_get_xsave(int fd, void *area, int size)
{
    if (size < (int)sizeof(struct kvm_xsave))
        return -EINVAL;
    /* KVM_GET_XSAVE2 fills as many bytes as KVM_CAP_XSAVE2 said; plain GET_XSAVE 4096. */
    unsigned long req = size > (int)sizeof(struct kvm_xsave) ? KVM_GET_XSAVE2 : KVM_GET_XSAVE;
    return ioctl_rc(ioctl(fd, req, area));
}

int hvt_vcpu_set_xsave(int fd, const void *area)
{
    return ioctl_rc(ioctl(fd, KVM_SET_XSAVE, area));
}

int hvt_vcpu_get_xcrs(int fd, struct kvm_xcrs *xcrs)
{
    return ioctl_rc(ioctl(fd, KVM_GET_XCRS, xcrs));
}

int hvt_vcpu_set_xcrs(int fd, const struct kvm_xcrs *xcrs)
{
    return ioctl_rc(ioctl(fd, KVM_SET_XCRS, xcrs));
}

int hvt_vcpu_get_lapic(int fd, struct kvm_lapic_state *lapic)
{
    return ioctl_rc(ioctl(fd, KVM_GET_LAPIC, lapic));
}

int hvt_vcpu_get_mp_state(int fd, struct kvm_mp_state *state)
{
    return ioctl_rc(ioctl(fd, KVM_GET_MP_STATE, state));
}

int hvt_vcpu_set_mp_state(int fd, const struct kvm_mp_state *state)
{
    return ioctl_rc(ioctl(fd, KVM_SET_MP_STATE, state));
}

int hvt_vcpu_set_lapic(int fd, const struct kvm_lapic_state *lapic)
{
    return ioctl_rc(ioctl(fd, KVM_SET_LAPIC, lapic));
}

int hvt_vcpu_get_cpuid(int fd, struct kvm_cpuid_entry2 *entries, int max)
{
    if (max < 0)
        return -EINVAL;
    struct kvm_cpuid2 *c = calloc(1, sizeof(*c) + (size_t)max * sizeof(*entries));
    if (!c)
        return -ENOMEM;
    c->nent = (uint32_t)max;
    int rc = ioctl_rc(ioctl(fd, KVM_GET_CPUID2, c));
    if (rc == 0) {
        memcpy(entries, c->entries, (size_t)c->nent * sizeof(*entries));
        rc = (int)c->nent;
    }
    free(c);
    return rc;
}

int hvt_vcpu_inject_nmi(int fd)
{
    return ioctl_rc(ioctl(fd, KVM_NMI, 0));
}

int hvt_vcpu_inject_interrupt(int fd, uint32_t vector)
{
    struct kvm_interrupt irq = {.irq = vector};
    return ioctl_rc(ioctl(fd, KVM_INTERRUPT, &irq));
}

int hvt_vcpu_set_tsc_khz(int fd, uint32_t khz)
{
    return ioctl_rc(ioctl(fd, KVM_SET_TSC_KHZ, (unsigned long)khz));
}

/* KVM_{HAS,GET,SET}_DEVICE_ATTR on a vCPU fd; `value` points at the attribute's data. */
int hvt_vcpu_has_attr(int fd, uint32_t group, uint64_t attr)
{
    struct kvm_device_attr a = {.group = group, .attr = attr};
    return ioctl_rc(ioctl(fd, KVM_HAS_DEVICE_ATTR, &a));
}

int hvt_vcpu_get_attr(int fd, uint32_t group, uint64_t attr, void *value)
{
    struct kvm_device_attr a = {.group = group, .attr = attr, .addr = (uint64_t)(uintptr_t)value};
    return ioctl_rc(ioctl(fd, KVM_GET_DEVICE_ATTR, &a));
}

int hvt_vcpu_set_attr(int fd, uint32_t group, uint64_t attr, const void *value)
{
    struct kvm_device_attr a = {.group = group, .attr = attr, .addr = (uint64_t)(uintptr_t)value};
    return ioctl_rc(ioctl(fd, KVM_SET_DEVICE_ATTR, &a));
}

/* KVM_RUN that returns at once (kvm_run.immediate_exit): KVM first finishes a pending exit
 * and applies kvm_dirty_regs, and reports kvm_valid_regs. -EINTR is the expected answer. */
static int immediate_run(int fd, struct kvm_run *run)
{
    run->immediate_exit = 1;
    int rc = ioctl_rc(ioctl(fd, KVM_RUN, 0));
    run->immediate_exit = 0;
    if (rc == 0)
        return -EBUSY; /* KVM went on to a new exit: not a stop point */
    if (rc == -EINTR || rc == -EAGAIN)
        run->exit_reason = KVM_EXIT_INTR; /* nothing is pending any more */
    return rc;
}

int hvt_vcpu_exit_pending(const struct kvm_run *run)
{
    switch (run->exit_reason) {
    case KVM_EXIT_UNKNOWN:
    case KVM_EXIT_HLT:
    case KVM_EXIT_SHUTDOWN:
    case KVM_EXIT_FAIL_ENTRY:
    case KVM_EXIT_INTR:
    case KVM_EXIT_INTERNAL_ERROR:
    case KVM_EXIT_SYSTEM_EVENT:
    case KVM_EXIT_DEBUG:
        return 0;
    default:
        return 1;
    }
}

int hvt_vcpu_reset_finish(int fd, struct kvm_run *run, int with_events, uint32_t flags)
{
    if (!hvt_vcpu_exit_pending(run))
        return 0;
    if ((flags & HVT_RESET_OUT_SETTLED) && run->exit_reason == KVM_EXIT_IO
        && run->io.direction == KVM_EXIT_IO_OUT)
        return HVT_RESET_DID_SKIP; /* done at the exit: the registers may change at once */
    /* The pending exit must finish before the registers change: KVM applies kvm_dirty_regs
     * before it, on top of the state it would complete. */
    uint64_t valid = run->kvm_valid_regs;
    run->kvm_valid_regs = valid | KVM_SYNC_X86_SREGS | (with_events ? KVM_SYNC_X86_EVENTS : 0);
    int rc = immediate_run(fd, run);
    run->kvm_valid_regs = valid;
    if (rc != -EINTR && rc != -EAGAIN)
        return rc;
    /* KVM stores the sync area on its way out of an interrupted run */
    return HVT_RESET_DID_COMPLETE | (rc == -EINTR ? HVT_RESET_REPORTED : 0);
}

int hvt_vcpu_reset_restore(int fd, struct kvm_run *run, const struct kvm_regs *regs,
                           const struct kvm_sregs *sregs, const struct kvm_vcpu_events *events,
                           const void *xsave, int finished)
{
    int done = 0;
    if (finished & HVT_RESET_DID_SKIP) {
        /* Nothing to compare with, nothing pending: all of it rides in with the next KVM_RUN,
         * which applies kvm_dirty_regs before anything else. */
        run->s.regs.regs = *regs;
        run->s.regs.sregs = *sregs;
        if (events)
            run->s.regs.events = *events;
        run->kvm_dirty_regs |= KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | (events ? KVM_SYNC_X86_EVENTS : 0);
        done |= HVT_RESET_DID_DEFER_REGS | HVT_RESET_DID_SKIP;
    } else if ((finished & HVT_RESET_REPORTED) && !memcmp(&run->s.regs.sregs, sregs, sizeof(*sregs))
        && (!events || !memcmp(&run->s.regs.events, events, sizeof(*events)))) {
        /* Only REGS differ: they ride in with the next KVM_RUN (KVM clears the bit). Any
         * ordering against the CPL0 state set after this does not matter for them. */
        run->s.regs.regs = *regs;
        run->kvm_dirty_regs |= KVM_SYNC_X86_REGS;
        done |= HVT_RESET_DID_DEFER_REGS;
    } else {
        run->s.regs.regs = *regs;
        run->s.regs.sregs = *sregs;
        if (events)
            run->s.regs.events = *events;
        run->kvm_dirty_regs = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | (events ? KVM_SYNC_X86_EVENTS : 0);
        int rc = immediate_run(fd, run);
        run->kvm_dirty_regs = 0;
        if (rc != -EINTR && rc != -EAGAIN)
            return rc;
        done |= HVT_RESET_DID_SYNC;
    }
    if (xsave) {
        int rc = ioctl_rc(ioctl(fd, KVM_SET_XSAVE, xsave));
        if (rc < 0)
            return rc;
        done |= HVT_RESET_DID_XSAVE;
    }
    return done;
}

int hvt_vcpu_flush_sync(int fd, struct kvm_run *run)
{
    if (!run)
        return -EINVAL;
    if (!run->kvm_dirty_regs)
        return 0;
    int rc = immediate_run(fd, run);
    return rc == -EINTR || rc == -EAGAIN ? 0 : rc;
}

int hvt_vcpu_reset(int fd, struct kvm_run *run, const struct kvm_regs *regs,
                   const struct kvm_sregs *sregs, const struct kvm_vcpu_events *events,
                   const void *xsave, uint32_t flags)
{
    if (!run || !regs || !sregs)
        return -EINVAL;
    int finished = hvt_vcpu_reset_finish(fd, run, events != NULL, flags);
    if (finished < 0)
        return finished;
    int done = hvt_vcpu_reset_restore(fd, run, regs, sregs, events, xsave, finished);
    return done < 0 ? done : done | (finished & HVT_RESET_DID_COMPLETE);
}
