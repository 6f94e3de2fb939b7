/* trionet's native ring core: guest memory table, split virtqueues
 * (virtq.c), and the batched per-packet paths (virtq_batch.c).  Read by cffi
 * as the cdef (plain declarations and integer #defines only), and included by
 * virtq.c and virtq_batch.c.
 *
 * Nothing here owns policy: Python decides what runs when.  Every guest
 * address is range-checked against the memory table before use, every
 * descriptor walk is bounded, and any rule the driver breaks marks that ring
 * broken (vq->broken, vq->error) and is reported to the caller as a negative
 * TN_E_* code. */
#pragma once
#include <stdint.h>
#include <stddef.h>
#include <sys/uio.h>

#include "dirtylog.h"
#include "flows.h"

#define TN_MAX_REGIONS 64
#define TN_MAX_CHAIN_IOV 1024
#define TN_MAX_FRAME 65562

#define TN_E_AVAIL_JUMP -1
#define TN_E_HEAD_RANGE -2
#define TN_E_NEXT_RANGE -3
#define TN_E_LOOP -4
#define TN_E_ADDR -5
#define TN_E_INDIRECT_NOT_NEGOTIATED -6
#define TN_E_INDIRECT_NESTED -7
#define TN_E_INDIRECT_LEN -8
#define TN_E_INDIRECT_WITH_NEXT -9
#define TN_E_WRITE_IN_READ_CHAIN -10
#define TN_E_READ_IN_WRITE_CHAIN -11
#define TN_E_READ_AFTER_WRITE -12
#define TN_E_TOO_MANY_IOV -13
#define TN_E_CHAIN_TOO_LONG -14
#define TN_E_INDIRECT_NOT_HEAD -15
#define TN_E_NOT_READY -16
#define TN_E_INDIRECT_TOO_BIG -17

/* An indirect table may hold this many descriptors, or the ring size if that
 * is larger (a driver may not build a longer chain; virtio-net needs ~20). */
#define TN_MAX_INDIRECT 1024

struct tn_region {
    uint64_t gpa;
    uint64_t size;
    uint64_t uva;
    uint8_t *host;
};

struct tn_mem {
    uint32_t nregions;
    struct tn_region regions[64];
    /* The dirty log while the VMM asks for one (LOG_ALL acked, SET_LOG_BASE
     * mapped), else NULL: every write into guest memory is then marked. */
    struct tn_log *log;
};

struct tn_vq {
    uint8_t *desc;
    uint8_t *avail;
    uint8_t *used;
    uint16_t size;
    uint16_t last_avail;      /* next avail ring slot to pop */
    uint16_t used_idx;        /* next used slot (shadow of used->idx) */
    uint16_t signalled_used;  /* used idx when the guest was last notified */
    uint8_t signalled_valid;
    uint8_t event_idx;
    uint8_t indirect;
    uint8_t broken;
    int32_t error;            /* TN_E_* of the first rule broken */
    uint64_t error_detail;    /* descriptor index or address involved */
    /* RX: the last gather found too little room while last_avail was
     * short_from, having looked at the avail ring up to short_at.  Until
     * last_avail moves, only buffers past short_at are news (a wake-up check
     * that counted the ones already found too small would spin). */
    uint16_t short_from;
    uint16_t short_at;
    uint8_t short_valid;
    /* Dirty logging: the memory table whose log to mark (set by tn_vq_setup),
     * and the guest address the used ring is logged at (its own, or the
     * SET_VRING_ADDR log address with VHOST_VRING_F_LOG). */
    const struct tn_mem *mem;
    uint64_t used_log;
};

/* One popped chain as a flat iovec list (readable first, then writable). */
struct tn_chain {
    uint16_t head;
    uint16_t nread;           /* iovecs [0, nread) are device-readable */
    uint16_t nwrite;          /* iovecs [nread, nread+nwrite) are device-writable */
    uint32_t read_len;
    uint32_t write_len;
    struct iovec iov[1024];
};

/* Scratch space a queue pair owns for the batched paths (no sharing). */
struct tn_scratch {
    struct iovec iov[1024];
    uint16_t heads[256];
    uint32_t caps[256];
    uint8_t frame[65562];
    uint32_t frame_len;
    uint8_t frame_pending;    /* tap RX: a frame read but not yet delivered */
};

/* The driver's receive filter (control queue RX and MAC classes).  A frame
 * from the host side that fails it is dropped (counted as filtered). */
struct tn_rxfilter {
    uint8_t promisc, allmulti, alluni, nomulti, nouni, nobcast;
    uint8_t has_mac;
    uint8_t mac[6];
    uint32_t nuni;
    uint32_t nmulti;
    uint8_t uni[64][6];
    uint8_t multi[64][6];
};

/* What a batch did.  Python adds these into the pair's counters once a batch. */
struct tn_batch {
    uint32_t packets;
    uint64_t bytes;
    uint32_t drops_no_buffer;  /* RX ring had no room (loop backend) */
    uint32_t drops_bad_frame;  /* too short / too long / rejected by the fd */
    uint32_t drops_io;         /* other I/O errors on the fd */
    uint32_t drops_filtered;   /* refused by the driver's receive filter */
    int32_t last_errno;
    uint8_t fd_blocked;        /* the fd said EAGAIN */
    uint8_t ring_empty;        /* no more available chains */
    uint8_t ring_full;         /* RX: not enough room for the next frame */
};

const char *tn_strerror(int code);

