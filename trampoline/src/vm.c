/* A VM: memory slots, TSS/identity-map addresses, in-kernel irqchip and PIT, caps. */
#include "internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

#define HVT_PAGE_SIZE 4096 /* KVM's dirty log has one bit a 4 KiB page */

static int ioctl_rc(int rc)
{
    return rc < 0 ? -errno : rc;
}

int hvt_vm_create(int kvm_fd, unsigned long type)
{
    int rc;
    do {
        rc = ioctl(kvm_fd, KVM_CREATE_VM, type);
    } while (rc < 0 && errno == EINTR);
    return ioctl_rc(rc);
}

int hvt_vm_set_user_memory(int vm_fd, uint32_t slot, uint32_t flags, uint64_t gpa, uint64_t size,
                           void *host_addr)
{
    struct kvm_userspace_memory_region r = {
        .slot = slot,
        .flags = flags,
        .guest_phys_addr = gpa,
        .memory_size = size,
        .userspace_addr = (uint64_t)(uintptr_t)host_addr,
    };
    return ioctl_rc(ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, &r));
}

int hvt_vm_set_tss_addr(int vm_fd, uint64_t gpa)
{
    return ioctl_rc(ioctl(vm_fd, KVM_SET_TSS_ADDR, (unsigned long)gpa));
}

int hvt_vm_set_identity_map_addr(int vm_fd, uint64_t gpa)
{
    return ioctl_rc(ioctl(vm_fd, KVM_SET_IDENTITY_MAP_ADDR, &gpa));
}

int hvt_vm_create_irqchip(int vm_fd)
{
    return ioctl_rc(ioctl(vm_fd, KVM_CREATE_IRQCHIP, 0));
}

int hvt_vm_create_pit2(int vm_fd, uint32_t flags)
{
    struct kvm_pit_config cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.flags = flags;
    return ioctl_rc(ioctl(vm_fd, KVM_CREATE_PIT2, &cfg));
}

int hvt_vm_irq_line(int vm_fd, uint32_t irq, uint32_t level)
{
    struct kvm_irq_level l = {.irq = irq, .level = level};
    return ioctl_rc(ioctl(vm_fd, KVM_IRQ_LINE, &l));
}

int hvt_vm_set_gsi_routing(int vm_fd, const struct kvm_irq_routing_entry *entries, int count)
{
    if (count < 0)
        return -EINVAL;
    struct kvm_irq_routing *r = calloc(1, sizeof(*r) + (size_t)count * sizeof(*entries));
    if (!r)
        return -ENOMEM;
    r->nr = (uint32_t)count;
    memcpy(r->entries, entries, (size_t)count * sizeof(*entries));
    int rc = ioctl_rc(ioctl(vm_fd, KVM_SET_GSI_ROUTING, r));
    free(r);
    return rc;
}

int hvt_vm_enable_cap(int vm_fd, uint32_t cap, uint64_t arg0, uint64_t arg1)
{
    struct kvm_enable_cap c;
    memset(&c, 0, sizeof(c));
    c.cap = cap;
    c.args[0] = arg0;
    c.args[1] = arg1;
    return ioctl_rc(ioctl(vm_fd, KVM_ENABLE_CAP, &c));
}

int hvt_vm_set_msr_filter(int vm_fd, struct kvm_msr_filter *filter)
{
    return ioctl_rc(ioctl(vm_fd, KVM_X86_SET_MSR_FILTER, filter));
}

int hvt_vm_get_irqchip(int vm_fd, struct kvm_irqchip *chip)
{
    return ioctl_rc(ioctl(vm_fd, KVM_GET_IRQCHIP, chip));
}

int hvt_vm_set_irqchip(int vm_fd, const struct kvm_irqchip *chip)
{
    return ioctl_rc(ioctl(vm_fd, KVM_SET_IRQCHIP, chip));
}

int hvt_vm_get_pit2(int vm_fd, struct kvm_pit_state2 *pit)
{
    return ioctl_rc(ioctl(vm_fd, KVM_GET_PIT2, pit));
}

int hvt_vm_set_pit2(int vm_fd, const struct kvm_pit_state2 *pit)
{
    return ioctl_rc(ioctl(vm_fd, KVM_SET_PIT2, pit));
}

int hvt_vm_get_clock(int vm_fd, struct kvm_clock_data *clock)
{
    return ioctl_rc(ioctl(vm_fd, KVM_GET_CLOCK, clock));
}

int hvt_vm_set_clock(int vm_fd, const struct kvm_clock_data *clock)
{
    return ioctl_rc(ioctl(vm_fd, KVM_SET_CLOCK, clock));
}

int hvt_vm_get_dirty_log(int vm_fd, uint32_t slot, uint64_t *bitmap)
{
    struct kvm_dirty_log log;
    memset(&log, 0, sizeof(log));
    log.slot = slot;
    log.dirty_bitmap = bitmap;
    return ioctl_rc(ioctl(vm_fd, KVM_GET_DIRTY_LOG, &log));
}

int hvt_vm_clear_dirty_log(int vm_fd, uint32_t slot, uint64_t first_page, uint32_t num_pages,
                           uint64_t *bitmap)
{
    struct kvm_clear_dirty_log log;
    memset(&log, 0, sizeof(log));
    log.slot = slot;
    log.first_page = first_page;
    log.num_pages = num_pages;
    log.dirty_bitmap = bitmap;
    return ioctl_rc(ioctl(vm_fd, KVM_CLEAR_DIRTY_LOG, &log));
}

