/* The driver half of a virtio-net device, for a network namespace's tap
 * (``trionet --netns``; read by cffi as the cdef).
 *
 * trionet serves a namespace the way it serves a VM: its own front end
 * (trionet/netns/) negotiates with the vhost-user session over a socketpair
 * and lays the rings out in a memfd, and this loop plays the guest's driver
 * for one queue pair, on its own thread with the GIL released:
 *
 *   tap -> TX ring: read() straight into a free TX buffer (the tap's
 *   virtio-net header is the ring's), post it, kick;
 *   RX ring -> tap: write() each used RX buffer (header and frame) to the tap
 *   and post it again.
 *
 * One copy each way, as a tap owner like pasta has.  Rings are split, without
 * EVENT_IDX; each descriptor is one buffer of buf_size bytes (no merged RX
 * buffers, so a buffer holds the largest frame a tap can carry).  The front
 * end lays the rings out empty, fills in the layout, the fds and stop_fd,
 * runs tn_nsdrv_run once on a thread and stops it by writing stop_fd.  It returns 0 when stopped, or -errno when the tap or an
 * eventfd failed; a used entry that names no descriptor of ours is -EPROTO. */
#pragma once
#include <stdint.h>

struct tn_nsdrv_stats {
    uint64_t tx_frames;       /* tap -> TX ring */
    uint64_t tx_bytes;
    uint64_t tx_errors;       /* tap reads that failed for one frame (dropped) */
    uint64_t rx_frames;       /* RX ring -> tap */
    uint64_t rx_bytes;
    uint64_t rx_errors;       /* tap writes refused (frame dropped) */
    uint64_t kicks;           /* eventfd writes to the device */
    uint64_t wakeups;         /* epoll_wait returns */
};

struct tn_nsdrv {
    uint8_t *base;            /* the memfd's mapping; offsets below are into it */
    uint64_t size;
    uint64_t tx_desc, tx_avail, tx_used, tx_bufs;
    uint64_t rx_desc, rx_avail, rx_used, rx_bufs;
    uint32_t qsize;           /* both rings; a power of two */
    uint32_t buf_size;        /* each descriptor's buffer */
    uint32_t batch;           /* tap reads per kick at most */
    int32_t tap_fd;
    int32_t tx_kick, tx_call, rx_kick, rx_call;
    int32_t stop_fd;
    struct tn_nsdrv_stats stats;
};

/* The layout fits in size and the fds are set: 0, else -EINVAL. */
int tn_nsdrv_check(const struct tn_nsdrv *d);
int tn_nsdrv_run(struct tn_nsdrv *d);
