/* Dirty-page log for live migration (VHOST_F_LOG_ALL, SET_LOG_BASE).
 *
 * The VMM shares a bitmap with one bit per 4 KiB guest page, by guest
 * physical address: page p is bit p % 8 of byte p / 8.  While it copies the
 * guest's memory to the destination it reads and clears the bits; every page
 * trionet writes in the meantime (used ring, RX buffers, the avail-event word)
 * must be marked so it is copied again.  Marks are atomic ORs: worker threads
 * mark concurrently, and the VMM clears concurrently.  Marks go after the
 * write they describe. */
#pragma once
#include <stdint.h>

#define TN_LOG_PAGE 4096

struct tn_log {
    uint8_t *bitmap;
    uint64_t size;      /* bytes: the bitmap covers size * 8 pages */
    uint64_t beyond;    /* marks for pages past the bitmap's end (counted, not written) */
};

/* Mark every page [gpa, gpa + len) touches (nothing when log is NULL or len 0). */
void tn_log_mark(struct tn_log *log, uint64_t gpa, uint64_t len);
/* Mark count pages, the first at gpa, each stride bytes after the previous. */
void tn_log_mark_pages(struct tn_log *log, uint64_t gpa, uint64_t stride, uint64_t count);
