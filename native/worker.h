/* A queue pair's worker loop, run on its own thread with the GIL released
 * (read by cffi as cdef).  The pair's Trio task starts it, stops it by
 * writing stop_fd, and joins it; it returns 0 when stopped, or a TN_E_* ring
 * error (error_ring says which ring) for Python to report. */
#pragma once
#include <stdint.h>

struct tn_vq;
struct tn_mem;
struct tn_scratch;
struct tn_flows;
struct tn_rxfilter;

/* Counters a pair keeps for its whole life (Python reads them for status). */
struct tn_pair_stats {
    uint64_t tx_packets;
    uint64_t tx_bytes;
    uint64_t rx_packets;
    uint64_t rx_bytes;
    uint64_t kicks;
    uint64_t notifications;
    uint64_t drops_rx_no_buffer;
    uint64_t drops_tx_bad_frame;
    uint64_t drops_rx_bad_frame;
    uint64_t drops_tx_io;
    uint64_t drops_rx_io;
    uint64_t drops_rx_filtered;
    uint64_t batches;
};

struct tn_pair_io {
    struct tn_vq *tx;          /* NULL: TX not served */
    struct tn_vq *rx;          /* NULL: no RX (disabled / inactive / broken) */
    const struct tn_mem *mem;
    struct tn_scratch *scratch;
    struct tn_flows *flows;
    struct tn_pair_stats *stats;
    const struct tn_rxfilter *filter;  /* NULL: accept every frame */
    const uint8_t *gen;        /* loop backend: frame (header included) to keep RX full of */
    int tx_kick;               /* -1: none (polled) */
    int rx_kick;
    int tx_call;               /* -1: no interrupts */
    int rx_call;
    int tap_fd;                /* -1: loop backend */
    int stop_fd;
    uint32_t hdr_len;
    uint32_t need;             /* RX room before taking a frame from the tap */
    uint32_t batch;
    uint32_t gen_len;
    uint32_t spin_ns;          /* busy-wait this long for more TX before sleeping */
    uint8_t pair;
    uint8_t mrg;
    uint8_t error_ring;        /* 0: tx, 1: rx */
    int32_t error;
};

int tn_pair_run(struct tn_pair_io *io);
