/* The guest → host TCP TX fast path (see usertcp.h): a TX batch's plain
 * in-order data segments of one connection joined into a run and sent with
 * one sendmsg (tn_tcp_tx_join, tn_tcp_run_flush), and the guest's pure ACKs
 * taken (take_ack).  What a connection owes its guest after the batch is
 * settled in usertcp_push.c (tn_tcp_acks_flush). */
#define _GNU_SOURCE
#include <pthread.h>
#include <string.h>
#include <sys/socket.h>

#include "netsum.h"
#include "virtq.h"
#include "usertcp.h"
#include "internal/usertcp_impl.h"

#define VNET_F_NEEDS_CSUM 1

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
        int64_t done = tn_tcpc_consume_locked(c, d);
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
                   const struct iovec *ch, uint32_t nch, const uint8_t *h, uint32_t got,
                   uint32_t hdr_len, uint32_t flen, uint8_t vnet_flags, uint8_t pair,
                   uint16_t head)
{
    if (t == NULL || hdr_len > VNET_HDR_MAX || got < hdr_len)
        return 0;
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
            tn_ttable_list_for_ack(t, c);
    }
    pthread_mutex_unlock(&c->lock);
    for (uint32_t i = 0; i < k; i++)
        tn_vq_push(vq, run->head[i], 0);
    for (uint32_t i = k; i < n; i++)
        *unbytes += run->flen[i];
    tn_tcpc_unref(c);
    run->c = NULL;
    run->n = run->npl = run->bytes = 0;
    return n - k;
}