/* A vCPU's state only CPL0 code changes, in the order a restore uses. */
static int reset_privileged(struct hvt_reset_vcpu *v)
{
    int rc = 0;
    if (v->xcrs && (rc = hvt_vcpu_set_xcrs(v->fd, v->xcrs)) < 0)
        return rc;
    if (v->msrs) {
        rc = hvt_vcpu_set_msrs(v->fd, v->msrs, v->nmsrs);
        if (rc < 0)
            return rc;
        v->msrs_set = rc;
        if (rc < v->nmsrs)
            return HVT_RESET_MSRS_SHORT; /* the caller decides about the refused one */
    }
    if (v->mp_state && (rc = hvt_vcpu_set_mp_state(v->fd, v->mp_state)) < 0)
        return rc;
    if (v->lapic && (rc = hvt_vcpu_set_lapic(v->fd, v->lapic)) < 0)
        return rc;
    if (v->debugregs && (rc = hvt_vcpu_set_debugregs(v->fd, v->debugregs)) < 0)
        return rc;
    return HVT_RESET_DID_PRIVILEGED;
}

static int vm_reset(int vm_fd, struct hvt_reset_slot *slots, int nslots, struct hvt_reset_vcpu *vcpus,
                    int nvcpus, const struct hvt_reset_vmstate *vmstate, struct hvt_reset_rows *rows,
                    struct hvt_dirty_rings *rings)
{
    if (nslots < 0 || nvcpus < 0 || (nslots && !slots) || (nvcpus && !vcpus))
        return -EINVAL;
    if (rows)
        hvt_mem_reset_rows(rows);
    int first_error = 0;
    /* Pending exits first: finishing a string IN writes guest memory. */
    for (int i = 0; i < nvcpus; i++) {
        struct hvt_reset_vcpu *v = &vcpus[i];
        /* CPL0 state must follow the SREGS: with it, they cannot wait for the next KVM_RUN */
        uint32_t flags = v->xcrs || v->msrs || v->mp_state || v->lapic || v->debugregs ? 0 : v->flags;
        v->done = v->run && v->regs && v->sregs ? hvt_vcpu_reset_finish(v->fd, v->run, v->events != NULL, flags) : -EINVAL;
        if (v->done < 0 && !first_error)
            first_error = v->done;
    }
    if (first_error)
        return first_error;
    if (rings) { /* after the pending exits: a finished string IN writes guest memory */
        int64_t rc = hvt_dirty_rings_harvest(rings);
        if (rc < 0)
            return (int)rc;
    }
    int copied = 0;
    for (int i = 0; i < nslots; i++) {
        struct hvt_reset_slot *s = &slots[i];
        int rc = hvt_mem_reset_pages(vm_fd, s->slot, s->dst, s->src, s->bitmap, s->logged, s->extra,
                                     s->host_dirty, s->npages, HVT_PAGE_SIZE);
        if (rc < 0)
            return rc;
        copied += rc;
    }
    if (vmstate) {
        int rc = 0;
        for (int i = 0; vmstate->irqchip && i < vmstate->nirqchip && rc >= 0; i++)
            rc = hvt_vm_set_irqchip(vm_fd, &vmstate->irqchip[i]);
        if (rc >= 0 && vmstate->pit2)
            rc = hvt_vm_set_pit2(vm_fd, vmstate->pit2);
        if (rc < 0)
            return rc;
    }
    for (int i = 0; i < nvcpus; i++) {
        struct hvt_reset_vcpu *v = &vcpus[i];
        int done = hvt_vcpu_reset_restore(v->fd, v->run, v->regs, v->sregs, v->events, v->xsave, v->done);
        if (done >= 0) {
            int more = reset_privileged(v);
            done = more < 0 ? more : done | more;
        }
        v->done = done < 0 ? done : done | (v->done & HVT_RESET_DID_COMPLETE);
        if (done < 0 && !first_error)
            first_error = done;
    }
    if (first_error)
        return first_error;
    if (vmstate && vmstate->clock) {
        int rc = hvt_vm_set_clock(vm_fd, vmstate->clock);
        if (rc < 0)
            return rc;
    }
    return copied;
}

static void tally_vcpus(const struct hvt_reset_vcpu *vcpus, int nvcpus, uint64_t rows_left,
                        struct hvt_reset_tally *tally)
{
    memset(tally, 0, sizeof(*tally));
    for (int i = 0; i < nvcpus; i++) {
        int32_t done = vcpus[i].done;
        tally->completed += !!(done & HVT_RESET_DID_COMPLETE);
        tally->synced += !!(done & HVT_RESET_DID_SYNC);
        tally->settled += !!(done & HVT_RESET_DID_SKIP);
        if (done & HVT_RESET_MSRS_SHORT)
            tally->left |= HVT_RESET_LEFT_MSRS;
    }
    if (rows_left)
        tally->left |= HVT_RESET_LEFT_ROWS;
}

int hvt_vm_reset(int vm_fd, struct hvt_reset_slot *slots, int nslots, struct hvt_reset_vcpu *vcpus,
                 int nvcpus, const struct hvt_reset_vmstate *vmstate, struct hvt_reset_rows *rows,
                 struct hvt_dirty_rings *rings, struct hvt_reset_tally *tally)
{
    int copied = vm_reset(vm_fd, slots, nslots, vcpus, nvcpus, vmstate, rows, rings);
    if (tally && copied >= 0)
        tally_vcpus(vcpus, nvcpus, rows ? rows->changed & rows->python : 0, tally);
    return copied;
}
