/* Private to the native TCP paths (usertcp.c: the connection and its data
 * entries; usertcp_table.c: the connection table; usertcp_tx.c: the guest
 * TX fast path; usertcp_push.c: native ACKs and pushes towards the guest):
 * the structures behind usertcp.h's opaque types, the table's lookup
 * (static inline: the TX path looks up every TCP frame), and the helpers
 * the files share.  cffi reads only the headers directly in native/, not
 * this one. */
#pragma once
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>

#include "../usertcp.h"

#define ETH_LEN 14
#define V4_LEN 20
#define V6_LEN 40
#define TCP_LEN 20
#define MIN_FRAME 60
#define VNET_HDR_MAX 64

struct tn_tcpc {
    pthread_mutex_t lock;
    int fd;                       /* -1 once closed */
    uint32_t refs;                /* Python's own, plus one per queued entry */
    uint32_t una;                 /* sequence number of the receive queue's head */
    uint32_t pos;                 /* the kernel's peek offset, as set and moved */
    int peek_off;                 /* SO_PEEK_OFF works on this socket */
    uint32_t tmpl_len;
    uint8_t tmpl[TN_TCPC_TMPL_MAX];
    /* the TX fast path (under lock) */
    uint8_t fast;                 /* Python lets it take this connection's frames */
    uint8_t held;                 /* Python has it (between pause and resume) */
    int8_t ep_pair;               /* the pair whose epoll set watches fd (-1: none; Python's) */
    uint8_t pair;                 /* of the last frame it took */
    uint32_t rcv_nxt, snd_una;
    uint16_t window_field;
    /* native ACKs (under lock): allowed by Python, and what they said */
    uint8_t ack, ws, owed, acks, took;
    uint32_t snd_nxt, mss, acked, rcv_edge;
    uint32_t seg;                 /* payload per frame: mss, or more for a TSO guest */
    uint16_t our_field;           /* the window field last advertised (Python's, or a native ACK's) */
    /* guest ACKs and host data (under lock): allowed by Python (push) */
    uint8_t data, push, ws_from, moved, ack_owed, push_owed, timer;
    uint32_t max_snd_wnd;
    /* the table (under the table's locks) */
    uint8_t indexed, listed, gone, v6;  /* gone: deleted, never listed again */
    uint8_t src[16], dst[16];
    uint16_t sport, dport;
};

#define TT_SLOTS 32768            /* open addressing, at most a quarter full */
#define TT_MAX 8192
#define TT_LIST TT_MAX            /* every connection fits: listing never fails */
#define TT_MASK (TT_SLOTS - 1)
#define TN_TCP_PAIRS 16

struct tn_ttable {
    pthread_rwlock_t index_lock;  /* lookups (TX batches) read; Python's add/del write */
    pthread_mutex_t list_lock;
    uint32_t n;
    uint32_t nlisted;
    uint8_t signal;               /* listed since the worker last signalled */
    uint64_t fast_frames, fast_bytes, fast_sends, fast_partial, native_acks, acks_to_python;
    uint64_t guest_acks, push_segments, host_ready;
    struct tn_uoutq *out[TN_TCP_PAIRS];
    struct tn_tcpc *list[TT_LIST];
    struct tn_tcpc *slot[TT_SLOTS];
};

struct tn_tcp_entry {
    struct tn_tcpc *c;
    uint32_t seq, ack, len;
    uint16_t window;
    uint16_t gso;         /* len > gso > 0: one GSO frame of gso-byte segments */
    uint8_t flags;
};

/* ---- shared between the files ---------------------------------------------------- */

/* usertcp.c: drop a reference to c (the last one frees it). */
void tn_tcpc_unref(struct tn_tcpc *c);
/* usertcp.c: tn_tcpc_avail and tn_tcpc_consume with c locked and its fd open. */
int64_t tn_tcpc_avail_locked(struct tn_tcpc *c, uint32_t offset);
int64_t tn_tcpc_consume_locked(struct tn_tcpc *c, uint32_t n);
/* usertcp.c: fill a frame's headers (hb: a copy of the template, tl bytes)
 * for len payload bytes at seq summing to psum. */
void tn_tcp_headers(const struct tn_tcp_entry *e, uint8_t *hb, uint32_t tl, uint32_t seq,
                    uint32_t len, uint64_t psum);
/* usertcp_table.c: list c for Python (c locked). */
void tn_ttable_list_for_ack(struct tn_ttable *t, struct tn_tcpc *c);

/* ---- the connection table's lookup (usertcp_table.c, usertcp_tx.c) --------------- */

static inline uint32_t key_hash(int v6, const uint8_t *src, const uint8_t *dst, uint16_t sport,
                                uint16_t dport)
{
    uint32_t h = 2166136261u ^ (uint32_t)v6;
    uint32_t alen = v6 ? 16 : 4;
    for (uint32_t i = 0; i < alen; i++)
        h = (h ^ src[i]) * 16777619u;
    for (uint32_t i = 0; i < alen; i++)
        h = (h ^ dst[i]) * 16777619u;
    h = (h ^ sport) * 16777619u;
    h = (h ^ dport) * 16777619u;
    return h ^ (h >> 15);
}

static inline int key_eq(const struct tn_tcpc *c, int v6, const uint8_t *src, const uint8_t *dst,
                         uint16_t sport, uint16_t dport)
{
    uint32_t alen = v6 ? 16 : 4;
    return c->v6 == v6 && c->sport == sport && c->dport == dport &&
           memcmp(c->src, src, alen) == 0 && memcmp(c->dst, dst, alen) == 0;
}

static inline int find_slot(const struct tn_ttable *t, int v6, const uint8_t *src,
                            const uint8_t *dst, uint16_t sport, uint16_t dport)
{
    uint32_t i = key_hash(v6, src, dst, sport, dport) & TT_MASK;
    for (uint32_t probes = 0; probes < TT_SLOTS; probes++, i = (i + 1) & TT_MASK) {
        const struct tn_tcpc *c = t->slot[i];
        if (c == NULL)
            return -1;
        if (key_eq(c, v6, src, dst, sport, dport))
            return (int)i;
    }
    return -1;
}
