/* The user-mode stack's native UDP fast path, guest TX (see userio.h): a
 * chain's first bytes are copied aside and parsed; a UDP frame of a
 * registered flow has its payload sent from the descriptors themselves (the
 * chain's iovecs narrowed in place), consecutive datagrams of one socket in
 * one sendmmsg.  TCP frames are offered to the native TCP path
 * (usertcp_tx.c); every other frame goes to Python (struct tn_slow). */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <sys/socket.h>

#include "netsum.h"
#include "virtq.h"
#include "userio.h"
#include "usertcp.h"
#include "internal/userio_impl.h"

#define VNET_F_NEEDS_CSUM 1
#define VNET_GSO_TCPV4 1
#define VNET_GSO_TCPV6 4
#define TX_RUN 64                 /* datagrams of one socket per sendmmsg */

/* ---- guest TX -------------------------------------------------------------- */

struct udp_frame {
    int v6;
    uint32_t l4;              /* UDP header offset in the frame */
    uint16_t ulen;
    uint16_t sport, dport;
    uint8_t src[16], dst[16];
};

/* Is the frame (got bytes of it in f, flen in all) well-formed UDP the fast
 * path may carry?  Fills u. */
static int parse_udp(const uint8_t *f, uint32_t got, uint32_t flen, struct udp_frame *u)
{
    if (got < ETH_LEN)
        return 0;
    const uint8_t *ip = f + ETH_LEN;
    memset(u, 0, sizeof(*u));
    switch (be16(f + 12)) {
    case 0x0800: {
        if (got < ETH_LEN + V4_LEN + UDP_LEN || ip[0] != 0x45 || ip[8] == 0 || ip[9] != 17)
            return 0;
        uint16_t total = be16(ip + 2);
        if ((be16(ip + 6) & 0x3fff) != 0 || total < V4_LEN + UDP_LEN ||
            ETH_LEN + (uint32_t)total > flen)
            return 0;
        u->l4 = ETH_LEN + V4_LEN;
        u->ulen = be16(f + u->l4 + 4);
        if (u->ulen < UDP_LEN || u->ulen > total - V4_LEN)
            return 0;
        memcpy(u->src, ip + 12, 4);
        memcpy(u->dst, ip + 16, 4);
        break;
    }
    case 0x86dd: {
        if (got < ETH_LEN + V6_LEN + UDP_LEN || ip[0] >> 4 != 6 || ip[6] != 17 || ip[7] == 0)
            return 0;
        uint16_t plen = be16(ip + 4);
        if (plen < UDP_LEN || ETH_LEN + V6_LEN + (uint32_t)plen > flen)
            return 0;
        u->v6 = 1;
        u->l4 = ETH_LEN + V6_LEN;
        u->ulen = be16(f + u->l4 + 4);
        if (u->ulen < UDP_LEN || u->ulen > plen)
            return 0;
        memcpy(u->src, ip + 8, 16);
        memcpy(u->dst, ip + 24, 16);
        break;
    }
    default:
        return 0;
    }
    u->sport = be16(f + u->l4);
    u->dport = be16(f + u->l4 + 2);
    return 1;
}

/* Checksums of a fast-path frame (f: its first bytes; payload: the UDP payload). */
static int checksums_ok(const uint8_t *f, const struct udp_frame *u, const struct iovec *payload,
                        uint32_t npayload, int needs_csum)
{
    const uint8_t *ip = f + ETH_LEN, *udp = f + u->l4;
    if (!u->v6 && ns_fold(ns_sum_le(ip, V4_LEN, 0)) != 0xffff)
        return 0;
    if (needs_csum)  /* the guest left the UDP checksum to us (partial) */
        return 1;
    if (be16(udp + 6) == 0)
        return !u->v6;  /* "no checksum" exists only in IPv4 */
    uint64_t acc = sum_pseudo(ip, u->v6, u->ulen);
    acc = ns_sum_le(udp, UDP_LEN, acc);
    acc = ns_sum_iov(payload, npayload, u->ulen - UDP_LEN, acc);
    return ns_fold(acc) == 0xffff;
}

/* Datagrams waiting to go out on one socket, their iovecs in the caller's
 * array at [0, niov). */
struct tx_run {
    int fd;
    uint32_t n;
    uint32_t niov;
    struct mmsghdr msgs[TX_RUN];
    uint16_t slot[TX_RUN];
    uint32_t payload[TX_RUN];
    uint32_t frame[TX_RUN];
};