/* guest memory */
void *tn_mmap(int fd, uint64_t size, uint64_t offset);
int tn_munmap(void *addr, uint64_t size);
uint8_t *tn_mem_gpa(const struct tn_mem *m, uint64_t gpa, uint64_t len);
uint8_t *tn_mem_uva(const struct tn_mem *m, uint64_t uva, uint64_t len);
int tn_mem_uva_to_gpa(const struct tn_mem *m, uint64_t uva, uint64_t *gpa);
int tn_mem_read(const struct tn_mem *m, uint64_t gpa, void *dst, uint64_t len);
int tn_mem_write(const struct tn_mem *m, uint64_t gpa, const void *src, uint64_t len);

/* ring primitives */
int tn_vq_setup(struct tn_vq *vq, const struct tn_mem *m, uint16_t size,
                uint64_t desc_gpa, uint64_t avail_gpa, uint64_t used_gpa);
uint16_t tn_vq_avail_idx(struct tn_vq *vq);
int tn_vq_pending(struct tn_vq *vq);
int tn_vq_pop(struct tn_vq *vq, const struct tn_mem *m, int dir, struct tn_chain *c);
int tn_vq_pop_iov(struct tn_vq *vq, const struct tn_mem *m, int dir, struct iovec *iov,
                  uint32_t max_iov, uint32_t *niov, uint32_t *nread, uint32_t *read_len,
                  uint32_t *write_len, uint16_t *head);
void tn_vq_rewind(struct tn_vq *vq, uint16_t n);
/* Pop up to max chains (each walked and checked) and give them back unused
 * (length 0), publishing once: a ring that may not carry traffic.  Nothing is
 * copied.  Returns chains discarded or TN_E_*. */
int tn_vq_discard(struct tn_vq *vq, const struct tn_mem *m, int dir, uint32_t max);
void tn_vq_push(struct tn_vq *vq, uint16_t head, uint32_t len);
/* Store the used index.  While the dirty log is on, first mark every page the
 * entries pushed since the last publish wrote (each chain's first len
 * writable bytes, and the used entries), then the index: all writes into
 * guest memory end here, whatever path laid the data. */
void tn_vq_publish(struct tn_vq *vq);
int tn_vq_needs_notify(struct tn_vq *vq);
/* Ask the driver to kick when it makes buffers available; 1 when some are
 * already there that nobody looked at yet (on an RX ring whose last gather
 * was short: past those it looked at, see short_at). */
int tn_vq_enable_notify(struct tn_vq *vq);
void tn_vq_disable_notify(struct tn_vq *vq);
uint16_t tn_vq_used_idx_in_ring(struct tn_vq *vq);
/* Busy-wait up to ns nanoseconds for the driver to make buffers available
 * (1: some are, 0: none came; news in tn_vq_enable_notify's sense).  Saves a
 * sleep/wake round trip under load. */
int tn_vq_spin(struct tn_vq *vq, uint32_t ns);
void tn_vq_fail(struct tn_vq *vq, int code, uint64_t detail);

/* copies between a chain and flat memory */
uint32_t tn_iov_to_buf(const struct iovec *iov, uint32_t n, uint8_t *dst, uint32_t cap);
uint32_t tn_buf_to_iov(const struct iovec *iov, uint32_t n, const uint8_t *src, uint32_t len);

/* RX building blocks of the batched paths: pop writable chains into s->iov
 * (s->heads, s->caps) until their room reaches need (without MRG_RXBUF: one
 * chain); 0 when there is not enough room (nothing kept; how far it looked is
 * recorded in short_from / short_at).  Then complete a
 * frame of len bytes laid into them: push the chains it used (num_buffers set
 * when hdr_len >= 12), rewind the rest.  Neither publishes. */
int tn_rx_gather(struct tn_vq *vq, const struct tn_mem *m, int mrg, uint32_t need,
                 struct tn_scratch *s, uint32_t *niov, uint64_t *room);
void tn_rx_finish(struct tn_vq *vq, int nchains, uint32_t len, uint32_t hdr_len,
                  struct tn_scratch *s, uint32_t niov);
/* The same from chain0 and iov0 of s, for several frames gathered before
 * any is finished (the chains a frame does not use must be the last ones
 * popped: only then is rewinding them right). */
int tn_rx_gather_at(struct tn_vq *vq, const struct tn_mem *m, int mrg, uint32_t need,
                    struct tn_scratch *s, uint32_t chain0, uint32_t iov0, uint32_t *niov,
                    uint64_t *room);
void tn_rx_finish_at(struct tn_vq *vq, int nchains, uint32_t len, uint32_t hdr_len,
                     struct tn_scratch *s, uint32_t chain0, uint32_t iov0, uint32_t niov);

/* batched paths: each pops up to max chains, moves the data, fills the used
 * ring and publishes it once.  Returns chains completed (>= 0) or TN_E_*. */
int tn_rx_fill(struct tn_vq *vq, const struct tn_mem *m, int mrg, uint32_t hdr_len,
               const uint8_t *frame, uint32_t len, uint32_t max, struct tn_scratch *s,
               struct tn_batch *b);
int tn_tx_to_fd(struct tn_vq *vq, const struct tn_mem *m, int fd, uint32_t hdr_len,
                uint32_t max, struct tn_batch *b, struct tn_flows *flows, uint8_t pair);
int tn_rx_from_fd(struct tn_vq *vq, const struct tn_mem *m, int fd, int mrg, uint32_t hdr_len,
                  uint32_t need, uint32_t max, struct tn_scratch *s, struct tn_batch *b,
                  const struct tn_rxfilter *filter);
/* Does the filter let a frame with this destination MAC through? (NULL: yes) */
int tn_rxfilter_accepts(const struct tn_rxfilter *f, const uint8_t *dst);
int tn_loop_batch(struct tn_vq *tx, struct tn_vq *rx, const struct tn_mem *m, int mrg,
                  uint32_t hdr_len, uint32_t max, struct tn_scratch *s, struct tn_batch *tb,
                  struct tn_batch *rb, struct tn_flows *flows, uint8_t pair);
