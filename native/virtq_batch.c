/* trionet's native ring core, the batched paths (see virtq.h): copies
 * between a chain and flat memory, the RX building blocks (tn_rx_gather,
 * tn_rx_finish), and the per-packet paths of the tap and loop backends
 * (tn_rx_fill, tn_tx_to_fd, tn_rx_from_fd and the receive filter,
 * tn_loop_batch).  The rings themselves are in virtq.c. */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "virtq.h"

/* tn_vq_pop_iov's dir (as in virtq.c) */
#define DIR_READ 0
#define DIR_WRITE 1

/* ---- copies -------------------------------------------------------------- */

uint32_t tn_iov_to_buf(const struct iovec *iov, uint32_t n, uint8_t *dst, uint32_t cap)
{
    uint32_t done = 0;
    for (uint32_t i = 0; i < n && done < cap; i++) {
        size_t c = iov[i].iov_len < cap - done ? iov[i].iov_len : cap - done;
        memcpy(dst + done, iov[i].iov_base, c);
        done += (uint32_t)c;
    }
    return done;
}

uint32_t tn_buf_to_iov(const struct iovec *iov, uint32_t n, const uint8_t *src, uint32_t len)
{
    uint32_t done = 0;
    for (uint32_t i = 0; i < n && done < len; i++) {
        size_t c = iov[i].iov_len < len - done ? iov[i].iov_len : len - done;
        memcpy(iov[i].iov_base, src + done, c);
        done += (uint32_t)c;
    }
    return done;
}

/* Write num_buffers (u16 at offset 10 of the 12-byte header) through iovecs. */
static void set_num_buffers(const struct iovec *iov, uint32_t n, uint16_t value)
{
    uint8_t bytes[2];
    memcpy(bytes, &value, 2);
    uint32_t off = 10;
    for (uint32_t i = 0, k = 0; i < n && k < 2; i++) {
        size_t l = iov[i].iov_len;
        while (off < l && k < 2)
            ((uint8_t *)iov[i].iov_base)[off++] = bytes[k++];
        off = off >= l ? off - (uint32_t)l : off;
    }
}

/* Pop writable chains into s->iov from iov0 (s->heads, s->caps from chain0)
 * until their room reaches need (or, without MRG_RXBUF, exactly one chain).
 * Returns chains popped (0: not enough room, those popped rewound) or TN_E_*. */
int tn_rx_gather_at(struct tn_vq *vq, const struct tn_mem *m, int mrg, uint32_t need,
                    struct tn_scratch *s, uint32_t chain0, uint32_t iov0, uint32_t *niov,
                    uint64_t *room)
{
    uint32_t nchains = 0;
    int exhausted = 0;  /* stopped because the driver had made no more available */
    *niov = 0;
    *room = 0;
    if (chain0 >= 256 || iov0 >= TN_MAX_CHAIN_IOV)
        return 0;  /* the scratch is full: the caller lays what it has */
    while (*room < need || nchains == 0) {
        uint32_t nread, rl, wl;
        uint16_t head;
        if (chain0 + nchains >= 256)
            break;
        int pending = tn_vq_pending(vq);
        if (pending < 0)
            return pending;
        if (pending == 0) {
            exhausted = 1;
            break;
        }
        int rc = tn_vq_pop_iov(vq, m, DIR_WRITE, s->iov + iov0, TN_MAX_CHAIN_IOV - iov0, niov,
                               &nread, &rl, &wl, &head);
        if (rc < 0)
            return rc;
        if (rc == 0)
            break;
        s->heads[chain0 + nchains] = head;
        s->caps[chain0 + nchains] = wl;
        nchains++;
        *room += wl;
        if (!mrg)
            break;
    }
    if (nchains == 0 || *room < need) {
        /* Only buffers past those looked at can help.  Stopped at a limit
         * (one chain without MRG_RXBUF, 256 chains, iovec space), more
         * buffers cannot help either: record everything as looked at. */
        vq->short_at = exhausted ? vq->last_avail : tn_vq_avail_idx(vq);
        tn_vq_rewind(vq, (uint16_t)nchains);
        vq->short_from = vq->last_avail;
        vq->short_valid = 1;
        return 0;
    }
    vq->short_valid = 0;
    return (int)nchains;
}

