/* The user-mode stack's native UDP fast path (read by cffi as the cdef).
 *
 * Python creates each UDP flow (a connected, non-blocking host socket) and
 * registers it here with the headers of its host->guest frames and the key
 * the guest's frames for it carry.  From then on tn_user_tx / tn_user_rx move
 * its datagrams both ways between the virtio rings and the socket, a batch
 * per call; every other frame the guest sends is handed to Python whole in a
 * struct tn_slow.
 *
 * Flows live in a fixed table of TN_UFLOW_MAX slots with an open-addressing
 * index over their keys.  Each flow's socket sits in the epoll set of the
 * queue pair its replies go to (the pair the guest last sent it on), so a
 * pair's RX task waits on one fd: epfd[pair].
 *
 * Threads: with --threads each pair's worker runs tn_user_tx / tn_user_rx on
 * its own thread while Python (one thread) adds, removes and moves flows.  The
 * table's lock (a writer-preferring rwlock) is held for reading by every batch
 * and for writing by tn_uflow_add / _del / _move, so the index never changes
 * under a lookup and no flow goes away under a batch.  A batch that moves a
 * flow to its pair takes a mutex besides (two pairs may race for one flow);
 * the attention list has its own mutex.  Flow counters, spoke and last_active
 * are plain stores (a lost update costs a statistic); table-wide counters are
 * added atomically, once per batch or event. */
#pragma once
#include <stdint.h>

struct tn_vq;
struct tn_mem;
struct tn_scratch;
struct tn_batch;

#define TN_UFLOW_MAX 4096
#define TN_UFLOW_INDEX 8192
#define TN_UFLOW_PAIRS 16
#define TN_UATTENTION_MAX 64
#define TN_SLOW_FRAMES 256
#define TN_SLOW_BYTES 1048576

/* tn_uflow_add's errors besides -errno (negative: the cdef skips them) */
#define TN_UFLOW_E_FULL -1
#define TN_UFLOW_E_EXISTS -2

/* struct tn_uflow.spoke bits */
#define TN_UFLOW_GUEST_SPOKE 1
#define TN_UFLOW_HOST_SPOKE 2

/* One UDP flow.  Python fills it for tn_uflow_add; C keeps its copy in the
 * table and updates pair, spoke, err, last_active and the counters.
 * tx_* count the guest's datagrams (guest TX), rx_* the host side's. */
struct tn_uflow {
    int32_t fd;               /* connected UDP socket (non-blocking) */
    uint8_t v6;
    uint8_t pair;             /* RX ring its datagrams go to: pair of the guest's last frame */
    uint8_t spoke;            /* bit0: the guest sent, bit1: the host side sent */
    uint8_t err;              /* C saw EPOLLERR / a socket error: Python reads the error queue */
    uint8_t live;             /* set by tn_uflow_add, cleared by tn_uflow_del */
    uint8_t pad;
    uint16_t tmpl_len;        /* 42 (v4: eth+ip+udp) or 62 (v6) */
    uint8_t tmpl[62];         /* host->guest headers; C fills lengths, IPv4 id/csum, UDP csum */
    uint8_t gsrc[16];         /* key: the guest frame's IP source / destination */
    uint8_t gdst[16];         /* (IPv4 in the first 4 bytes, the rest zero) */
    uint16_t gsport, gdport;  /* the guest frame's UDP ports, host order */
    uint64_t last_active;     /* tn_flow_now() seconds of the last datagram either way */
    uint64_t tx_packets, tx_bytes, rx_packets, rx_bytes;  /* payload bytes */
};

struct tn_ttable;
struct tn_tcpc;

struct tn_utable {
    void *lock;               /* the locks (tn_utable_init allocates them) */
    uint32_t count;           /* live flows */
    uint32_t nfree;
    uint16_t ipv4_id[16];     /* next IPv4 id of a host->guest datagram, per pair */
    uint8_t attention_overflow;  /* more flows had errors than attention[] holds */
    uint32_t nattention;
    int32_t attention[64];    /* slots whose err C set since Python last looked */
    int32_t epfd[16];         /* one epoll set per queue pair (-1: none) */
    /* guest TX */
    uint64_t tx_fast;         /* datagrams sent on a flow's socket */
    uint64_t tx_slow;         /* frames handed to Python */
    uint64_t tx_bad_csum;     /* IPv4 header or UDP checksum wrong: dropped */
    uint64_t tx_dropped;      /* the socket would block (or failed): dropped */
    /* guest RX */
    uint64_t rx_fast;         /* datagrams laid into an RX ring */
    uint64_t rx_dropped;      /* larger than the guest's buffers can ever hold: dropped */
    uint64_t sock_errors;     /* socket errors either way (the flow is marked err) */
    uint64_t epoll_errors;    /* epoll_ctl failed moving a flow */
    struct tn_ttable *tcp;    /* TCP connections for the TX fast path (usertcp.h), or NULL */
    int16_t index[8192];      /* key hash -> slot (-1: empty), linear probing */
    uint16_t free_slots[4096];
    struct tn_uflow flows[4096];
};

