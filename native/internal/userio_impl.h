/* Private to the user stack's native UDP fast path (userio.c: the flow
 * table; userio_tx.c: guest TX; userio_rx.c: guest RX): their shared
 * constants, the table's lookup and locks (static inline: every frame and
 * batch uses them), and the table's helpers the paths call.  cffi reads
 * only the headers directly in native/, not this one. */
#pragma once
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#include "../netsum.h"
#include "../userio.h"

#define DIR_READ 0
#define DIR_WRITE 1
#define VNET_HDR_MAX 64           /* larger virtio-net headers: every frame goes to slow */
#define ETH_LEN 14
#define V4_LEN 20
#define V6_LEN 40
#define UDP_LEN 8
#define HDRS_MAX (ETH_LEN + V6_LEN + UDP_LEN)
#define TX_HDRS_MAX (ETH_LEN + V6_LEN + 20)  /* and TCP's: tn_tcp_tx_join parses the copy TX made */
#define INDEX_MASK (TN_UFLOW_INDEX - 1)

static inline uint16_t be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline void put_be16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static inline uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

/* Sum of the UDP pseudo-header (addresses from the IP header ip). */
static inline uint64_t sum_pseudo(const uint8_t *ip, int v6, uint16_t ulen)
{
    uint8_t tail[4] = {0, 17, (uint8_t)(ulen >> 8), (uint8_t)ulen};
    uint64_t acc = v6 ? ns_sum_le(ip + 8, 32, 0) : ns_sum_le(ip + 12, 8, 0);
    return ns_sum_le(tail, 4, acc);
}

/* ---- flow table ------------------------------------------------------------ */

static inline uint32_t mix(uint32_t h, uint32_t v)
{
    h ^= v;
    h *= 0x9e3779b1u;
    return h ^ (h >> 15);
}

static inline uint32_t key_hash(int v6, const uint8_t *src, const uint8_t *dst, uint16_t sport,
                                uint16_t dport)
{
    uint32_t h = 0x811c9dc5u ^ (uint32_t)(v6 != 0);
    for (int i = 0; i < (v6 ? 16 : 4); i += 4)
        h = mix(mix(h, rd32(src + i)), rd32(dst + i));
    h = mix(h, (uint32_t)sport << 16 | dport);
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    return h ^ (h >> 13);
}

static inline int key_eq(const struct tn_uflow *f, int v6, const uint8_t *src, const uint8_t *dst,
                         uint16_t sport, uint16_t dport)
{
    size_t n = v6 ? 16 : 4;
    return f->v6 == (v6 != 0) && f->gsport == sport && f->gdport == dport &&
           memcmp(f->gsrc, src, n) == 0 && memcmp(f->gdst, dst, n) == 0;
}

static inline int valid_slot(const struct tn_utable *t, int slot)
{
    return slot >= 0 && slot < TN_UFLOW_MAX && t->flows[slot].live;
}

/* ---- locks: see userio.h ---------------------------------------------------- */

struct locks {
    pthread_rwlock_t index;   /* read: a batch; write: add / del / move from Python */
    pthread_mutex_t move;     /* a batch moving a flow to its pair */
    pthread_mutex_t attention;
};

static inline struct locks *locks(const struct tn_utable *t) { return t->lock; }
static inline void read_lock(struct tn_utable *t) { pthread_rwlock_rdlock(&locks(t)->index); }
static inline void write_lock(struct tn_utable *t) { pthread_rwlock_wrlock(&locks(t)->index); }
static inline void unlock(struct tn_utable *t) { pthread_rwlock_unlock(&locks(t)->index); }
static inline void count(uint64_t *counter, uint64_t n) { __atomic_fetch_add(counter, n, __ATOMIC_RELAXED); }

static inline int find(const struct tn_utable *t, int v6, const uint8_t *src, const uint8_t *dst,
                       uint16_t sport, uint16_t dport)
{
    uint32_t pos = key_hash(v6, src, dst, sport, dport) & INDEX_MASK;
    for (int i = 0; i < TN_UFLOW_INDEX; i++) {
        int s = t->index[pos];
        if (s < 0)
            return -1;
        if (key_eq(&t->flows[s], v6, src, dst, sport, dport))
            return s;
        pos = (pos + 1) & INDEX_MASK;
    }
    return -1;
}

/* Set spoke bits: atomically, since another pair's batch or Python may set
 * the other bit at the same time (a plain load first: mostly they are set). */
static inline void spoke(struct tn_uflow *f, uint8_t bits)
{
    if ((__atomic_load_n(&f->spoke, __ATOMIC_RELAXED) & bits) != bits)
        __atomic_fetch_or(&f->spoke, bits, __ATOMIC_RELAXED);
}

/* An epoll set's entries: a UDP flow's slot, or a TCP connection tagged. */
#define EV_TCP (1ull << 63)

/* ---- shared between the files ---------------------------------------------- */

/* userio.c: re-home a live flow onto pair's epoll set (the caller holds the
 * write lock, or the read lock and the move mutex). */
int tn_uflow_move_locked(struct tn_utable *t, int slot, uint8_t pair);
/* userio.c: a socket error: Python reads the flow's error queue. */
void tn_uflow_flag_err(struct tn_utable *t, int slot);
