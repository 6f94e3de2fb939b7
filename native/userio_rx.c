/* The user-mode stack's native UDP fast path, guest RX (see userio.h): the
 * datagrams of the flows in a pair's epoll set are received straight into
 * the RX buffers behind room for the headers, which are written afterwards.
 * Host data of a TCP connection in the same set goes to tn_tcp_ready
 * (usertcp_push.c). */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#include "netsum.h"
#include "virtq.h"
#include "userio.h"
#include "userpair.h"
#include "usertcp.h"
#include "internal/userio_impl.h"

#define VNET_F_DATA_VALID 2
#define MIN_FRAME 60
#define RX_BATCH 32               /* datagrams of one socket per recvmmsg */
#define RX_EVENTS 64
#define RX_ROUNDS 8
#define MAX_DGRAM_V4 65507u       /* largest datagram a socket hands us */
#define MAX_DGRAM_V6 65527u

/* ---- guest RX -------------------------------------------------------------- */

struct rx_ctx {
    struct tn_vq *vq;
    const struct tn_mem *m;
    struct tn_utable *t;
    struct tn_scratch *s;
    struct tn_batch *b;
    uint32_t hdr_len;
    uint32_t max;
    uint32_t done;
    int mrg;
    int data_valid;
    uint64_t now;
    uint8_t pair;
    struct iovec sub[TN_MAX_CHAIN_IOV];
};

enum { RX_MORE, RX_DRAINED, RX_FULL };

/* Write the virtio-net header and the flow's headers for a datagram of dlen
 * bytes already received behind them (iov: the whole buffer, payload: the
 * datagram), and pad short frames.  Returns the frame length. */
static uint32_t rx_headers(struct rx_ctx *c, struct tn_uflow *f, const struct iovec *iov,
                           uint32_t niov, const struct iovec *payload, uint32_t npayload,
                           uint32_t dlen)
{
    uint8_t zeros[MIN_FRAME] = {0};
    uint8_t hb[VNET_HDR_MAX + HDRS_MAX];
    uint32_t hl = c->hdr_len, tl = f->tmpl_len;
    uint16_t ulen = (uint16_t)(UDP_LEN + dlen);
    memset(hb, 0, hl);
    if (c->data_valid & TN_RX_DATA_VALID)
        hb[0] = VNET_F_DATA_VALID;
    if (hl >= 12)
        hb[10] = 1;  /* num_buffers (little-endian), tn_rx_finish sets it for merged buffers */
    memcpy(hb + hl, f->tmpl, tl);
    uint8_t *ip = hb + hl + ETH_LEN, *udp;
    if (f->v6) {
        put_be16(ip + 4, ulen);
        udp = ip + V6_LEN;
    } else {
        put_be16(ip + 2, (uint16_t)(V4_LEN + ulen));
        put_be16(ip + 4, c->t->ipv4_id[c->pair]++);
        ip[10] = ip[11] = 0;
        uint16_t ck = (uint16_t)~ns_fold(ns_sum_le(ip, V4_LEN, 0));
        memcpy(ip + 10, &ck, 2);
        udp = ip + V4_LEN;
    }
    put_be16(udp + 4, ulen);
    udp[6] = udp[7] = 0;
    uint64_t acc = sum_pseudo(ip, f->v6, ulen);
    acc = ns_sum_le(udp, UDP_LEN, acc);
    acc = ns_sum_iov(payload, npayload, dlen, acc);
    uint16_t ck = (uint16_t)~ns_fold(acc);
    if (ck == 0)
        ck = 0xffff;
    memcpy(udp + 6, &ck, 2);
    ns_iov_put(iov, niov, 0, hb, hl + tl);
    uint32_t flen = tl + dlen;
    if (flen < MIN_FRAME) {
        ns_iov_put(iov, niov, hl + flen, zeros, MIN_FRAME - flen);
        flen = MIN_FRAME;
    }
    return flen;
}

static void rx_count(struct rx_ctx *c, struct tn_uflow *f, uint32_t dlen, uint32_t flen)
{
    spoke(f, TN_UFLOW_HOST_SPOKE);
    f->last_active = c->now;
    f->rx_packets++;
    f->rx_bytes += dlen;
    c->b->packets++;
    c->b->bytes += flen;
    c->done++;
}