int tn_rx_gather(struct tn_vq *vq, const struct tn_mem *m, int mrg, uint32_t need,
                 struct tn_scratch *s, uint32_t *niov, uint64_t *room)
{
    return tn_rx_gather_at(vq, m, mrg, need, s, 0, 0, niov, room);
}

/* Complete a received frame of len bytes laid into the chains of s from
 * chain0 (its iovecs from iov0). */
void tn_rx_finish_at(struct tn_vq *vq, int nchains, uint32_t len, uint32_t hdr_len,
                     struct tn_scratch *s, uint32_t chain0, uint32_t iov0, uint32_t niov)
{
    uint32_t left = len, used = 0;
    while (used < (uint32_t)nchains && (left > 0 || used == 0)) {
        uint32_t take = left < s->caps[chain0 + used] ? left : s->caps[chain0 + used];
        tn_vq_push(vq, s->heads[chain0 + used], take);
        left -= take;
        used++;
    }
    if (hdr_len >= 12)
        set_num_buffers(s->iov + iov0, niov, (uint16_t)used);
    tn_vq_rewind(vq, (uint16_t)(nchains - (int)used));
}

void tn_rx_finish(struct tn_vq *vq, int nchains, uint32_t len, uint32_t hdr_len,
                  struct tn_scratch *s, uint32_t niov)
{
    tn_rx_finish_at(vq, nchains, len, hdr_len, s, 0, 0, niov);
}

/* Lay one frame into the RX ring without publishing (callers publish once). */
static int rx_put(struct tn_vq *vq, const struct tn_mem *m, int mrg, uint32_t hdr_len,
                  const uint8_t *frame, uint32_t len, struct tn_scratch *s)
{
    uint32_t niov;
    uint64_t room;
    int n = tn_rx_gather(vq, m, mrg, len, s, &niov, &room);
    if (n <= 0)
        return n;
    tn_buf_to_iov(s->iov, niov, frame, len);
    tn_rx_finish(vq, n, len, hdr_len, s, niov);
    return 1;
}

/* Lay up to max copies of one frame (virtio-net header included) into the RX
 * ring and publish once: the loop backend's generator, and the shape a source
 * of host-side frames uses.  b->ring_full when the ring ran out of room. */
int tn_rx_fill(struct tn_vq *vq, const struct tn_mem *m, int mrg, uint32_t hdr_len,
               const uint8_t *frame, uint32_t len, uint32_t max, struct tn_scratch *s,
               struct tn_batch *b)
{
    int done = 0;
    memset(b, 0, sizeof(*b));
    if (len < hdr_len || len > TN_MAX_FRAME)
        return 0;
    while ((uint32_t)done < max) {
        int rc = rx_put(vq, m, mrg, hdr_len, frame, len, s);
        if (rc < 0) {
            if (done > 0)
                tn_vq_publish(vq);
            return rc;
        }
        if (rc == 0) {
            b->ring_full = 1;
            break;
        }
        done++;
        b->packets++;
        b->bytes += len - hdr_len;
    }
    if (done > 0)
        tn_vq_publish(vq);
    return done;
}

/* Record the flow of a transmitted frame: replies go back on this pair. */
static void note_flow(struct tn_flows *flows, const struct iovec *iov, uint32_t niov,
                      uint32_t hdr_len, uint8_t pair, uint64_t now)
{
    uint8_t head[128];
    if (flows == NULL)
        return;
    if (niov == 1 || iov[0].iov_len >= sizeof(head)) {  /* headers in place: no copy */
        tn_flow_note(flows, tn_flow_hash(iov[0].iov_base, (uint32_t)iov[0].iov_len, hdr_len),
                     pair, now);
        return;
    }
    uint32_t got = tn_iov_to_buf(iov, niov, head, sizeof(head));
    tn_flow_note(flows, tn_flow_hash(head, got, hdr_len), pair, now);
}