static void run_flush(struct tx_run *r, struct tn_utable *t, struct tn_batch *b)
{
    uint32_t i = 0;
    while (i < r->n) {  /* every pass settles at least one datagram */
        int k = sendmmsg(r->fd, r->msgs + i, r->n - i, MSG_DONTWAIT);
        if (k > 0) {
            for (uint32_t j = i; j < i + (uint32_t)k; j++) {
                struct tn_uflow *f = &t->flows[r->slot[j]];
                f->tx_packets++;
                f->tx_bytes += r->payload[j];
                b->packets++;
                b->bytes += r->frame[j];
            }
            count(&t->tx_fast, (uint32_t)k);
            i += (uint32_t)k;
            continue;
        }
        int e = k < 0 ? errno : EIO;
        uint32_t lost = 1;
        b->last_errno = e;
        if (e == EAGAIN || e == EWOULDBLOCK)
            lost = r->n - i;  /* the socket is full: the rest would block as well */
        else if (e != ENOBUFS && e != EINTR)
            tn_uflow_flag_err(t, r->slot[i]);
        b->drops_io += lost;
        count(&t->tx_dropped, lost);
        i += lost;
    }
    r->n = 0;
    r->niov = 0;
}

/* Hand a whole frame (after the virtio-net header) to Python. 0: no room. */
static int to_slow(struct tn_slow *slow, const struct iovec *iov, uint32_t n, uint32_t hdr_len,
                   uint32_t flen, uint8_t pair, uint8_t flags)
{
    if (slow->n >= TN_SLOW_FRAMES || slow->used > TN_SLOW_BYTES ||
        flen > TN_SLOW_BYTES - slow->used)
        return 0;
    uint32_t got = ns_iov_get(iov, n, hdr_len, slow->data + slow->used, flen);
    slow->off[slow->n] = slow->used;
    slow->len[slow->n] = got;
    slow->pair[slow->n] = pair;
    slow->flags[slow->n] = flags;
    slow->n++;
    slow->used += got;
    return 1;
}

/* A guest datagram for a flow homed on another pair: the flow moves here. */
static void follow(struct tn_utable *t, int slot, uint8_t pair)
{
    if (__atomic_load_n(&t->flows[slot].pair, __ATOMIC_RELAXED) == pair)
        return;
    pthread_mutex_lock(&locks(t)->move);
    if (tn_uflow_move_locked(t, slot, pair) < 0)
        count(&t->epoll_errors, 1);
    pthread_mutex_unlock(&locks(t)->move);
}

/* End the TCP run (tn_tcp_run_flush) before any later chain is used.  When
 * the socket refused its tail, those chains and the `extra` ones popped after
 * them are rewound (the next batch hands them to Python): 1, stop the batch. */
static int tcp_end(struct tn_utable *t, struct tn_tcp_run *trun, struct tn_vq *vq,
                   struct tn_tcp_acks *acks, struct tn_batch *b, int *done, uint16_t extra)
{
    if (trun->n == 0)
        return 0;
    uint64_t unbytes;
    uint32_t back = tn_tcp_run_flush(t->tcp, trun, vq, acks, &unbytes);
    if (back == 0)
        return 0;
    tn_vq_rewind(vq, (uint16_t)(back + extra));
    *done -= (int)back;
    b->packets -= back;
    b->bytes -= unbytes;
    return 1;
}

