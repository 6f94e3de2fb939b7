/* TCP data towards the guest, peeked from the socket into the guest's
 * buffers: see usertcp.h.  This file: the connection (its socket's peeks
 * and consumes) and its data entries.  The connection table is in
 * usertcp_table.c, the guest TX fast path in usertcp_tx.c, the native ACKs
 * and pushes in usertcp_push.c. */
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
#include "internal/usertcp_impl.h"

#ifndef SO_PEEK_OFF
#define SO_PEEK_OFF 42
#endif
#ifndef SIOCINQ
#define SIOCINQ 0x541B            /* FIONREAD */
#endif
#define VNET_F_NEEDS_CSUM 1
#define VNET_F_DATA_VALID 2
#define VNET_GSO_TCPV4 1
#define VNET_GSO_TCPV6 4
#define DISCARD_MAX (1u << 24)    /* the fallback's peek skips at most this (16 MiB) */
#define MAX_IOV 1024

static struct tn_tcpc_stats stats;

static void count(uint64_t *counter) { __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED); }

void tn_tcpc_stats_get(struct tn_tcpc_stats *out)
{
    out->laid = __atomic_load_n(&stats.laid, __ATOMIC_RELAXED);
    out->stale = __atomic_load_n(&stats.stale, __ATOMIC_RELAXED);
    out->trimmed = __atomic_load_n(&stats.trimmed, __ATOMIC_RELAXED);
    out->short_peeks = __atomic_load_n(&stats.short_peeks, __ATOMIC_RELAXED);
    out->peek_errors = __atomic_load_n(&stats.peek_errors, __ATOMIC_RELAXED);
    out->peeks = __atomic_load_n(&stats.peeks, __ATOMIC_RELAXED);
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

void tn_tcpc_unref(struct tn_tcpc *c)
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
    tn_tcpc_unref(c);
}

int tn_tcpc_peek_off(const struct tn_tcpc *c) { return c->peek_off; }
int tn_tcpc_fd(const struct tn_tcpc *c) { return c->fd; }
int tn_tcpc_ep_pair(const struct tn_tcpc *c) { return c->ep_pair; }
void tn_tcpc_set_ep_pair(struct tn_tcpc *c, int pair) { c->ep_pair = (int8_t)pair; }

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
int64_t tn_tcpc_avail_locked(struct tn_tcpc *c, uint32_t offset)
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
    int64_t rc = c->fd >= 0 ? tn_tcpc_avail_locked(c, offset) : -EBADF;
    pthread_mutex_unlock(&c->lock);
    return rc;
}

/* Drop n bytes from the receive queue's head (c locked, fd open). */
int64_t tn_tcpc_consume_locked(struct tn_tcpc *c, uint32_t n)
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
    int64_t done = c->fd >= 0 ? tn_tcpc_consume_locked(c, n) : -EBADF;
    pthread_mutex_unlock(&c->lock);
    return done;
}

/* ---- data entries ---------------------------------------------------------------- */

struct tn_tcp_entry *tn_tcp_entry_new(struct tn_tcpc *c, uint32_t seq, uint32_t ack,
                                      uint16_t window, uint8_t flags, uint32_t len,
                                      uint16_t gso)
{
    struct tn_tcp_entry *e = malloc(sizeof(*e));
    if (e == NULL)
        return NULL;
    __atomic_add_fetch(&c->refs, 1, __ATOMIC_RELAXED);
    *e = (struct tn_tcp_entry){c, seq, ack, len, window, gso, flags};
    return e;
}

void tn_tcp_entry_free(struct tn_tcp_entry *e)
{
    tn_tcpc_unref(e->c);
    free(e);
}

int tn_tcp_entry_follows(const struct tn_tcp_entry *e, const struct tn_tcp_entry *prev)
{
    return e->c == prev->c && e->seq == prev->seq + prev->len;
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
 * payload bytes summing to psum; partial: the TCP checksum field holds the
 * pseudo-header's sum only, for the guest to complete (NEEDS_CSUM). */
static void headers(const struct tn_tcp_entry *e, uint8_t *hb, uint32_t tl, uint32_t seq,
                    uint32_t len, uint64_t psum, int partial)
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
    if (partial) {
        uint16_t ck = (uint16_t)ns_fold(acc);
        memcpy(th + 16, &ck, 2);
        return;
    }
    acc = ns_sum_le(th, TCP_LEN, acc) + psum;
    uint16_t ck = (uint16_t)~ns_fold(acc);
    memcpy(th + 16, &ck, 2);
}