int tn_tx_to_fd(struct tn_vq *vq, const struct tn_mem *m, int fd, uint32_t hdr_len,
                uint32_t max, struct tn_batch *b, struct tn_flows *flows, uint8_t pair)
{
    struct iovec iov[TN_MAX_CHAIN_IOV];
    int done = 0;
    uint64_t now = flows != NULL ? tn_flow_now() : 0;
    memset(b, 0, sizeof(*b));
    while ((uint32_t)done < max) {
        uint32_t niov = 0, nread, rl, wl;
        uint16_t head;
        int rc = tn_vq_pop_iov(vq, m, DIR_READ, iov, TN_MAX_CHAIN_IOV, &niov, &nread, &rl, &wl, &head);
        if (rc < 0) {
            if (done)
                tn_vq_publish(vq);
            return rc;
        }
        if (rc == 0) {
            b->ring_empty = 1;
            break;
        }
        if (rl < hdr_len || rl > TN_MAX_FRAME) {
            b->drops_bad_frame++;
        } else {
            /* one buffer (the usual shape: header and frame together) skips
             * writev's iovec import */
            ssize_t w = niov == 1 ? write(fd, iov[0].iov_base, iov[0].iov_len)
                                  : writev(fd, iov, (int)niov);
            if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                tn_vq_rewind(vq, 1);
                b->fd_blocked = 1;
                break;
            }
            if (w < 0) {
                b->last_errno = errno;
                if (errno == EINVAL)
                    b->drops_bad_frame++;
                else
                    b->drops_io++;
            } else {
                b->packets++;
                b->bytes += rl - hdr_len;
                note_flow(flows, iov, niov, hdr_len, pair, now);
            }
        }
        tn_vq_push(vq, head, 0);
        done++;
    }
    if (done)
        tn_vq_publish(vq);
    return done;
}

static int mac_in(const uint8_t (*table)[6], uint32_t n, const uint8_t *dst)
{
    for (uint32_t i = 0; i < n && i < 64; i++)
        if (memcmp(table[i], dst, 6) == 0)
            return 1;
    return 0;
}

int tn_rxfilter_accepts(const struct tn_rxfilter *f, const uint8_t *dst)
{
    static const uint8_t bcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    if (f == NULL || f->promisc)
        return 1;
    if (memcmp(dst, bcast, 6) == 0)
        return !f->nobcast;
    if (dst[0] & 1)
        return !f->nomulti && (f->allmulti || mac_in(f->multi, f->nmulti, dst));
    if (f->nouni)
        return 0;
    return f->alluni || (f->has_mac && memcmp(dst, f->mac, 6) == 0) || mac_in(f->uni, f->nuni, dst);
}

/* Destination MAC of a frame laid into iovecs after hdr_len header bytes. */
static int frame_dst(const struct iovec *iov, uint32_t n, uint32_t hdr_len, uint8_t *dst)
{
    uint8_t head[32];
    uint32_t got = tn_iov_to_buf(iov, n, head, hdr_len + 6 <= sizeof(head) ? hdr_len + 6 : 0);
    if (got < hdr_len + 6)
        return 0;
    memcpy(dst, head + hdr_len, 6);
    return 1;
}

