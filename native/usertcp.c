/* TCP data towards the guest, peeked from the socket into the guest's
 * buffers: see usertcp.h. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "netsum.h"
#include "virtq.h"
#include "userpair.h"
#include "usertcp.h"

#ifndef SO_PEEK_OFF
#define SO_PEEK_OFF 42
#endif
#ifndef SO_MEMINFO
#define SO_MEMINFO 55
#endif
#define SK_MEMINFO_SNDBUF 3
#define SK_MEMINFO_WMEM_QUEUED 5
#define SK_MEMINFO_VARS 9
#ifndef SIOCOUTQ
#define SIOCOUTQ 0x5411           /* TIOCOUTQ */
#endif
#ifndef SIOCINQ
#define SIOCINQ 0x541B            /* FIONREAD */
#endif
#define VNET_F_DATA_VALID 2
#define ETH_LEN 14
#define V4_LEN 20
#define V6_LEN 40
#define TCP_LEN 20
#define MIN_FRAME 60
#define VNET_HDR_MAX 64
#define DISCARD_MAX (1u << 24)    /* the fallback's peek skips at most this (16 MiB) */
#define MAX_IOV 1024

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
#define VNET_F_NEEDS_CSUM 1
#define TN_TCP_PAIRS 16
#define TCP_ACK 0x10

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
    uint8_t flags;
};

static struct tn_tcpc_stats stats;

static void count(uint64_t *counter) { __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED); }

void tn_tcpc_stats_get(struct tn_tcpc_stats *out)
{
    out->laid = __atomic_load_n(&stats.laid, __ATOMIC_RELAXED);
    out->stale = __atomic_load_n(&stats.stale, __ATOMIC_RELAXED);
    out->trimmed = __atomic_load_n(&stats.trimmed, __ATOMIC_RELAXED);
    out->short_peeks = __atomic_load_n(&stats.short_peeks, __ATOMIC_RELAXED);
    out->peek_errors = __atomic_load_n(&stats.peek_errors, __ATOMIC_RELAXED);
}

/* ---- the connection ------------------------------------------------------------ */

struct tn_tcpc *tn_tcpc_new(int fd, const uint8_t *tmpl, uint32_t tmpl_len, uint32_t una,
                            int no_peek_off)
{
    if (tmpl_len != ETH_LEN + V4_LEN + TCP_LEN && tmpl_len != ETH_LEN + V6_LEN + TCP_LEN)
        return NULL;
    struct tn_tcpc *c = calloc(1, sizeof(*c));
    if (c == NULL)
        return NULL;
    pthread_mutex_init(&c->lock, NULL);
    c->fd = fd;
    c->ep_pair = -1;
    c->refs = 1;
    c->una = una;
    c->tmpl_len = tmpl_len;
    memcpy(c->tmpl, tmpl, tmpl_len);
    int zero = 0;
    c->peek_off = !no_peek_off && setsockopt(fd, SOL_SOCKET, SO_PEEK_OFF, &zero, sizeof(zero)) == 0;
    return c;
}

static void unref(struct tn_tcpc *c)
{
    if (__atomic_sub_fetch(&c->refs, 1, __ATOMIC_ACQ_REL) == 0) {
        pthread_mutex_destroy(&c->lock);
        free(c);
    }
}

void tn_tcpc_close(struct tn_tcpc *c)
{
    pthread_mutex_lock(&c->lock);
    c->fd = -1;
    pthread_mutex_unlock(&c->lock);
    unref(c);
}

int tn_tcpc_peek_off(const struct tn_tcpc *c) { return c->peek_off; }

static uint8_t *discard;
static pthread_once_t discard_once = PTHREAD_ONCE_INIT;

