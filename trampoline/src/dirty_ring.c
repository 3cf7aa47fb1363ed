/* KVM's dirty rings (KVM_CAP_DIRTY_LOG_RING): one ring of written guest frames per vCPU,
 * mapped from the vCPU fd and read without a system call. A page goes into its vCPU's ring
 * on the first write after it was write-protected, and stays writable (and out of the ring)
 * until KVM_RESET_DIRTY_RINGS protects it again; the harvest below keeps what it read in a
 * bitmap per memory slot, so that the pages written since the last reset of the rings are
 * known without asking KVM. */
#include "hvt.h"

#include <errno.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#ifndef KVM_DIRTY_LOG_PAGE_OFFSET
#define KVM_DIRTY_LOG_PAGE_OFFSET 64 /* x86's, in pages: where the ring starts in the vCPU's mmap */
#endif

int hvt_dirty_ring_map(int vcpu_fd, uint32_t bytes, struct kvm_dirty_gfn **ring_out)
{
    if (!ring_out || bytes == 0)
        return -EINVAL;
    long page = sysconf(_SC_PAGESIZE);
    void *ring = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu_fd,
                      (off_t)KVM_DIRTY_LOG_PAGE_OFFSET * page);
    if (ring == MAP_FAILED)
        return -errno;
    *ring_out = ring;
    return 0;
}

int hvt_dirty_ring_unmap(struct kvm_dirty_gfn *ring, uint32_t bytes)
{
    return ring && munmap(ring, bytes) < 0 ? -errno : 0;
}

int64_t hvt_dirty_rings_harvest(struct hvt_dirty_rings *r)
{
    if (!r || !r->rings || !r->fetch || r->count < 0 || r->nslots < 0 || !r->entries
        || (r->entries & (r->entries - 1)))
        return -EINVAL;
    int64_t harvested = 0;
    for (int i = 0; i < r->count; i++) {
        struct kvm_dirty_gfn *ring = r->rings[i];
        if (!ring)
            continue;
        for (;;) {
            struct kvm_dirty_gfn *e = &ring[r->fetch[i] & (r->entries - 1)];
            /* acquire: the slot and offset KVM wrote before it set the flag */
            if (!(__atomic_load_n(&e->flags, __ATOMIC_ACQUIRE) & KVM_DIRTY_GFN_F_DIRTY))
                break;
            uint32_t slot = e->slot & 0xffff; /* the high half is the address space: always 0 here */
            if (slot < (uint32_t)r->nslots && r->bitmaps[slot] && e->offset < r->npages[slot])
                r->bitmaps[slot][e->offset / 64] |= 1ull << (e->offset % 64);
            else
                r->stray++; /* a slot gone since (or a frame outside it): nothing to copy */
            /* release: KVM may reuse the entry once KVM_RESET_DIRTY_RINGS has seen this */
            __atomic_store_n(&e->flags, KVM_DIRTY_GFN_F_RESET, __ATOMIC_RELEASE);
            r->fetch[i]++;
            harvested++;
        }
    }
    return harvested;
}

int hvt_vm_reset_dirty_rings(int vm_fd)
{
    int rc = ioctl(vm_fd, KVM_RESET_DIRTY_RINGS);
    return rc < 0 ? -errno : rc;
}
