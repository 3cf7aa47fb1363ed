/* Guest memory seen from the host: page copies for fast reset (the loop Python would be slow
 * at) and atomic operations on RAM that running vCPUs share with the emulator. */
#include "hvt.h"

#include <errno.h>
#include <string.h>

int hvt_mem_copy_pages(void *dst, const void *src, const uint64_t *bitmap, uint64_t npages,
                       uint64_t page_size)
{
    if (!dst || !src || !bitmap || page_size == 0)
        return -EINVAL;
    int copied = 0;
    for (uint64_t w = 0; w < (npages + 63) / 64; w++) {
        uint64_t bits = bitmap[w];
        while (bits) {
            uint64_t page = w * 64 + (uint64_t)__builtin_ctzll(bits);
            bits &= bits - 1;
            if (page >= npages)
                break;
            memcpy((char *)dst + page * page_size, (const char *)src + page * page_size, page_size);
            copied++;
        }
    }
    return copied;
}

/* One width of compare-and-swap: 1 if *addr held *expected (now *desired), else 0 with
 * *expected updated to what it held. memcpy keeps the Python buffers' alignment out of it. */
#define HVT_CAS_WIDTH(type)                                                                     \
    do {                                                                                        \
        type e, d;                                                                              \
        memcpy(&e, expected, sizeof(type));                                                     \
        memcpy(&d, desired, sizeof(type));                                                     \
        int ok = __atomic_compare_exchange_n((type *)addr, &e, d, 0, __ATOMIC_SEQ_CST,           \
                                             __ATOMIC_SEQ_CST);                                 \
        memcpy(expected, &e, sizeof(type));                                                     \
        return ok;                                                                              \
    } while (0)

int hvt_mem_cas(void *addr, uint32_t size, void *expected, const void *desired)
{
    if (size == 0 || size > 16 || (size & (size - 1)) || ((uintptr_t)addr & (size - 1)))
        return -EINVAL;
    switch (size) {
    case 1:
        HVT_CAS_WIDTH(uint8_t);
    case 2:
        HVT_CAS_WIDTH(uint16_t);
    case 4:
        HVT_CAS_WIDTH(uint32_t);
    case 8:
        HVT_CAS_WIDTH(uint64_t);
    default: {
        /* cmpxchg16b (built with -mcx16): the __sync form is inlined, __atomic would call
         * libatomic, which may use a lock the guest's own cmpxchg16b does not honour. */
        unsigned __int128 e, d;
        memcpy(&e, expected, 16);
        memcpy(&d, desired, 16);
        unsigned __int128 seen = __sync_val_compare_and_swap((unsigned __int128 *)addr, e, d);
        memcpy(expected, &seen, 16);
        return seen == e;
    }
    }
}
