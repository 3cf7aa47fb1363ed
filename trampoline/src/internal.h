/* Helpers shared between the trampoline's files; not exported. */
#ifndef HVT_INTERNAL_H
#define HVT_INTERNAL_H

#include "hvt.h"

/* KVM_GET_MSRS / KVM_SET_MSRS with the variable-length kvm_msrs header built here. */
int hvt_msrs_ioctl(int fd, unsigned long req, struct kvm_msr_entry *entries, int count);

#endif
