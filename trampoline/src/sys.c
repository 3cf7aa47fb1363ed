/* /dev/kvm itself: open, versions, capabilities, supported CPUID/MSR lists, timing helpers. */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <x86intrin.h>

_Static_assert(sizeof(struct kvm_regs) == 144, "kvm_regs layout");
_Static_assert(sizeof(struct kvm_sregs) == 312, "kvm_sregs layout");
_Static_assert(sizeof(struct kvm_segment) == 24, "kvm_segment layout");
_Static_assert(sizeof(struct kvm_msr_entry) == 16, "kvm_msr_entry layout");
_Static_assert(sizeof(struct kvm_cpuid_entry2) == 40, "kvm_cpuid_entry2 layout");
_Static_assert(sizeof(struct kvm_vcpu_events) == 64, "kvm_vcpu_events layout");

int hvt_sys_open(const char *path)
{
    int fd = open(path ? path : "/dev/kvm", O_RDWR | O_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

int hvt_sys_close(int fd)
{
    return close(fd) < 0 ? -errno : 0;
}

static int ioctl_rc(int rc)
{
    return rc < 0 ? -errno : rc;
}

int hvt_sys_api_version(int kvm_fd)
{
    return ioctl_rc(ioctl(kvm_fd, KVM_GET_API_VERSION, 0));
}

int hvt_sys_check_extension(int fd, long cap)
{
    return ioctl_rc(ioctl(fd, KVM_CHECK_EXTENSION, cap));
}

int hvt_sys_vcpu_mmap_size(int kvm_fd)
{
    return ioctl_rc(ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0));
}

int hvt_sys_get_supported_cpuid(int kvm_fd, struct kvm_cpuid_entry2 *entries, int max,
                                int *needed)
{
    if (max < 0)
        return -EINVAL;
    struct kvm_cpuid2 *c = calloc(1, sizeof(*c) + (size_t)max * sizeof(*entries));
    if (!c)
        return -ENOMEM;
    c->nent = (uint32_t)max;
    int rc = ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, c);
    if (rc < 0) {
        rc = -errno;
        if (needed)
            *needed = rc == -E2BIG ? max * 2 + 16 : 0;
    } else {
        memcpy(entries, c->entries, c->nent * sizeof(*entries));
        rc = (int)c->nent;
    }
    free(c);
    return rc;
}

static int get_msr_list(int kvm_fd, unsigned long req, uint32_t *indices, int max, int *needed)
{
    if (max < 0)
        return -EINVAL;
    struct kvm_msr_list *l = calloc(1, sizeof(*l) + (size_t)max * sizeof(uint32_t));
    if (!l)
        return -ENOMEM;
    l->nmsrs = (uint32_t)max;
    int rc = ioctl(kvm_fd, req, l);
    if (needed)
        *needed = (int)l->nmsrs; /* KVM reports the real count on E2BIG */
    if (rc < 0) {
        rc = -errno;
    } else {
        memcpy(indices, l->indices, l->nmsrs * sizeof(uint32_t));
        rc = (int)l->nmsrs;
    }
    free(l);
    return rc;
}

int hvt_sys_get_msr_index_list(int kvm_fd, uint32_t *indices, int max, int *needed)
{
    return get_msr_list(kvm_fd, KVM_GET_MSR_INDEX_LIST, indices, max, needed);
}

int hvt_sys_get_msr_feature_index_list(int kvm_fd, uint32_t *indices, int max, int *needed)
{
    return get_msr_list(kvm_fd, KVM_GET_MSR_FEATURE_INDEX_LIST, indices, max, needed);
}

/* Shared by the system fd (feature MSRs) and vCPU fds: kvm_msrs header + entries. */
int hvt_msrs_ioctl(int fd, unsigned long req, struct kvm_msr_entry *entries, int count)
{
    if (count < 0)
        return -EINVAL;
    struct kvm_msrs *m = calloc(1, sizeof(*m) + (size_t)count * sizeof(*entries));
    if (!m)
        return -ENOMEM;
    m->nmsrs = (uint32_t)count;
    memcpy(m->entries, entries, (size_t)count * sizeof(*entries));
    int rc = ioctl(fd, req, m);
    if (rc < 0) {
        rc = -errno;
    } else {
        memcpy(entries, m->entries, (size_t)count * sizeof(*entries));
    }
    free(m);
    return rc;
}

int hvt_sys_get_feature_msrs(int kvm_fd, struct kvm_msr_entry *entries, int count)
{
    return hvt_msrs_ioctl(kvm_fd, KVM_GET_MSRS, entries, count);
}

int hvt_sys_nop(void)
{
    return 0;
}

int hvt_sys_nop_ioctl(int kvm_fd)
{
    return ioctl_rc(ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_USER_MEMORY));
}

uint64_t hvt_sys_rdtsc(void)
{
    return __rdtsc();
}

uint64_t hvt_sys_rdtscp(uint32_t *aux)
{
    unsigned int a = 0;
    uint64_t t = __rdtscp(&a);
    if (aux)
        *aux = a;
    return t;
}

/* A realtime signal nobody else in a Python process uses; glibc reserves the first few. */
int hvt_sys_kick_signal(void)
{
    return SIGRTMIN + 4;
}

static void kick_handler(int sig)
{
    (void)sig; /* its only job is to make KVM_RUN return -EINTR */
}

int hvt_sys_init_kick_signal(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = kick_handler; /* no SA_RESTART: the ioctl must return */
    sigemptyset(&sa.sa_mask);
    return sigaction(hvt_sys_kick_signal(), &sa, NULL) < 0 ? -errno : 0;
}