/* The ring has no room: is a datagram waiting for it (else: drained)? */
static int rx_no_room(struct rx_ctx *c, int fd)
{
    uint8_t byte;
    if (recv(fd, &byte, 0, MSG_PEEK | MSG_DONTWAIT) < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
        return RX_DRAINED;
    c->b->ring_full = 1;
    return RX_FULL;
}

/* A receive failed: EAGAIN means drained, anything else marks the flow. */
static int rx_error(struct rx_ctx *c, int slot)
{
    int e = errno;
    if (e != EAGAIN && e != EWOULDBLOCK && e != EINTR) {
        c->b->last_errno = e;
        c->b->drops_io++;
        tn_uflow_flag_err(c->t, slot);
    }
    return RX_DRAINED;
}

/* Chains that each hold any datagram: one recvmmsg straight into up to
 * `budget` of them.  *got: datagrams delivered; 0 with RX_MORE when the next
 * chain is smaller (the caller goes one datagram at a time). */
static int rx_batch(struct rx_ctx *c, int slot, uint32_t budget, uint32_t *got)
{
    struct tn_uflow *f = &c->t->flows[slot];
    struct tn_scratch *s = c->s;
    struct mmsghdr msgs[RX_BATCH];
    uint32_t start[RX_BATCH], count[RX_BATCH];
    uint32_t base = c->hdr_len + f->tmpl_len;
    uint32_t big = base + (f->v6 ? MAX_DGRAM_V6 : MAX_DGRAM_V4);
    uint32_t k = 0, niov = 0, nsub = 0;
    *got = 0;
    while (k < RX_BATCH && k < budget) {
        uint32_t first = niov, nread, rl, wl;
        uint16_t head;
        int rc = tn_vq_pop_iov(c->vq, c->m, DIR_WRITE, s->iov, TN_MAX_CHAIN_IOV, &niov, &nread,
                               &rl, &wl, &head);
        if (rc < 0) {
            tn_vq_rewind(c->vq, (uint16_t)k);
            return rc;
        }
        if (rc == 0 && k == 0)
            return rx_no_room(c, f->fd);
        if (rc == 0)
            break;
        if (wl < big) {
            tn_vq_rewind(c->vq, 1);
            break;
        }
        uint32_t w = ns_iov_window(s->iov + first, niov - first, base, wl - base, c->sub + nsub,
                                TN_MAX_CHAIN_IOV - nsub);
        s->heads[k] = head;
        start[k] = first;
        count[k] = niov - first;
        memset(&msgs[k], 0, sizeof(msgs[k]));
        msgs[k].msg_hdr.msg_iov = c->sub + nsub;
        msgs[k].msg_hdr.msg_iovlen = w;
        nsub += w;
        k++;
    }
    if (k == 0)
        return RX_MORE;
    int n = recvmmsg(f->fd, msgs, k, MSG_DONTWAIT, NULL);
    if (n <= 0) {
        tn_vq_rewind(c->vq, (uint16_t)k);
        if (n == 0)
            return RX_DRAINED;
        return rx_error(c, slot);
    }
    for (uint32_t i = 0; i < (uint32_t)n; i++) {
        uint32_t dlen = msgs[i].msg_len;
        uint32_t flen = rx_headers(c, f, s->iov + start[i], count[i], msgs[i].msg_hdr.msg_iov,
                                   (uint32_t)msgs[i].msg_hdr.msg_iovlen, dlen);
        tn_vq_push(c->vq, s->heads[i], c->hdr_len + flen);
        rx_count(c, f, dlen, flen);
    }
    tn_vq_rewind(c->vq, (uint16_t)(k - (uint32_t)n));
    *got = (uint32_t)n;
    return (uint32_t)n < k ? RX_DRAINED : RX_MORE;
}

/* One datagram into small buffers: with MRG_RXBUF sized first and spread over
 * as many as it takes; without, into one chain (dropped if it does not fit). */
static int rx_one(struct rx_ctx *c, int slot)
{
    struct tn_uflow *f = &c->t->flows[slot];
    struct tn_scratch *s = c->s;
    uint32_t hl = c->hdr_len, base = hl + f->tmpl_len;
    uint32_t need = hl + (f->tmpl_len > MIN_FRAME ? f->tmpl_len : MIN_FRAME);
    uint8_t byte;
    if (c->mrg) {
        ssize_t len = recv(f->fd, &byte, 0, MSG_PEEK | MSG_TRUNC | MSG_DONTWAIT);
        if (len < 0)
            return rx_error(c, slot);
        uint32_t frame = f->tmpl_len + (uint32_t)len;
        need = hl + (frame > MIN_FRAME ? frame : MIN_FRAME);
    }
    uint32_t niov;
    uint64_t room;
    int n = tn_rx_gather(c->vq, c->m, c->mrg, need, s, &niov, &room);
    if (n < 0)
        return n;
    if (n == 0) {
        int pending = tn_vq_pending(c->vq);
        if (c->mrg && (pending >= c->vq->size || pending >= 256)) {
            /* even every buffer the guest can give would not hold it */
            if (recv(f->fd, &byte, 1, MSG_DONTWAIT) >= 0) {
                count(&c->t->rx_dropped, 1);
                c->b->drops_no_buffer++;
                return RX_MORE;
            }
            return rx_error(c, slot);
        }
        if (c->mrg) {  /* sized above: it is there */
            c->b->ring_full = 1;
            return RX_FULL;
        }
        return rx_no_room(c, f->fd);
    }
    uint32_t cap = room > base + MAX_DGRAM_V6 ? MAX_DGRAM_V6 : (uint32_t)room - base;
    uint32_t w = ns_iov_window(s->iov, niov, base, cap, c->sub, TN_MAX_CHAIN_IOV);
    struct msghdr mh = {.msg_iov = c->sub, .msg_iovlen = w};
    ssize_t r = recvmsg(f->fd, &mh, MSG_DONTWAIT);
    if (r < 0) {
        tn_vq_rewind(c->vq, (uint16_t)n);
        return rx_error(c, slot);
    }
    if (mh.msg_flags & MSG_TRUNC) {  /* larger than the guest's buffer: lost */
        tn_vq_rewind(c->vq, (uint16_t)n);
        count(&c->t->rx_dropped, 1);
        c->b->drops_bad_frame++;
        return RX_MORE;
    }
    uint32_t flen = rx_headers(c, f, s->iov, niov, c->sub, w, (uint32_t)r);
    tn_rx_finish(c->vq, n, hl + flen, hl, s, niov);
    rx_count(c, f, (uint32_t)r, flen);
    return RX_MORE;
}

/* Up to quota datagrams of one flow. */
static int rx_flow(struct rx_ctx *c, int slot, uint32_t quota)
{
    uint32_t taken = 0;
    while (taken < quota && c->done < c->max) {  /* each pass delivers, drops or returns */
        uint32_t got, budget = quota - taken;
        if (budget > c->max - c->done)
            budget = c->max - c->done;
        int rc = rx_batch(c, slot, budget, &got);
        if (rc < 0 || rc == RX_FULL)
            return rc;
        taken += got;
        if (rc == RX_DRAINED)
            return RX_DRAINED;
        if (got == 0) {
            rc = rx_one(c, slot);
            if (rc != RX_MORE)
                return rc;
            taken++;
        }
    }
    return RX_MORE;
}

/* tn_user_rx under the table's read lock. */
static int user_rx(struct rx_ctx *c)
{
    struct tn_vq *vq = c->vq;
    struct tn_utable *t = c->t;
    struct tn_batch *b = c->b;
    struct epoll_event ev[RX_EVENTS];
    int rc = tn_vq_pending(vq);
    if (rc <= 0) {  /* broken, or no buffers: the guest's kick comes first */
        b->ring_full = rc == 0;
        return rc;
    }
    c->now = tn_flow_now();
    for (int round = 0; round < RX_ROUNDS && c->done < c->max; round++) {
        int nev = epoll_wait(t->epfd[c->pair], ev, RX_EVENTS, 0);
        if (nev <= 0) {
            b->fd_blocked = 1;
            break;
        }
        uint32_t quota = (c->max - c->done) / (uint32_t)nev;
        quota = quota > 8 ? quota : 8;
        uint32_t before = c->done;
        int more = 0, full = 0;
        for (int i = 0; i < nev; i++) {
            /* a TCP connection's host data: edge-triggered, so every one taken is handled */
            if (ev[i].data.u64 & EV_TCP) {
                if (t->tcp != NULL)
                    tn_tcp_ready(t->tcp, (struct tn_tcpc *)(uintptr_t)(ev[i].data.u64 & ~EV_TCP),
                                 c->pair);
                continue;
            }
            if (full || c->done >= c->max)
                continue;  /* a UDP flow is level-triggered: reported again next time */
            int slot = (int)(uint32_t)ev[i].data.u64;
            if (!valid_slot(t, slot))
                continue;
            if (ev[i].events & (EPOLLERR | EPOLLHUP))
                tn_uflow_flag_err(t, slot);
            if (!(ev[i].events & EPOLLIN))
                continue;
            rc = rx_flow(c, slot, quota);
            if (rc < 0)
                return rc;
            if (rc == RX_FULL)
                full = 1;
            if (rc == RX_MORE)
                more = 1;
        }
        if (full)
            return 0;
        /* every flow that had something was drained (and epoll had no more to
         * say, or this round got nowhere): wait for the sockets */
        if (!more && (nev < RX_EVENTS || c->done == before)) {
            b->fd_blocked = 1;
            break;
        }
    }
    return 0;
}

int tn_user_rx(struct tn_vq *vq, const struct tn_mem *m, int mrg, uint32_t hdr_len,
               int data_valid, struct tn_utable *t, uint8_t pair, uint32_t max,
               struct tn_scratch *s, struct tn_batch *b)
{
    struct rx_ctx c = {.vq = vq, .m = m, .t = t, .s = s, .b = b, .hdr_len = hdr_len,
                       .max = max, .mrg = mrg, .data_valid = data_valid, .pair = pair};
    memset(b, 0, sizeof(*b));
    if (pair >= TN_UFLOW_PAIRS || hdr_len > VNET_HDR_MAX || t->epfd[pair] < 0) {
        b->last_errno = EINVAL;
        return 0;
    }
    read_lock(t);
    int rc = user_rx(&c);
    unlock(t);
    if (c.done) {
        tn_vq_publish(vq);
        count(&t->rx_fast, c.done);
    }
    return rc < 0 ? rc : (int)c.done;
}
