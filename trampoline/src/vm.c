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

int hvt_vm_reset(int vm_fd, struct hvt_reset_slot *slots, int nslots, struct hvt_reset_vcpu *vcpus,
                 int nvcpus)
{
    if (nslots < 0 || nvcpus < 0 || (nslots && !slots) || (nvcpus && !vcpus))
        return -EINVAL;
    int first_error = 0;
    /* Pending exits first: finishing a string IN writes guest memory. */
    for (int i = 0; i < nvcpus; i++) {
        struct hvt_reset_vcpu *v = &vcpus[i];
        v->done = v->run && v->regs && v->sregs ? hvt_vcpu_reset_finish(v->fd, v->run, v->events != NULL) : -EINVAL;
        if (v->done < 0 && !first_error)
            first_error = v->done;
    }
    if (first_error)
        return first_error;
    int copied = 0;
    for (int i = 0; i < nslots; i++) {
        struct hvt_reset_slot *s = &slots[i];
        int rc = hvt_mem_reset_pages(vm_fd, s->slot, s->dst, s->src, s->bitmap, s->extra, s->host_dirty,
                                     s->npages, HVT_PAGE_SIZE);
        if (rc < 0)
            return rc;
        copied += rc;
    }
    for (int i = 0; i < nvcpus; i++) {
        struct hvt_reset_vcpu *v = &vcpus[i];
        int done = hvt_vcpu_reset_restore(v->fd, v->run, v->regs, v->sregs, v->events, v->xsave, v->done);
        v->done = done < 0 ? done : done | (v->done & HVT_RESET_DID_COMPLETE);
        if (done < 0 && !first_error)
            first_error = done;
    }
    return first_error ? first_error : copied;
}