static int user_tx(struct tn_vq *vq, const struct tn_mem *m, uint32_t hdr_len, uint32_t max,
                   struct tn_utable *t, uint8_t pair, struct tn_slow *slow, struct tn_batch *b,
                   struct tn_tcp_acks *acks, struct tn_tcp_run *trun)
{
    struct iovec iov[TN_MAX_CHAIN_IOV];
    struct tx_run run = {.fd = -1};
    uint8_t h[VNET_HDR_MAX + TX_HDRS_MAX];
    uint64_t now = tn_flow_now();
    int done = 0;
    memset(b, 0, sizeof(*b));
    slow->full = 0;
    if (pair >= TN_UFLOW_PAIRS) {
        b->last_errno = EINVAL;
        return 0;
    }
    /* each pass pops a chain (done grows) or empties the run (and the next
     * pass pops from an empty iovec array, which ends or completes a chain) */
    for (uint64_t pass = 0; pass < 2ull * max + 2 && (uint32_t)done < max; pass++) {
        uint32_t start = run.niov, niov = run.niov, nread, rl, wl;
        uint16_t head;
        int rc = tn_vq_pop_iov(vq, m, DIR_READ, iov, TN_MAX_CHAIN_IOV, &niov, &nread, &rl, &wl,
                               &head);
        if (rc < 0) {
            tcp_end(t, trun, vq, acks, b, &done, 0);
            run_flush(&run, t, b);
            if (done)
                tn_vq_publish(vq);
            return rc;
        }
        if (rc == 0) {
            if (start > 0) {  /* out of iovec room, perhaps not of chains */
                run_flush(&run, t, b);
                continue;
            }
            b->ring_empty = 1;
            break;
        }
        struct iovec *ch = iov + start;
        uint32_t nch = niov - start;
        if (rl < hdr_len + ETH_LEN || rl > TN_MAX_FRAME) {
            if (tcp_end(t, trun, vq, acks, b, &done, 1))
                break;
            b->drops_bad_frame++;
            tn_vq_push(vq, head, 0);
            done++;
            continue;
        }
        uint32_t flen = rl - hdr_len;
        uint32_t want = hdr_len + TX_HDRS_MAX < sizeof(h) ? hdr_len + TX_HDRS_MAX : sizeof(h);
        uint32_t got = tn_iov_to_buf(ch, nch, h, want < rl ? want : rl);
        uint8_t flags = hdr_len >= 1 ? h[0] : 0, gso = hdr_len >= 2 ? h[1] : 0;
        struct udp_frame u;
        int slot = -1;
        if (hdr_len <= VNET_HDR_MAX && gso == 0 && parse_udp(h + hdr_len, got - hdr_len, flen, &u))
            slot = find(t, u.v6, u.src, u.dst, u.sport, u.dport);
        int joined = 0;  /* TCP data of the fast path: into the run, sent when it ends */
        /* TCP: plain segments, and a TSO guest's GSO frames (many segments'
         * payload at once, checksum partial), taken whole */
        int tcp_gso = (gso & 0x7f) == VNET_GSO_TCPV4 || (gso & 0x7f) == VNET_GSO_TCPV6;
        if (slot < 0 && (gso == 0 || tcp_gso) && t->tcp != NULL) {
            joined = tn_tcp_tx_join(t->tcp, trun, acks, ch, nch, h, got, hdr_len, flen, flags, pair,
                                    head);
            if (joined == 2) {
                if (tcp_end(t, trun, vq, acks, b, &done, 1))
                    break;
                joined = tn_tcp_tx_join(t->tcp, trun, acks, ch, nch, h, got, hdr_len, flen, flags,
                                        pair, head);
            }
        }
        if (joined == 1 || joined == 3) {  /* 3: a guest ACK, done with */
            if (joined == 3)
                tn_vq_push(vq, head, 0);
            b->packets++;
            b->bytes += flen;
            done++;
            continue;
        }
        if (tcp_end(t, trun, vq, acks, b, &done, 1))
            break;
        if (slot < 0) {
            if (!to_slow(slow, ch, nch, hdr_len, flen, pair, flags)) {
                tn_vq_rewind(vq, 1);  /* Python drains slow and calls again */
                slow->full = 1;
                break;
            }
            count(&t->tx_slow, 1);
            b->packets++;
            b->bytes += flen;
            tn_vq_push(vq, head, 0);
            done++;
            continue;
        }
        /* the payload, in place: skip headers, trim to the UDP length */
        struct iovec *pl = ch;
        uint32_t npl = ns_iov_window(ch, nch, hdr_len + u.l4 + UDP_LEN, u.ulen - UDP_LEN, ch, nch);
        tn_vq_push(vq, head, 0);
        done++;
        if (!checksums_ok(h + hdr_len, &u, pl, npl, flags & VNET_F_NEEDS_CSUM)) {
            b->drops_bad_frame++;
            count(&t->tx_bad_csum, 1);
            continue;
        }
        struct tn_uflow *f = &t->flows[slot];
        spoke(f, TN_UFLOW_GUEST_SPOKE);
        f->last_active = now;
        follow(t, slot, pair);
        if (run.n > 0 && (run.fd != f->fd || run.n >= TX_RUN)) {
            run_flush(&run, t, b);
            memmove(iov, pl, npl * sizeof(*pl));  /* keep this one's iovecs at the front */
            pl = iov;
        }
        run.fd = f->fd;
        struct msghdr *mh = &run.msgs[run.n].msg_hdr;
        memset(mh, 0, sizeof(*mh));
        mh->msg_iov = pl;
        mh->msg_iovlen = npl;
        run.slot[run.n] = (uint16_t)slot;
        run.payload[run.n] = u.ulen - UDP_LEN;
        run.frame[run.n] = flen;
        run.n++;
        run.niov = (uint32_t)(pl - iov) + npl;
    }
    if (tcp_end(t, trun, vq, acks, b, &done, 0))
        b->ring_empty = 0;  /* the rewound chains are waiting */
    run_flush(&run, t, b);
    if (done)
        tn_vq_publish(vq);
    return done;
}

int tn_user_tx(struct tn_vq *vq, const struct tn_mem *m, uint32_t hdr_len, uint32_t max,
               struct tn_utable *t, uint8_t pair, struct tn_slow *slow, struct tn_batch *b)
{
    struct tn_tcp_acks acks;
    struct tn_tcp_run trun;
    acks.n = 0;
    trun.c = NULL;
    trun.n = trun.npl = trun.bytes = 0;
    read_lock(t);
    int rc = user_tx(vq, m, hdr_len, max, t, pair, slow, b, &acks, &trun);
    if (acks.n > 0)
        tn_tcp_acks_flush(t->tcp, &acks, pair);  /* one ACK per connection per batch */
    unlock(t);
    return rc;
}
