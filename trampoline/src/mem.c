/* Host-side page copies for fast reset: no ioctl, just the loop Python would be slow at. */
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
