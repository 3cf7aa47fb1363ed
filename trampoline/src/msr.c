/* Host MSRs through the msr driver (/dev/cpu/N/msr), each access reporting a fault as -EIO. */
#include "hvt.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

static int open_msr(int cpu, int flags)
{
    char path[64];
    if (cpu < 0)
        return -EINVAL;
    snprintf(path, sizeof(path), "/dev/cpu/%d/msr", cpu);
    int fd = open(path, flags | O_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

int hvt_msr_host_read(int cpu, uint32_t index, uint64_t *value)
{
    int fd = open_msr(cpu, O_RDONLY);
    if (fd < 0)
        return fd;
    ssize_t n = pread(fd, value, sizeof(*value), index);
    int rc = n == (ssize_t)sizeof(*value) ? 0 : (n < 0 ? -errno : -EIO);
    close(fd);
    return rc;
}

int hvt_msr_host_write(int cpu, uint32_t index, uint64_t value)
{
    int fd = open_msr(cpu, O_WRONLY);
    if (fd < 0)
        return fd;
    ssize_t n = pwrite(fd, &value, sizeof(value), index);
    int rc = n == (ssize_t)sizeof(value) ? 0 : (n < 0 ? -errno : -EIO);
    close(fd);
    return rc;
}
