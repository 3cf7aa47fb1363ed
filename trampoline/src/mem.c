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

int hvt_mem_cas(void *addr, uint32_t size, void *expected, const void *desired)
{
    if (size == 0 || size > 16 || (size & (size - 1)) || ((uintptr_t)addr & (size - 1)))
        return -EINVAL;
    switch (size) {
    case 1: {
        uint8_t e, d;
        memcpy(&e, expected, 1);
        memcpy(&d, desired, 1);
        int ok = __atomic_compare_exchange_n((uint8_t *)addr, &e, d, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
        memcpy(expected, &e, 1);
        return ok;
    }
    case 2: {
        uint16_t e, d;
        memcpy(&e, expected, 2);
        memcpy(&d, desired, 2);
        int ok = __atomic_compare_exchange_n((uint16_t *)addr, &e, d, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
        memcpy(expected, &e, 2);
        return ok;
    }
    case 4: {
        uint32_t e, d;
        memcpy(&e, expected, 4);
        memcpy(&d, desired, 4);
        int ok = __atomic_compare_exchange_n((uint32_t *)addr, &e, d, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
        memcpy(expected, &e, 4);
        return ok;
    }
    case 8: {
        uint64_t e, d;
        memcpy(&e, expected, 8);
        memcpy(&d, desired, 8);
        int ok = __atomic_compare_exchange_n((uint64_t *)addr, &e, d, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
        memcpy(expected, &e, 8);
        return ok;
    }
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