static void discard_init(void)
{
    void *p = mmap(NULL, DISCARD_MAX, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    discard = p == MAP_FAILED ? NULL : p;
}

/* Where the fallback's skipped bytes go (shared: nobody reads them). */
static uint8_t *discard_buf(void)
{
    pthread_once(&discard_once, discard_init);
    return discard;
}

/* Peek into iov (n entries) at offset skip from the queue head (c locked):
 * bytes peeked, 0 at end of stream, or -errno (-EAGAIN: nothing there). */
static ssize_t peek_at(struct tn_tcpc *c, uint32_t skip, const struct iovec *iov, uint32_t n)
{
    struct msghdr mh;
    struct iovec v[MAX_IOV + 1];
    memset(&mh, 0, sizeof(mh));
    if (n > MAX_IOV)
        n = MAX_IOV;
    if (c->peek_off) {
        if (c->pos != skip) {
            int off = (int)skip;
            if (setsockopt(c->fd, SOL_SOCKET, SO_PEEK_OFF, &off, sizeof(off)) < 0)
                return -errno;
            c->pos = skip;
        }
        memcpy(v, iov, n * sizeof(*iov));
        mh.msg_iov = v;
        mh.msg_iovlen = n;
        ssize_t r = recvmsg(c->fd, &mh, MSG_PEEK | MSG_DONTWAIT);
        if (r < 0)
            return -errno;
        c->pos += (uint32_t)r;
        return r;
    }
    /* no SO_PEEK_OFF: peek from the head, the first skip bytes thrown away */
    uint8_t *sink = skip > 0 ? discard_buf() : NULL;
    if (skip > DISCARD_MAX || (skip > 0 && sink == NULL))
        return -E2BIG;
    uint32_t k = 0;
    if (skip > 0)
        v[k++] = (struct iovec){sink, skip};
    memcpy(v + k, iov, n * sizeof(*iov));
    mh.msg_iov = v;
    mh.msg_iovlen = n + k;
    ssize_t r = recvmsg(c->fd, &mh, MSG_PEEK | MSG_DONTWAIT);
    if (r < 0)
        return -errno;
    if (r > 0 && (size_t)r <= skip)
        return -EAGAIN;  /* nothing beyond the offset yet */
    return r > 0 ? r - (ssize_t)skip : 0;
}

/* tn_tcpc_avail with c locked and its fd open. */
static int64_t avail_locked(struct tn_tcpc *c, uint32_t offset)
{
    int inq = 0;
    if (ioctl(c->fd, SIOCINQ, &inq) < 0)
        return -errno;
    if (inq > 0 && (uint32_t)inq > offset)
        return (int64_t)((uint32_t)inq - offset);
    uint8_t one;
    struct iovec iov = {&one, 1};
    ssize_t r = peek_at(c, offset, &iov, 1);
    return r > 0 ? 1 : r == 0 ? -1 : r == -EAGAIN ? 0 : r;
}

int64_t tn_tcpc_avail(struct tn_tcpc *c, uint32_t offset)
{
    pthread_mutex_lock(&c->lock);
    int64_t rc = c->fd >= 0 ? avail_locked(c, offset) : -EBADF;
    pthread_mutex_unlock(&c->lock);
    return rc;
}

/* Drop n bytes from the receive queue's head (c locked, fd open). */
static int64_t consume_locked(struct tn_tcpc *c, uint32_t n)
{
    int64_t done = 0;
    while ((uint32_t)done < n) {
        ssize_t r = recv(c->fd, NULL, n - (uint32_t)done, MSG_TRUNC | MSG_DONTWAIT);
        if (r < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            if (done == 0)
                done = -errno;
            break;
        }
        if (r == 0)
            break;
        done += r;
    }
    if (done > 0) {
        c->una += (uint32_t)done;
        c->pos = c->pos > (uint32_t)done ? c->pos - (uint32_t)done : 0;  /* as the kernel does */
    }
    return done;
}

int64_t tn_tcpc_consume(struct tn_tcpc *c, uint32_t n)
{
    pthread_mutex_lock(&c->lock);
    int64_t done = c->fd >= 0 ? consume_locked(c, n) : -EBADF;
    pthread_mutex_unlock(&c->lock);
    return done;
}

/* ---- data entries ---------------------------------------------------------------- */

struct tn_tcp_entry *tn_tcp_entry_new(struct tn_tcpc *c, uint32_t seq, uint32_t ack,
                                      uint16_t window, uint8_t flags, uint32_t len)
{
    struct tn_tcp_entry *e = malloc(sizeof(*e));
    if (e == NULL)
        return NULL;
    __atomic_add_fetch(&c->refs, 1, __ATOMIC_RELAXED);
    *e = (struct tn_tcp_entry){c, seq, ack, len, window, flags};
    return e;
}

void tn_tcp_entry_free(struct tn_tcp_entry *e)
{
    unref(e->c);
    free(e);
}

/* Where the entry's bytes start now (c locked): 0 and *len narrowed when its
 * head was acknowledged meanwhile; -1 when all of it was, or c is closed. */
static int64_t entry_skip(struct tn_tcp_entry *e, uint32_t *seq, uint32_t *len)
{
    struct tn_tcpc *c = e->c;
    int32_t skip = (int32_t)(e->seq - c->una);
    *seq = e->seq;
    *len = e->len;
    if (c->fd < 0)
        return -1;
    if (skip < 0) {
        if ((uint32_t)-skip >= e->len)
            return -1;
        *seq -= (uint32_t)skip;  /* skip is negative: seq moves forward */
        *len -= (uint32_t)-skip;
        count(&stats.trimmed);
        skip = 0;
    }
    return skip;
}

/* Fill the headers (hb: tmpl_len bytes, a copy of the template) for len
 * payload bytes summing to psum. */
static void headers(const struct tn_tcp_entry *e, uint8_t *hb, uint32_t tl, uint32_t seq,
                    uint32_t len, uint64_t psum)
{
    uint8_t *ip = hb + ETH_LEN, *th;
    int v6 = tl == ETH_LEN + V6_LEN + TCP_LEN;
    uint32_t tcplen = TCP_LEN + len;
    uint64_t acc;
    if (v6) {
        ip[4] = (uint8_t)(tcplen >> 8);
        ip[5] = (uint8_t)tcplen;
        th = ip + V6_LEN;
        acc = ns_sum_le(ip + 8, 32, 0);
    } else {
        uint32_t tot = V4_LEN + tcplen;
        ip[2] = (uint8_t)(tot >> 8);
        ip[3] = (uint8_t)tot;
        ip[10] = ip[11] = 0;
        uint16_t ck = (uint16_t)~ns_fold(ns_sum_le(ip, V4_LEN, 0));
        memcpy(ip + 10, &ck, 2);
        th = ip + V4_LEN;
        acc = ns_sum_le(ip + 12, 8, 0);
    }
    uint8_t tail[4] = {0, 6, (uint8_t)(tcplen >> 8), (uint8_t)tcplen};
    acc = ns_sum_le(tail, 4, acc);
    uint32_t sq = __builtin_bswap32(seq), ak = __builtin_bswap32(e->ack);
    memcpy(th + 4, &sq, 4);
    memcpy(th + 8, &ak, 4);
    th[12] = (TCP_LEN / 4) << 4;
    th[13] = e->flags;
    th[14] = (uint8_t)(e->window >> 8);
    th[15] = (uint8_t)e->window;
    th[16] = th[17] = th[18] = th[19] = 0;
    acc = ns_sum_le(th, TCP_LEN, acc) + psum;
    uint16_t ck = (uint16_t)~ns_fold(acc);
    memcpy(th + 16, &ck, 2);
}

int tn_tcp_entry_lay(struct tn_tcp_entry *e, struct tn_vq *vq, const struct tn_mem *m, int mrg,
                     uint32_t hdr_len, int data_valid, struct tn_scratch *s, uint32_t *flen)
{
    struct tn_tcpc *c = e->c;
    uint32_t tl = c->tmpl_len, niov, seq, len;
    uint64_t room;
    if (hdr_len > VNET_HDR_MAX)
        return 2;
    uint32_t frame_max = tl + e->len > MIN_FRAME ? tl + e->len : MIN_FRAME;
    int n = tn_rx_gather(vq, m, mrg, hdr_len + frame_max, s, &niov, &room);
    if (n <= 0)
        return n;
    struct iovec piov[MAX_IOV];
    pthread_mutex_lock(&c->lock);
    int64_t skip = entry_skip(e, &seq, &len);
    ssize_t got = -1;
    if (skip >= 0) {
        uint32_t np = ns_iov_window(s->iov, niov, hdr_len + tl, len, piov, MAX_IOV);
        got = peek_at(c, (uint32_t)skip, piov, np);
    }
    pthread_mutex_unlock(&c->lock);
    if (got <= 0) {
        tn_vq_rewind(vq, (uint16_t)n);
        count(skip < 0 ? &stats.stale : &stats.peek_errors);
        return 2;
    }
    if ((uint32_t)got < len) {
        count(&stats.short_peeks);
        len = (uint32_t)got;
    }
    uint8_t hb[VNET_HDR_MAX + TN_TCPC_TMPL_MAX];
    memset(hb, 0, hdr_len);
    if (data_valid && hdr_len > 0)
        hb[0] = VNET_F_DATA_VALID;
    if (hdr_len >= 12)
        hb[10] = 1;  /* num_buffers: tn_rx_finish sets it for merged buffers */
    memcpy(hb + hdr_len, c->tmpl, tl);
    uint32_t np = ns_iov_window(s->iov, niov, hdr_len + tl, len, piov, MAX_IOV);
    headers(e, hb + hdr_len, tl, seq, len, ns_sum_iov(piov, np, len, 0));
    ns_iov_put(s->iov, niov, 0, hb, hdr_len + tl);
    uint32_t frame = tl + len;
    if (frame < MIN_FRAME) {
        static const uint8_t zeros[MIN_FRAME];
        ns_iov_put(s->iov, niov, hdr_len + frame, zeros, MIN_FRAME - frame);
        frame = MIN_FRAME;
    }
    tn_rx_finish(vq, n, hdr_len + frame, hdr_len, s, niov);
    tn_vq_publish(vq);
    count(&stats.laid);
    *flen = frame;
    return 1;
}

int tn_tcp_entry_flat(struct tn_tcp_entry *e, uint8_t *buf, uint32_t cap)
{
    struct tn_tcpc *c = e->c;
    uint32_t tl = c->tmpl_len, seq, len;
    if (cap < tl)
        return -1;
    pthread_mutex_lock(&c->lock);
    int64_t skip = entry_skip(e, &seq, &len);
    ssize_t got = -1;
    struct iovec iov = {buf + tl, len < cap - tl ? len : cap - tl};
    if (skip >= 0)
        got = peek_at(c, (uint32_t)skip, &iov, 1);
    pthread_mutex_unlock(&c->lock);
    if (got <= 0) {
        count(skip < 0 ? &stats.stale : &stats.peek_errors);
        return -1;
    }
    len = (uint32_t)got;
    memcpy(buf, c->tmpl, tl);
    headers(e, buf, tl, seq, len, ns_sum_le(buf + tl, len, 0));
    count(&stats.laid);
    return (int)(tl + len);
}

/* ---- guest → host: the connection table and the TX fast path ---------------------- */

struct tn_ttable *tn_ttable_new(void)
{
    struct tn_ttable *t = calloc(1, sizeof(*t));
    if (t == NULL)
        return NULL;
    pthread_rwlock_init(&t->index_lock, NULL);
    pthread_mutex_init(&t->list_lock, NULL);
    return t;
}

void tn_ttable_free(struct tn_ttable *t)
{
    pthread_rwlock_destroy(&t->index_lock);
    pthread_mutex_destroy(&t->list_lock);
    free(t);
}

static uint32_t key_hash(int v6, const uint8_t *src, const uint8_t *dst, uint16_t sport,
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

static int key_eq(const struct tn_tcpc *c, int v6, const uint8_t *src, const uint8_t *dst,
                  uint16_t sport, uint16_t dport)
{
    uint32_t alen = v6 ? 16 : 4;
    return c->v6 == v6 && c->sport == sport && c->dport == dport &&
           memcmp(c->src, src, alen) == 0 && memcmp(c->dst, dst, alen) == 0;
}

static int find_slot(const struct tn_ttable *t, int v6, const uint8_t *src, const uint8_t *dst,
                     uint16_t sport, uint16_t dport)
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

int tn_ttable_add(struct tn_ttable *t, struct tn_tcpc *c, int v6, const uint8_t *src,
                  const uint8_t *dst, uint16_t sport, uint16_t dport)
{
    uint32_t alen = v6 ? 16 : 4;
    int rc = 0;
    pthread_rwlock_wrlock(&t->index_lock);
    if (c->indexed || find_slot(t, v6, src, dst, sport, dport) >= 0) {
        rc = -EEXIST;
    } else if (t->n >= TT_MAX) {
        rc = -ENOSPC;
    } else {
        c->v6 = (uint8_t)(v6 != 0);
        memcpy(c->src, src, alen);
        memcpy(c->dst, dst, alen);
        c->sport = sport;
        c->dport = dport;
        uint32_t i = key_hash(v6, src, dst, sport, dport) & TT_MASK;
        while (t->slot[i] != NULL)
            i = (i + 1) & TT_MASK;
        t->slot[i] = c;
        __atomic_add_fetch(&c->refs, 1, __ATOMIC_RELAXED);  /* the table's own */
        c->indexed = 1;
        t->n++;
    }
    pthread_rwlock_unlock(&t->index_lock);
    return rc;
}

void tn_ttable_del(struct tn_ttable *t, struct tn_tcpc *c)
{
    pthread_rwlock_wrlock(&t->index_lock);
    int i = c->indexed ? find_slot(t, c->v6, c->src, c->dst, c->sport, c->dport) : -1;
    if (i >= 0) {
        /* backward-shift deletion: no tombstones for linear probing */
        uint32_t hole = (uint32_t)i, j = (uint32_t)i;
        t->slot[hole] = NULL;
        for (;;) {
            j = (j + 1) & TT_MASK;
            struct tn_tcpc *x = t->slot[j];
            if (x == NULL)
                break;
            uint32_t home = key_hash(x->v6, x->src, x->dst, x->sport, x->dport) & TT_MASK;
            /* x may fill the hole unless its home lies cyclically in (hole, j] */
            int stays = hole <= j ? (home > hole && home <= j) : (home > hole || home <= j);
            if (!stays) {
                t->slot[hole] = x;
                t->slot[j] = NULL;
                hole = j;
            }
        }
        c->indexed = 0;
        t->n--;
    }
    pthread_rwlock_unlock(&t->index_lock);
    pthread_mutex_lock(&t->list_lock);  /* never handed to Python after this */
    for (uint32_t k = 0; k < t->nlisted; k++) {
        if (t->list[k] == c) {
            t->list[k] = t->list[--t->nlisted];
            break;
        }
    }
    c->listed = 0;
    c->gone = 1;
    pthread_mutex_unlock(&t->list_lock);
    if (i >= 0)
        unref(c);
}

uint32_t tn_ttable_take(struct tn_ttable *t, struct tn_tcpc **out, uint32_t max)
{
    pthread_mutex_lock(&t->list_lock);
    uint32_t n = t->nlisted < max ? t->nlisted : max;
    for (uint32_t k = 0; k < n; k++) {
        out[k] = t->list[t->nlisted - 1 - k];
        out[k]->listed = 0;
    }
    t->nlisted -= n;
    pthread_mutex_unlock(&t->list_lock);
    return n;
}

uint64_t tn_ttable_fast_frames(const struct tn_ttable *t)
{
    return __atomic_load_n(&t->fast_frames, __ATOMIC_RELAXED);
}

uint64_t tn_ttable_fast_bytes(const struct tn_ttable *t)
{
    return __atomic_load_n(&t->fast_bytes, __ATOMIC_RELAXED);
}

int tn_ttable_should_signal(struct tn_ttable *t)
{
    if (t == NULL || !__atomic_load_n(&t->signal, __ATOMIC_RELAXED))
        return 0;
    return __atomic_exchange_n(&t->signal, 0, __ATOMIC_ACQ_REL);
}

void tn_tcpc_pause(struct tn_tcpc *c, struct tn_tcpc_sync *out)
{
    pthread_mutex_lock(&c->lock);
    c->fast = 0;
    c->held = 1;
    out->rcv_nxt = c->rcv_nxt;
    out->acked = c->acked;
    out->rcv_edge = c->rcv_edge;
    out->window = c->our_field;
    out->acks = c->acks;
    out->took = c->took;
    out->pair = c->pair;
    out->snd_una = c->snd_una;
    out->snd_nxt = c->snd_nxt;
    out->guest_window = c->window_field;
    out->moved = c->moved;
    c->acks = c->took = c->moved = 0;
    pthread_mutex_unlock(&c->lock);
}

void tn_tcpc_resume(struct tn_tcpc *c, const struct tn_tcpc_state *st)
{
    pthread_mutex_lock(&c->lock);
    c->rcv_nxt = st->rcv_nxt;
    c->snd_una = st->snd_una;
    c->window_field = st->window_field;
    c->fast = (st->data != 0 || st->push != 0) && c->fd >= 0;
    c->held = 0;
    c->snd_nxt = st->snd_nxt;
    c->rcv_edge = st->rcv_edge;
    c->ws = st->ws_to > 14 ? 14 : st->ws_to;
    c->ws_from = st->ws_from > 14 ? 14 : st->ws_from;
    c->mss = st->mss;
    c->ack = st->ack != 0;
    c->our_field = st->our_field;
    c->max_snd_wnd = st->max_snd_wnd;
    c->data = st->data != 0;
    c->push = c->fast && st->push != 0 && c->mss > 0;
    if (st->pair < TN_TCP_PAIRS)
        c->pair = st->pair;
    c->timer = st->timer != 0;
    pthread_mutex_unlock(&c->lock);
}

int tn_tcpc_fd(const struct tn_tcpc *c) { return c->fd; }
int tn_tcpc_ep_pair(const struct tn_tcpc *c) { return c->ep_pair; }
void tn_tcpc_set_ep_pair(struct tn_tcpc *c, int pair) { c->ep_pair = (int8_t)pair; }

uint64_t tn_ttable_host_ready(const struct tn_ttable *t)
{
    return __atomic_load_n(&t->host_ready, __ATOMIC_RELAXED);
}

void tn_ttable_set_out(struct tn_ttable *t, uint32_t pair, struct tn_uoutq *q)
{
    if (pair < TN_TCP_PAIRS)
        t->out[pair] = q;
}

uint64_t tn_ttable_fast_sends(const struct tn_ttable *t)
{
    return __atomic_load_n(&t->fast_sends, __ATOMIC_RELAXED);
}

uint64_t tn_ttable_fast_partial(const struct tn_ttable *t)
{
    return __atomic_load_n(&t->fast_partial, __ATOMIC_RELAXED);
}

uint64_t tn_ttable_native_acks(const struct tn_ttable *t)
{
    return __atomic_load_n(&t->native_acks, __ATOMIC_RELAXED);
}

uint64_t tn_ttable_acks_to_python(const struct tn_ttable *t)
{
    return __atomic_load_n(&t->acks_to_python, __ATOMIC_RELAXED);
}

uint64_t tn_ttable_guest_acks(const struct tn_ttable *t)
{
    return __atomic_load_n(&t->guest_acks, __ATOMIC_RELAXED);
}

uint64_t tn_ttable_push_segments(const struct tn_ttable *t)
{
    return __atomic_load_n(&t->push_segments, __ATOMIC_RELAXED);
}

/* List c for Python to acknowledge (c locked).  The list holds every
 * connection (TT_LIST), and none that tn_ttable_del removed: a run or an ACK
 * flushed after Python deleted c leaves no pointer to it behind. */
static void list_for_ack(struct tn_ttable *t, struct tn_tcpc *c)
{
    pthread_mutex_lock(&t->list_lock);
    if (!c->listed && !c->gone) {
        t->list[t->nlisted++] = c;
        c->listed = 1;
        __atomic_store_n(&t->signal, 1, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&t->list_lock);
}

static inline uint16_t rd16be(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline uint32_t rd32be(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* c owes its guest something after the batch (c locked): an ACK for the
 * data it sent (push 0), or the stream's next segments (push 1).  0 when
 * acks is full. */
static int owe(struct tn_tcp_acks *acks, struct tn_tcpc *c, int push)
{
    if (!c->owed) {
        if (acks->n >= TN_TCP_ACKS_MAX)
            return 0;
        __atomic_add_fetch(&c->refs, 1, __ATOMIC_RELAXED);
        c->owed = 1;
        acks->c[acks->n++] = c;
    }
    if (push)
        c->push_owed = 1;
    else
        c->ack_owed = 1;
    return 1;
}

/* The TCP checksum of a frame (and the IPv4 header's) is right. */
static int sums_ok(const uint8_t *ip, int v6, const uint8_t *th, uint32_t plen,
                   const struct iovec *pl, uint32_t npl)
{
    uint64_t acc;
    int ok = 1;
    if (v6) {
        acc = ns_sum_le(ip + 8, 32, 0);
    } else {
        ok = ns_fold(ns_sum_le(ip, V4_LEN, 0)) == 0xffff;
        acc = ns_sum_le(ip + 12, 8, 0);
    }
    uint8_t tail[4] = {0, 6, (uint8_t)((TCP_LEN + plen) >> 8), (uint8_t)(TCP_LEN + plen)};
    acc = ns_sum_le(tail, 4, acc);
    acc = ns_sum_le(th, TCP_LEN, acc);
    acc = ns_sum_iov(pl, npl, plen, acc);
    return ok && ns_fold(acc) == 0xffff;
}

/* The guest's pure ACK (c locked, fast): 3 when taken (the acknowledged
 * bytes dropped from the socket, a push owed), 0 when it is Python's: not in
 * order, a duplicate ACK (Python counts them), a zero window, one that
 * acknowledges what was never sent, or push not allowed. */
static int take_ack(struct tn_ttable *t, struct tn_tcpc *c, struct tn_tcp_acks *acks,
                    uint32_t seq, uint32_t ack, uint16_t window, uint8_t pair)
{
    uint32_t d = ack - c->snd_una, inflight = c->snd_nxt - c->snd_una;
    uint32_t wnd = (uint32_t)window << c->ws_from;
    if (!c->push || seq != c->rcv_nxt || d > inflight || wnd == 0)
        return 0;
    if (d == 0 && window == c->window_field && inflight > 0)
        return 0;
    if (!c->owed && acks->n >= TN_TCP_ACKS_MAX)
        return 0;
    if (d > 0) {
        int64_t done = consume_locked(c, d);
        if (done != (int64_t)d) {  /* the socket lost what the guest had (a reset): Python's */
            if (done > 0) {
                c->snd_una += (uint32_t)done;
                c->moved = 1;
            }
            return 0;
        }
    }
    c->snd_una = ack;
    c->window_field = window;
    if (wnd > c->max_snd_wnd)
        c->max_snd_wnd = wnd;
    c->moved = c->took = 1;
    c->pair = pair;
    owe(acks, c, 1);
    __atomic_fetch_add(&t->guest_acks, 1, __ATOMIC_RELAXED);
    return 3;
}

int tn_tcp_tx_join(struct tn_ttable *t, struct tn_tcp_run *run, struct tn_tcp_acks *acks,
                   const struct iovec *ch, uint32_t nch, uint32_t hdr_len, uint32_t flen,
                   uint8_t vnet_flags, uint8_t pair, uint16_t head)
{
    uint8_t h[VNET_HDR_MAX + ETH_LEN + V6_LEN + TCP_LEN];
    if (t == NULL || hdr_len > VNET_HDR_MAX)
        return 0;
    uint32_t got = tn_iov_to_buf(ch, nch, h, hdr_len + ETH_LEN + V6_LEN + TCP_LEN < hdr_len + flen
                                                 ? hdr_len + ETH_LEN + V6_LEN + TCP_LEN
                                                 : hdr_len + flen);
    const uint8_t *f = h + hdr_len, *ip = f + ETH_LEN, *th;
    uint32_t have = got - hdr_len, l4, plen;
    int v6;
    if (have < ETH_LEN + V4_LEN + TCP_LEN)
        return 0;
    uint16_t type = rd16be(f + 12);
    if (type == 0x0800) {
        uint16_t total = rd16be(ip + 2);
        if (ip[0] != 0x45 || ip[9] != 6 || (rd16be(ip + 6) & 0x3fff) != 0 ||
            total < V4_LEN + TCP_LEN || ETH_LEN + (uint32_t)total > flen)
            return 0;
        v6 = 0;
        l4 = ETH_LEN + V4_LEN;
        plen = total - V4_LEN - TCP_LEN;
    } else if (type == 0x86dd) {
        if (have < ETH_LEN + V6_LEN + TCP_LEN || ip[0] >> 4 != 6 || ip[6] != 6)
            return 0;
        uint16_t pl = rd16be(ip + 4);
        if (pl < TCP_LEN || ETH_LEN + V6_LEN + (uint32_t)pl > flen)
            return 0;
        v6 = 1;
        l4 = ETH_LEN + V6_LEN;
        plen = pl - TCP_LEN;
    } else {
        return 0;
    }
    th = f + l4;
    /* plain: no options, ACK (and PSH) only; a payload, or a pure ACK */
    if (th[12] >> 4 != TCP_LEN / 4 || (th[13] & ~0x08) != 0x10 || (plen == 0 && th[13] != 0x10))
        return 0;
    const uint8_t *src = v6 ? ip + 8 : ip + 12, *dst = v6 ? ip + 24 : ip + 16;
    uint16_t sport = rd16be(th), dport = rd16be(th + 2);
    uint32_t seq = rd32be(th + 4), ack = rd32be(th + 8);
    uint16_t window = rd16be(th + 14);

    /* the payload's pieces go straight after the run's (kept only if it joins) */
    struct iovec *pl = run->pl + run->npl;
    uint32_t npl = ns_iov_window(ch, nch, hdr_len + l4 + TCP_LEN, plen, pl,
                                 TN_TCP_RUN_IOV - run->npl);
    size_t covered = 0;
    for (uint32_t k = 0; k < npl; k++)
        covered += pl[k].iov_len;
    if (covered != plen)  /* no room left in the run's iovecs (or more than a run holds) */
        return run->n > 0 ? 2 : 0;
    pthread_rwlock_rdlock(&t->index_lock);
    int i = find_slot(t, v6, src, dst, sport, dport);
    struct tn_tcpc *c = i >= 0 ? t->slot[i] : NULL;
    int rc = 0;
    if (c != NULL) {
        pthread_mutex_lock(&c->lock);
        if (run->n > 0 && (run->c != c || run->n >= TN_TCP_RUN_FRAMES || plen == 0)) {
            rc = 2;  /* another connection's run, a full one, or an ACK: flush it, ask again */
        } else if (plen == 0 && c->fast && c->fd >= 0) {
            int ok = (vnet_flags & VNET_F_NEEDS_CSUM) || sums_ok(ip, v6, th, 0, pl, 0);
            rc = ok ? take_ack(t, c, acks, seq, ack, window, pair) : 0;
            if (rc == 0)
                c->fast = 0;  /* this frame is Python's, and so is every later one */
        } else if (c->fast && c->data && c->fd >= 0) {
            uint32_t want = run->n > 0 ? run->seq + run->bytes : c->rcv_nxt;
            int ok = seq == want && ack == c->snd_una && window == c->window_field;
            if (ok && !(vnet_flags & VNET_F_NEEDS_CSUM))
                ok = sums_ok(ip, v6, th, plen, pl, npl);
            if (ok) {
                if (run->n == 0) {
                    __atomic_add_fetch(&c->refs, 1, __ATOMIC_RELAXED);
                    run->c = c;
                    run->seq = seq;
                    run->bytes = run->npl = 0;
                    run->pair = pair;
                }
                run->npl += npl;
                run->head[run->n] = head;
                run->len[run->n] = plen;
                run->flen[run->n] = flen;
                run->n++;
                run->bytes += plen;
                rc = 1;
            } else {
                c->fast = 0;  /* this frame is Python's, and so is every later one */
            }
        }
        pthread_mutex_unlock(&c->lock);
    }
    pthread_rwlock_unlock(&t->index_lock);
    return rc;
}

uint32_t tn_tcp_run_flush(struct tn_ttable *t, struct tn_tcp_run *run, struct tn_vq *vq,
                          struct tn_tcp_acks *acks, uint64_t *unbytes)
{
    struct tn_tcpc *c = run->c;
    uint32_t n = run->n, k = 0;
    *unbytes = 0;
    if (n == 0)
        return 0;
    pthread_mutex_lock(&c->lock);
    /* nothing moved under the run: Python does not hold the connection, and
     * its stream is where the run starts */
    if (c->fd >= 0 && !c->held && c->rcv_nxt == run->seq) {
        struct msghdr mh;
        memset(&mh, 0, sizeof(mh));
        mh.msg_iov = run->pl;
        mh.msg_iovlen = run->npl;
        ssize_t r = sendmsg(c->fd, &mh, MSG_DONTWAIT | MSG_NOSIGNAL);
        uint32_t sent = r > 0 ? (uint32_t)r : 0, whole = 0;
        __atomic_fetch_add(&t->fast_sends, 1, __ATOMIC_RELAXED);
        if (sent < run->bytes)
            __atomic_fetch_add(&t->fast_partial, 1, __ATOMIC_RELAXED);
        c->rcv_nxt += sent;
        while (k < n && whole + run->len[k] <= sent)
            whole += run->len[k++];
        if (k > 0) {
            c->pair = run->pair;
            c->took = 1;
            __atomic_fetch_add(&t->fast_frames, k, __ATOMIC_RELAXED);
            __atomic_fetch_add(&t->fast_bytes, whole, __ATOMIC_RELAXED);
        }
        if (sent < run->bytes)
            c->fast = 0;  /* the rest goes to Python, which holds what the socket refuses */
        if (sent > 0 && !(sent == run->bytes && c->ack && owe(acks, c, 0)))
            list_for_ack(t, c);
    }
    pthread_mutex_unlock(&c->lock);
    for (uint32_t i = 0; i < k; i++)
        tn_vq_push(vq, run->head[i], 0);
    for (uint32_t i = k; i < n; i++)
        *unbytes += run->flen[i];
    unref(c);
    run->c = NULL;
    run->n = run->npl = run->bytes = 0;
    return n - k;
}

/* Free space of fd's send buffer for payload (the share of the buffer's
 * memory that is payload), its queued bytes and its buffer size. */
static int64_t send_space(int fd, uint32_t *outq_out, uint32_t *sndbuf_out)
{
    uint32_t mem[SK_MEMINFO_VARS] = {0};
    socklen_t ml = sizeof(mem);
    int outq = 0;
    if (getsockopt(fd, SOL_SOCKET, SO_MEMINFO, mem, &ml) < 0 || ioctl(fd, SIOCOUTQ, &outq) < 0)
        return -errno;
    uint64_t sndbuf = mem[SK_MEMINFO_SNDBUF], queued = mem[SK_MEMINFO_WMEM_QUEUED];
    *outq_out = outq > 0 ? (uint32_t)outq : 0;
    *sndbuf_out = (uint32_t)sndbuf;
    if (queued >= sndbuf)
        return 0;
    if (outq > 0 && queued > (uint64_t)outq)
        return (int64_t)((sndbuf - queued) * (uint64_t)outq / queued);
    return (int64_t)((sndbuf - queued) / 2);
}

int64_t tn_tcpc_space(struct tn_tcpc *c, uint32_t *outq, uint32_t *sndbuf)
{
    pthread_mutex_lock(&c->lock);
    int64_t r = c->fd >= 0 ? send_space(c->fd, outq, sndbuf) : -EBADF;
    pthread_mutex_unlock(&c->lock);
    return r;
}

/* The window field for c's socket, by the rule of Python's TcpConn._window
 * (c locked, fd open): silly windows (below min(mss, half the payload share
 * of the buffer) while data is queued) and a full buffer give 0, which is
 * Python's to send. */
static uint16_t ack_window(const struct tn_tcpc *c)
{
    uint32_t outq, sndbuf;
    int64_t space = send_space(c->fd, &outq, &sndbuf);
    if (space <= 0)
        return 0;
    uint64_t capacity = sndbuf / 2, sws = c->mss < capacity / 2 ? c->mss : capacity / 2;
    if ((uint64_t)space < sws && outq > 0)
        return 0;
    uint64_t cap = (uint64_t)0xFFFF << c->ws;
    return (uint16_t)(((uint64_t)space > cap ? cap : (uint64_t)space) >> c->ws);
}

/* The native push may run: Python allows it and does not hold c (c locked). */
static int pushable(const struct tn_tcpc *c) { return c->push && c->fast && c->fd >= 0; }

/* The stream's next segments after a guest ACK or host data (q and c locked,
 * push allowed), by the rule of Python's TcpConn.push: within the guest's
 * window, the MSS and the outbox's room, no small segment while more data
 * waits and data is in flight.  Segments queued, or -1: Python's (the end of
 * the stream, an error, no room, or data sent with none in flight before and
 * Python's retransmission timer off, which Python then arms). */
static int push_locked(struct tn_ttable *t, struct tn_tcpc *c, struct tn_uoutq *q)
{
    uint32_t inflight = c->snd_nxt - c->snd_una, mss = c->mss;
    uint32_t snd_wnd = (uint32_t)c->window_field << c->ws_from;
    if (snd_wnd <= inflight)
        return 0;  /* the window is full: the guest's next ACK opens it */
    uint32_t usable = snd_wnd - inflight, room = tn_uout_room_locked(q);
    room = room > TN_TCP_OUTBOX_RESERVE ? room - TN_TCP_OUTBOX_RESERVE : 0;
    if (room > TN_TCP_PUSH_BURST)
        room = TN_TCP_PUSH_BURST;
    if (room == 0)
        return -1;
    /* nothing yet: new data raises the socket's edge; the end of the stream is Python's */
    int64_t avail = avail_locked(c, inflight);
    if (avail <= 0)
        return avail == 0 ? 0 : -1;
    uint32_t have = (uint32_t)avail;
    uint64_t want = usable;
    if (want > (uint64_t)room * mss)
        want = (uint64_t)room * mss;
    if (want > have)
        want = have;
    uint32_t sws = c->max_snd_wnd / 2 < mss ? c->max_snd_wnd / 2 : mss;
    if (want < have && inflight > 0 && want < sws)
        return 0;  /* RFC 1122 §4.2.3.4: the next ACK opens more */
    int n = tn_uout_put_tcp_locked(q, c, c->snd_nxt, c->rcv_nxt, c->our_field,
                                   TCP_ACK | TN_TCP_PSH, (uint32_t)want, mss);
    if (n <= 0)
        return -1;
    uint32_t segs = (uint32_t)((want + mss - 1) / mss);
    c->snd_nxt += (uint32_t)n >= segs ? (uint32_t)want : (uint32_t)n * mss;
    c->moved = 1;
    __atomic_fetch_add(&t->push_segments, (uint64_t)n, __ATOMIC_RELAXED);
    /* sent with nothing in flight before while Python's retransmission timer
     * is off (it saw everything acknowledged): it is told (listed), to arm
     * it.  A running one, set for earlier data, looks again when it fires. */
    if (inflight == 0 && !c->timer) {
        c->timer = 1;
        return -1;
    }
    return (uint32_t)n >= segs ? n : -1;
}

/* The ACK for the guest data c sent natively (q and c locked), from its
 * template: 1 queued, 0 Python's (a zero window, Python has it, or the
 * outbox is full). */
static int ack_locked(struct tn_tcpc *c, struct tn_uoutq *q)
{
    uint16_t field = 0;
    if (q != NULL && c->fast && c->ack && c->fd >= 0)
        field = ack_window(c);
    if (field == 0)
        return 0;
    uint8_t frame[TN_TCPC_TMPL_MAX + MIN_FRAME];
    struct tn_tcp_entry e = {c, c->snd_nxt, c->rcv_nxt, 0, field, TCP_ACK};
    uint32_t tl = c->tmpl_len, flen = tl;
    memcpy(frame, c->tmpl, tl);
    headers(&e, frame, tl, c->snd_nxt, 0, 0);
    if (flen < MIN_FRAME) {
        memset(frame + flen, 0, MIN_FRAME - flen);
        flen = MIN_FRAME;
    }
    if (tn_uout_put_locked(q, frame, flen) != 1)
        return 0;
    uint32_t edge = c->rcv_nxt + ((uint32_t)field << c->ws);
    if ((int32_t)(edge - c->rcv_edge) > 0)
        c->rcv_edge = edge;
    c->acked = c->rcv_nxt;
    c->our_field = field;
    c->acks = 1;
    return 1;
}

void tn_tcp_ready(struct tn_ttable *t, struct tn_tcpc *c, uint8_t pair)
{
    struct tn_uoutq *q = pair < TN_TCP_PAIRS ? t->out[pair] : NULL;
    if (q != NULL)  /* the outbox's lock before the connection's (its drain peeks) */
        tn_uout_lock(q);
    pthread_mutex_lock(&c->lock);
    if (pushable(c)) {  /* else Python has it, and looks at resume */
        __atomic_fetch_add(&t->host_ready, 1, __ATOMIC_RELAXED);
        /* the guest moved it to another pair since: Python moves the watch */
        if (q == NULL || c->pair != pair || push_locked(t, c, q) < 0)
            list_for_ack(t, c);
    }
    pthread_mutex_unlock(&c->lock);
    if (q != NULL)
        tn_uout_unlock(q);
}

void tn_tcp_acks_flush(struct tn_ttable *t, struct tn_tcp_acks *acks, uint8_t pair)
{
    struct tn_uoutq *q = pair < TN_TCP_PAIRS ? t->out[pair] : NULL;
    for (uint32_t i = 0; i < acks->n; i++) {
        struct tn_tcpc *c = acks->c[i];
        if (q != NULL)  /* the outbox's lock before the connection's (its drain peeks) */
            tn_uout_lock(q);
        pthread_mutex_lock(&c->lock);
        int ack_owed = c->ack_owed, push_owed = c->push_owed, python = 0;
        c->owed = c->ack_owed = c->push_owed = 0;
        if (ack_owed) {
            if (ack_locked(c, q)) {
                __atomic_fetch_add(&t->native_acks, 1, __ATOMIC_RELAXED);
            } else {
                __atomic_fetch_add(&t->acks_to_python, 1, __ATOMIC_RELAXED);
                python = 1;  /* Python acknowledges, and sends what follows */
            }
        }
        if (push_owed && !python)
            python = q == NULL || !pushable(c) || push_locked(t, c, q) < 0;
        if (python)
            list_for_ack(t, c);
        pthread_mutex_unlock(&c->lock);
        if (q != NULL)
            tn_uout_unlock(q);
        unref(c);
    }
    acks->n = 0;
}
