/* The C reference exit loop: what a hand-written VMM's inner loop costs, for benchmarks. */
#include "hvt.h"

#include <errno.h>
#include <string.h>

int hvt_loop_reference(int vcpu_fd, struct kvm_run *run, uint64_t max_exits, uint16_t stop_port,
                       struct hvt_loop_stats *stats)
{
    memset(stats, 0, sizeof(*stats));
    while (stats->exits < max_exits) {
        int rc = hvt_vcpu_run(vcpu_fd);
        if (rc == -EINTR || rc == -EAGAIN)
            continue; /* a stray signal, as any VMM's loop sees: enter again */
        if (rc < 0)
            return rc;
        stats->last_reason = run->exit_reason;
        switch (run->exit_reason) {
        case KVM_EXIT_IO: {
            uint8_t *data = (uint8_t *)run + run->io.data_offset;
            if (run->io.direction == KVM_EXIT_IO_OUT) {
                uint64_t v = 0;
                memcpy(&v, data, run->io.size <= 8 ? run->io.size : 8);
                stats->last_port = run->io.port;
                stats->last_data = v;
                if (run->io.port == stop_port)
                    return 0;
            } else {
                memset(data, 0, (size_t)run->io.size * run->io.count);
            }
            stats->pio++;
            break;
        }
        case KVM_EXIT_MMIO:
            if (!run->mmio.is_write)
                memset(run->mmio.data, 0, sizeof(run->mmio.data));
            stats->mmio++;
            break;
        case KVM_EXIT_HLT:
            stats->hlt++;
            break;
        default:
            return 0;
        }
        stats->exits++;
    }
    return 0;
}
