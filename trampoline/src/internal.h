/* Helpers shared between the trampoline's files; not exported. */
#ifndef HVT_INTERNAL_H
#define HVT_INTERNAL_H

#include "hvt.h"

/* KVM_GET_MSRS / KVM_SET_MSRS with the variable-length kvm_msrs header built here. */
int hvt_msrs_ioctl(int fd, unsigned long req, struct kvm_msr_entry *entries, int count);

/* hvt_vcpu_reset's two halves, for hvt_vm_reset to put the memory copies between them (a
 * finished string IN writes guest memory). finish: HVT_RESET_DID_COMPLETE, plus
 * HVT_RESET_REPORTED when kvm_run's sync area holds the SREGS and events now; 0 when nothing
 * was pending; or -errno. restore: the other HVT_RESET_DID_* steps, or -errno. */
#define HVT_RESET_REPORTED 16
int hvt_vcpu_reset_finish(int fd, struct kvm_run *run, int with_events, uint32_t flags);
int hvt_vcpu_reset_restore(int fd, struct kvm_run *run, const struct kvm_regs *regs,
                           const struct kvm_sregs *sregs, const struct kvm_vcpu_events *events,
                           const void *xsave, int finished);

#endif