int tn_rx_from_fd(struct tn_vq *vq, const struct tn_mem *m, int fd, int mrg, uint32_t hdr_len,
                  uint32_t need, uint32_t max, struct tn_scratch *s, struct tn_batch *b,
                  const struct tn_rxfilter *filter)
{
    int done = 0;
    memset(b, 0, sizeof(*b));
    /* every frame read counts toward max, delivered or not: a flood of
     * refused frames must not keep this call from returning */
    for (uint32_t reads = 0; reads < max; reads++) {
        uint32_t niov;
        uint64_t room;
        int n = tn_rx_gather(vq, m, mrg, mrg ? need : 1, s, &niov, &room);
        if (n < 0) {
            if (done)
                tn_vq_publish(vq);
            return n;
        }
        if (n == 0) {
            b->ring_full = 1;
            break;
        }
        uint32_t cap_iov = niov < 1024 ? niov : 1024;
        ssize_t r = readv(fd, s->iov, (int)cap_iov);
        if (r < 0) {
            tn_vq_rewind(vq, (uint16_t)n);
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                b->fd_blocked = 1;
            } else {
                b->last_errno = errno;
                b->drops_io++;
                /* a hard error on the fd: stop this batch, Python decides */
                b->fd_blocked = 1;
            }
            break;
        }
        if ((uint32_t)r < hdr_len) {
            tn_vq_rewind(vq, (uint16_t)n);
            b->drops_bad_frame++;
            continue;
        }
        uint8_t dst[6];
        if (filter != NULL && frame_dst(s->iov, niov, hdr_len, dst) &&
            !tn_rxfilter_accepts(filter, dst)) {
            tn_vq_rewind(vq, (uint16_t)n);  /* the buffers are reused, nothing published */
            b->drops_filtered++;
            continue;
        }
        tn_rx_finish(vq, n, (uint32_t)r, hdr_len, s, niov);
        b->packets++;
        b->bytes += (uint64_t)r - hdr_len;
        done++;
    }
    if (done)
        tn_vq_publish(vq);
    return done;
}

int tn_loop_batch(struct tn_vq *tx, struct tn_vq *rx, const struct tn_mem *m, int mrg,
                  uint32_t hdr_len, uint32_t max, struct tn_scratch *s, struct tn_batch *tb,
                  struct tn_batch *rb, struct tn_flows *flows, uint8_t pair)
{
    uint64_t now = flows != NULL ? tn_flow_now() : 0;
    struct iovec iov[TN_MAX_CHAIN_IOV];
    int done = 0, delivered = 0;
    memset(tb, 0, sizeof(*tb));
    memset(rb, 0, sizeof(*rb));
    int rx_ok = rx != NULL && rx->desc != NULL && !rx->broken;
    while ((uint32_t)done < max) {
        uint32_t niov = 0, nread, rl, wl;
        uint16_t head;
        int rc = tn_vq_pop_iov(tx, m, DIR_READ, iov, TN_MAX_CHAIN_IOV, &niov, &nread, &rl, &wl, &head);
        if (rc < 0) {
            done = rc;
            break;
        }
        if (rc == 0) {
            tb->ring_empty = 1;
            break;
        }
        if (rl < hdr_len || rl > TN_MAX_FRAME) {
            tb->drops_bad_frame++;
        } else {
            uint32_t len = tn_iov_to_buf(iov, niov, s->frame, TN_MAX_FRAME);
            if (flows != NULL)
                tn_flow_note(flows, tn_flow_hash(s->frame, len, hdr_len), pair, now);
            tb->packets++;
            tb->bytes += len - hdr_len;
            int put = rx_ok ? rx_put(rx, m, mrg, hdr_len, s->frame, len, s) : 0;
            if (put < 0) {
                rx_ok = 0;
                rb->last_errno = put;
                rb->drops_no_buffer++;
            } else if (put == 0) {
                rb->drops_no_buffer++;
                rb->ring_full = 1;
            } else {
                rb->packets++;
                rb->bytes += len - hdr_len;
                delivered++;
            }
        }
        tn_vq_push(tx, head, 0);
        done++;
    }
    if (done > 0 || tx->used_idx != tn_vq_used_idx_in_ring(tx))
        tn_vq_publish(tx);
    if (delivered)
        tn_vq_publish(rx);  /* once per batch, not once per frame */
    return done;
}
