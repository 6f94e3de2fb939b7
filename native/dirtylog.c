/* Dirty-page log: see dirtylog.h. */
#include "dirtylog.h"

void tn_log_mark(struct tn_log *log, uint64_t gpa, uint64_t len)
{
    if (log == 0 || len == 0)
        return;
    uint64_t end = gpa + len - 1;
    if (end < gpa)
        end = UINT64_MAX;  /* wraps: up to the top of the address space */
    uint64_t page = gpa / TN_LOG_PAGE, last = end / TN_LOG_PAGE;
    while (page <= last) {
        uint64_t byte = page / 8;
        if (byte >= log->size) {
            __atomic_fetch_add(&log->beyond, 1, __ATOMIC_RELAXED);
            return;
        }
        /* the bits of this byte the range covers, in one atomic OR */
        uint8_t bits = 0;
        do {
            bits |= (uint8_t)(1u << (page % 8));
            page++;
        } while (page <= last && page % 8 != 0);
        __atomic_fetch_or(&log->bitmap[byte], bits, __ATOMIC_RELEASE);
    }
}

void tn_log_mark_pages(struct tn_log *log, uint64_t gpa, uint64_t stride, uint64_t count)
{
    for (uint64_t i = 0; i < count; i++, gpa += stride)
        tn_log_mark(log, gpa, 1);
}