void tn_tcp_headers(const struct tn_tcp_entry *e, uint8_t *hb, uint32_t tl, uint32_t seq,
                    uint32_t len, uint64_t psum)
{
    headers(e, hb, tl, seq, len, psum, 0);
}

/* The bytes of e (len of them in hand) one frame carries: all of them, *gso
 * set when that is one GSO frame (longer than the segment size, of a family
 * rx_flags says the guest takes TSO for); or, for a GSO entry the guest cannot
 * take as one (TSO off since it was queued), one segment's worth (the rest is
 * retransmitted). */
static uint32_t wire_len(const struct tn_tcp_entry *e, uint32_t tl, int rx_flags, uint32_t len,
                         int *gso)
{
    *gso = 0;
    if (!e->gso || len <= e->gso)
        return len;
    int v6 = tl == ETH_LEN + V6_LEN + TCP_LEN;
    *gso = (rx_flags & (v6 ? TN_RX_TSO6 : TN_RX_TSO4)) != 0;
    return *gso ? len : e->gso;
}

/* Where each frame of a batch lies in the scratch: its chains and iovecs,
 * and the window of the peek's iovecs that holds its payload. */
struct lay_frame {
    uint32_t chain0, nchains, iov0, niov, pl0, npl, len;
};

/* The headers (from c's template) and the padding of a frame whose len
 * payload bytes are in place; returns the frame's length. */
static uint32_t lay_headers(const struct tn_tcp_entry *e, struct tn_scratch *s,
                            const struct lay_frame *f, const struct iovec *pl, uint32_t hdr_len,
                            int data_valid, uint32_t seq, uint32_t len)
{
    const struct tn_tcpc *c = e->c;
    uint32_t tl = c->tmpl_len;
    const struct iovec *iov = s->iov + f->iov0;
    uint8_t hb[VNET_HDR_MAX + TN_TCPC_TMPL_MAX];
    int gso;  /* a header too short for GSO fields takes one segment's worth */
    len = wire_len(e, tl, hdr_len >= 10 ? data_valid : 0, len, &gso);
    memset(hb, 0, hdr_len);
    if ((data_valid & TN_RX_DATA_VALID) && hdr_len > 0)
        hb[0] = VNET_F_DATA_VALID;
    if (gso) {  /* virtio_net_hdr: NEEDS_CSUM, TCPV4/6, hdr_len, gso_size, csum_start/offset */
        int v6 = tl == ETH_LEN + V6_LEN + TCP_LEN;
        uint16_t fields[4] = {(uint16_t)tl, e->gso, (uint16_t)(tl - TCP_LEN), 16};
        hb[0] = VNET_F_NEEDS_CSUM;
        hb[1] = v6 ? VNET_GSO_TCPV6 : VNET_GSO_TCPV4;
        memcpy(hb + 2, fields, sizeof fields);  /* little endian, as the host */
    }
    if (hdr_len >= 12)
        hb[10] = 1;  /* num_buffers: tn_rx_finish_at sets it for merged buffers */
    memcpy(hb + hdr_len, c->tmpl, tl);
    headers(e, hb + hdr_len, tl, seq, len, gso ? 0 : ns_sum_iov(pl + f->pl0, f->npl, len, 0), gso);
    ns_iov_put(iov, f->niov, 0, hb, hdr_len + tl);
    uint32_t frame = tl + len;
    if (frame < MIN_FRAME) {
        static const uint8_t zeros[MIN_FRAME];
        ns_iov_put(iov, f->niov, hdr_len + frame, zeros, MIN_FRAME - frame);
        frame = MIN_FRAME;
    }
    return frame;
}

static void rewind_frames(struct tn_vq *vq, const struct lay_frame *f, uint32_t from, uint32_t to)
{
    uint32_t chains = 0;
    for (uint32_t i = from; i < to; i++)
        chains += f[i].nchains;
    tn_vq_rewind(vq, (uint16_t)chains);
}

