/* A user-mode queue pair's native parts besides the UDP fast path (read by
 * cffi as the cdef).
 *
 * The outbox (struct tn_uoutq): frames the Python stack has for one pair's RX
 * ring (ARP/DHCP/NDP answers, first datagrams, ICMP, TCP segments).  Python
 * puts them from the Trio thread; tn_uout_drain lays them into the ring, from
 * the pair's Trio task or from its worker thread: the same call either way.
 * A mutex guards the queue; wake_fd (an eventfd) is readable while frames
 * wait, so the consumer can sleep on it with the pair's epoll set.
 *
 * The worker (tn_user_pair_run): with --threads, one thread per pair runs
 * tn_user_tx, tn_uout_drain and tn_user_rx with the GIL released.  Frames
 * for Python collect in the pair's struct tn_slow; once a TX batch left any
 * there the worker hands the buffer over (handed = 1, then a write to
 * slow_fd) and takes no more TX chains until Python has dispatched them and
 * called tn_user_pair_resume (which writes resume_fd).  Socket errors the
 * fast path flagged are signalled on slow_fd too (Python takes the table's
 * attention list).  The pair's Trio task starts it, stops it by writing
 * stop_fd, and joins it; it returns 0 when stopped, or a TN_E_* ring error
 * (error_ring: 0 tx, 1 rx). */
#pragma once
#include <stdint.h>

struct tn_vq;
struct tn_mem;
struct tn_scratch;
struct tn_batch;
struct tn_utable;
struct tn_slow;
struct tn_pair_stats;

#define TN_UOUT_FRAMES 1024

/* What the guest's driver takes on RX (the drains' data_valid argument):
 * DATA_VALID frames (GUEST_CSUM), TCP GSO frames (GUEST_TSO4, GUEST_TSO6). */
#define TN_RX_DATA_VALID 1
#define TN_RX_TSO4 2
#define TN_RX_TSO6 4

struct tn_uoutq {
    void *lock;               /* its mutex (tn_uout_init allocates it) */
    int32_t wake_fd;          /* eventfd, the caller's: readable while frames wait */
    uint32_t limit;           /* frames held at most (<= TN_UOUT_FRAMES) */
    uint32_t n;               /* frames held */
    uint32_t head;            /* oldest frame's index in frames[] */
    uint8_t signalled;        /* wake_fd was written since the last drain */
    uint8_t deferred;         /* puts do not write wake_fd (tn_uout_defer) */
    uint64_t dropped;         /* puts refused: full */
    uint64_t oversize;        /* frames no RX buffer set of the guest could ever hold: dropped */
    uint8_t *frames[1024];    /* malloc'd, each with room for a virtio-net header in front */
    uint32_t len[1024];
};

/* 0, -EINVAL (limit), or -ENOMEM. */
int tn_uout_init(struct tn_uoutq *q, int wake_fd, uint32_t limit);
/* Frees the frames and the mutex (no drain may run any more). */
void tn_uout_close(struct tn_uoutq *q);
/* Queue a copy of an Ethernet frame (no virtio-net header): 1, 0 when the
 * queue is full (counted in dropped), -EINVAL (too long) or -ENOMEM. */
int tn_uout_put(struct tn_uoutq *q, const uint8_t *frame, uint32_t len);
/* Drop every frame held. */
void tn_uout_clear(struct tn_uoutq *q);
/* on: puts stop writing wake_fd (a run of puts from the Trio thread, one
 * wake-up for all); off: wake_fd is written if frames wait unsignalled. */
void tn_uout_defer(struct tn_uoutq *q, int on);
/* Consume the wake-up: wake_fd is readable again once a frame is put. */
void tn_uout_unwake(struct tn_uoutq *q);
/* Copy frame i (0: the oldest) into buf (cap bytes); returns its length
 * (which may exceed cap: then only cap bytes were copied), -1 if none. */
int tn_uout_get(struct tn_uoutq *q, uint32_t i, uint8_t *buf, uint32_t cap);
/* tn_uout_get(q, 0, ...) and drop it from the queue. */
int tn_uout_pop(struct tn_uoutq *q, uint8_t *buf, uint32_t cap);
/* Move every frame of from to the back of to; returns the frames moved (the
 * rest, for want of room in to, are dropped and counted there). */
uint32_t tn_uout_move(struct tn_uoutq *from, struct tn_uoutq *to);
/* Lay up to max frames into the RX ring, oldest first, behind a virtio-net
 * header (flags DATA_VALID when data_valid has TN_RX_DATA_VALID; num_buffers
 * when hdr_len >= 12; TCP data entries as GSO frames with TN_RX_TSO4/6);
 * each frame is published as it is laid.  b->ring_full: the next frame did not
 * fit (it stays queued); b->fd_blocked: the queue is empty.  A frame that
 * even every buffer of the ring would not hold is dropped
 * (b->drops_no_buffer).  Returns frames laid or a negative TN_E_*. */
int tn_uout_drain(struct tn_uoutq *q, struct tn_vq *vq, const struct tn_mem *m, int mrg,
                  uint32_t hdr_len, int data_valid, uint32_t max, struct tn_scratch *s,
                  struct tn_batch *b);

/* cdef-skip */
/* For the native TCP paths (usertcp_push.c), which take the outbox's mutex
 * before a connection's (the drain's order), never after: tn_uout_put and
 * tn_uout_put_tcp with the mutex held, and the frames it has room for. */
struct tn_tcpc;
void tn_uout_lock(struct tn_uoutq *q);
void tn_uout_unlock(struct tn_uoutq *q);
uint32_t tn_uout_room_locked(const struct tn_uoutq *q);
int tn_uout_put_locked(struct tn_uoutq *q, const uint8_t *frame, uint32_t len);
int tn_uout_put_tcp_locked(struct tn_uoutq *q, struct tn_tcpc *c, uint32_t seq, uint32_t ack,
                           uint16_t window, uint8_t flags, uint32_t len, uint32_t seg,
                           uint32_t mss);
/* cdef-end */

struct tn_upair_io {
    struct tn_vq *tx;          /* NULL: TX not served */
    struct tn_vq *rx;          /* NULL: no RX */
    const struct tn_mem *mem;
    struct tn_scratch *scratch;
    struct tn_utable *table;
    struct tn_slow *slow;
    struct tn_uoutq *out;
    struct tn_pair_stats *stats;
    int tx_kick;               /* -1: none (polled) */
    int rx_kick;
    int tx_call;               /* -1: no interrupts */
    int rx_call;
    int stop_fd;
    int slow_fd;               /* the worker writes it: slow handed over, or flows to look at */
    int resume_fd;             /* tn_user_pair_resume writes it */
    uint32_t hdr_len;
    uint32_t batch;
    uint32_t spin_ns;          /* busy-wait this long for more TX before sleeping */
    uint32_t handed;           /* slow belongs to Python until tn_user_pair_resume */
    uint8_t pair;
    uint8_t mrg;
    uint8_t data_valid;
    uint8_t error_ring;        /* 0: tx, 1: rx */
    int32_t error;
};

int tn_user_pair_run(struct tn_upair_io *io);
/* Python's side of the hand-over: 1 when slow is Python's to drain. */
int tn_user_pair_handed(struct tn_upair_io *io);
/* Python drained slow: give it back to the worker. */
void tn_user_pair_resume(struct tn_upair_io *io);