/* Frames of the guest Python handles: whole Ethernet frames (no virtio-net
 * header), with the pair they came on and their virtio-net header's flags. */
struct tn_slow {
    uint32_t n;               /* frames held */
    uint32_t used;            /* bytes of data used */
    uint8_t full;             /* a batch stopped because the next frame did not fit */
    uint32_t off[256];
    uint32_t len[256];
    uint8_t pair[256];
    uint8_t flags[256];
    uint8_t data[1048576];
};

void tn_slow_reset(struct tn_slow *s);

/* Ones'-complement sum of len bytes as big-endian 16-bit words (an odd last
 * byte padded with zero), folded, not complemented: 0 only for all-zero data.
 * The Python stack's checksums over payloads (TCP segments) use it. */
uint16_t tn_sum16(const uint8_t *p, size_t len);

/* 0 or -errno (epoll_create1, or -ENOMEM).  Zeroes the table. */
int tn_utable_init(struct tn_utable *t);
/* Closes the epoll sets and frees the locks (no batch may run any more); the
 * flows' sockets are Python's. */
void tn_utable_close(struct tn_utable *t);
/* Register a flow (f->pair is its first RX pair).  Returns its slot, or
 * TN_UFLOW_E_FULL, TN_UFLOW_E_EXISTS (key registered), -EINVAL (template
 * length, pair or fd wrong), -errno from epoll_ctl. */
int tn_uflow_add(struct tn_utable *t, const struct tn_uflow *f);
/* Out of the index and its epoll set (Python closes the fd afterwards). */
void tn_uflow_del(struct tn_utable *t, int slot);
/* Re-home a flow's replies onto pair's epoll set.  0 or -errno / -EINVAL. */
int tn_uflow_move(struct tn_utable *t, int slot, uint8_t pair);
/* Host data of a TCP connection (usertcp.h, push allowed) pushed from C: its
 * socket joins pair's epoll set (edge-triggered), and tn_user_rx of that pair
 * hands each arrival to tn_tcp_ready.  Called again on the same pair it re-arms
 * (an edge at once if data waits: what came while Python held it); on
 * another pair it moves.  0 or -errno. */
int tn_utable_tcp_watch(struct tn_utable *t, struct tn_tcpc *c, uint8_t pair);
/* Out of the epoll set, before the socket is closed (no batch holds c after). */
void tn_utable_tcp_unwatch(struct tn_utable *t, struct tn_tcpc *c);
/* Slot of a key (addresses: 4 bytes for IPv4, 16 for IPv6), or -1. */
int tn_uflow_find(struct tn_utable *t, int v6, const uint8_t *src, const uint8_t *dst,
                  uint16_t sport, uint16_t dport);
/* Set spoke bits of a live flow (atomically: workers set them too). */
void tn_uflow_spoke(struct tn_utable *t, int slot, uint8_t bits);
/* Take the attention list: up to TN_UATTENTION_MAX slots into out; returns
 * how many, and *overflow = 1 when more flows had errors than it held (the
 * caller then scans every live flow's err).  The list is empty afterwards. */
uint32_t tn_uattention_take(struct tn_utable *t, int32_t *out, uint8_t *overflow);

/* Guest TX of queue pair `pair`: pops up to max chains of vq.  A well-formed
 * UDP frame (IPv4 without options or fragments, or IPv6 with UDP as next
 * header; TTL/hop limit > 0; no GSO) of a registered flow is checked (IPv4
 * header checksum; UDP checksum unless the header has NEEDS_CSUM) and its
 * payload sent on the flow's socket straight from the descriptors; the flow
 * moves to `pair`.  Bad checksums are dropped (b->drops_bad_frame), sends
 * that would block are dropped (b->drops_io).  Every other frame goes to
 * slow; when slow has no room the batch stops before that chain (slow->full).
 * b->packets/bytes count the frames taken (sent or handed to slow).  Returns
 * chains completed, or a negative TN_E_* ring error. */
int tn_user_tx(struct tn_vq *vq, const struct tn_mem *m, uint32_t hdr_len, uint32_t max,
               struct tn_utable *t, uint8_t pair, struct tn_slow *slow, struct tn_batch *b);
/* Guest RX of queue pair `pair`: datagrams of the flows in epfd[pair] are read
 * straight into the RX ring after room for the virtio-net header and the
 * flow's template, then the headers are written (flags DATA_VALID when
 * data_valid; num_buffers when hdr_len >= 12).  Frames under 60 bytes are
 * padded.  b->ring_full: the next datagram did not fit and stays in its
 * socket; b->fd_blocked: nothing more to read.  Socket errors mark the flow
 * (err, attention[]).  Returns datagrams delivered or a negative TN_E_*. */
int tn_user_rx(struct tn_vq *vq, const struct tn_mem *m, int mrg, uint32_t hdr_len,
               int data_valid, struct tn_utable *t, uint8_t pair, uint32_t max,
               struct tn_scratch *s, struct tn_batch *b);