int tn_tcp_entries_lay(struct tn_tcp_entry *const *es, uint32_t n, struct tn_vq *vq,
                       const struct tn_mem *m, int mrg, uint32_t hdr_len, int data_valid,
                       struct tn_scratch *s, uint32_t *laid, uint64_t *bytes)
{
    struct tn_tcpc *c = es[0]->c;
    uint32_t tl = c->tmpl_len, chain = 0, iov = 0, g = 0, seq, len0;
    struct lay_frame f[TN_TCP_LAY_BATCH];
    *laid = 0;
    *bytes = 0;
    if (hdr_len > VNET_HDR_MAX)
        return 1;
    if (n > TN_TCP_LAY_BATCH)
        n = TN_TCP_LAY_BATCH;
    /* the chains of every frame first: the peek fills all of them */
    for (; g < n; g++) {
        uint32_t frame_max = tl + es[g]->len > MIN_FRAME ? tl + es[g]->len : MIN_FRAME;
        uint32_t niov;
        uint64_t room;
        if (g > 0 && (chain > 256 - 16 || iov > TN_MAX_CHAIN_IOV - 64))
            break;  /* the scratch's room: the rest waits for the next batch */
        int r = tn_rx_gather_at(vq, m, mrg, hdr_len + frame_max, s, chain, iov, &niov, &room);
        if (r < 0) {
            rewind_frames(vq, f, 0, g);
            return r;
        }
        if (r == 0)
            break;
        f[g] = (struct lay_frame){chain, (uint32_t)r, iov, niov, 0, 0, es[g]->len};
        chain += (uint32_t)r;
        iov += niov;
    }
    if (g == 0)
        return 0;
    struct iovec pl[MAX_IOV];
    pthread_mutex_lock(&c->lock);
    int64_t skip = entry_skip(es[0], &seq, &len0);
    ssize_t got = -1;
    if (skip >= 0) {
        if (len0 < es[0]->len) {  /* trimmed: it alone, its unused chains then the last ones */
            rewind_frames(vq, f, 1, g);
            g = 1;
        }
        f[0].len = len0;
        uint32_t npl = 0;
        for (uint32_t i = 0; i < g; i++) {
            f[i].pl0 = npl;
            f[i].npl = ns_iov_window(s->iov + f[i].iov0, f[i].niov, hdr_len + tl, f[i].len,
                                     pl + npl, MAX_IOV - npl);
            npl += f[i].npl;
        }
        got = peek_at(c, (uint32_t)skip, pl, npl);
        if (got > 0)
            count(&stats.peeks);
    }
    pthread_mutex_unlock(&c->lock);
    if (got <= 0) {
        rewind_frames(vq, f, 0, g);
        count(skip < 0 ? &stats.stale : &stats.peek_errors);
        return 1;  /* the first entry is dropped; the others are tried again */
    }
    uint32_t i = 0;
    for (uint32_t at = 0; i < g && at < (uint32_t)got; i++) {
        uint32_t len = f[i].len;
        if ((uint32_t)got - at < len) {
            count(&stats.short_peeks);
            len = (uint32_t)got - at;
        }
        uint32_t frame = lay_headers(es[i], s, &f[i], pl, hdr_len, data_valid,
                                     i == 0 ? seq : es[i]->seq, len);
        tn_rx_finish_at(vq, (int)f[i].nchains, hdr_len + frame, hdr_len, s, f[i].chain0,
                        f[i].iov0, f[i].niov);
        count(&stats.laid);
        *bytes += frame;
        at += len;
    }
    rewind_frames(vq, f, i, g);  /* the peek came short: those had no bytes */
    tn_vq_publish(vq);
    *laid = i;
    return (int)i;
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
    int gso;  /* flat frames carry no GSO header: one segment's worth */
    len = wire_len(e, tl, 0, (uint32_t)got, &gso);
    memcpy(buf, c->tmpl, tl);
    tn_tcp_headers(e, buf, tl, seq, len, ns_sum_le(buf + tl, len, 0));
    count(&stats.laid);
    return (int)(tl + len);
}
