/* The driver half of a namespace's virtio-net device: see nsdrv.h. */
#include "nsdrv.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#define DESC_F_WRITE 2
#define USED_F_NO_NOTIFY 1

struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct used_elem {
    uint32_t id;
    uint32_t len;
};

struct ring {
    struct desc *desc;
    uint16_t *avail;          /* [0] flags, [1] idx, [2..] ring */
    uint16_t *used;           /* [0] flags, [1] idx, then used_elem[] */
    uint64_t bufs;
    uint16_t avail_idx;       /* ours, published with release */
    uint16_t last_used;
};

static struct used_elem *used_ring(struct ring *r) { return (struct used_elem *)(r->used + 2); }

static uint16_t used_idx(struct ring *r) { return __atomic_load_n(&r->used[1], __ATOMIC_ACQUIRE); }

static void post(struct ring *r, uint32_t qsize, uint16_t id)
{
    r->avail[2 + (r->avail_idx & (qsize - 1))] = id;
    r->avail_idx++;
}

/* Publish what was posted; kick unless the device said it polls. */
static int publish(struct tn_nsdrv *d, struct ring *r, int kick_fd)
{
    __atomic_store_n(&r->avail[1], r->avail_idx, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(&r->used[0], __ATOMIC_ACQUIRE) & USED_F_NO_NOTIFY)
        return 0;
    uint64_t one = 1;
    if (write(kick_fd, &one, 8) < 0 && errno != EAGAIN)
        return -errno;
    d->stats.kicks++;
    return 0;
}

static int fits(const struct tn_nsdrv *d, uint64_t off, uint64_t len)
{
    return off <= d->size && len <= d->size - off;
}

int tn_nsdrv_check(const struct tn_nsdrv *d)
{
    uint64_t q = d->qsize;
    if (!d->base || q == 0 || q > 32768 || (q & (q - 1)) || d->buf_size < 64 || d->batch == 0)
        return -EINVAL;
    if (!fits(d, d->tx_desc, 16 * q) || !fits(d, d->rx_desc, 16 * q) ||
        !fits(d, d->tx_avail, 6 + 2 * q) || !fits(d, d->rx_avail, 6 + 2 * q) ||
        !fits(d, d->tx_used, 6 + 8 * q) || !fits(d, d->rx_used, 6 + 8 * q) ||
        !fits(d, d->tx_bufs, q * d->buf_size) || !fits(d, d->rx_bufs, q * d->buf_size))
        return -EINVAL;
    if (d->tap_fd < 0 || d->tx_kick < 0 || d->tx_call < 0 || d->rx_kick < 0 || d->rx_call < 0 ||
        d->stop_fd < 0)
        return -EINVAL;
    return 0;
}

static void drain_eventfd(int fd)
{
    uint64_t v;
    while (read(fd, &v, 8) == 8) {
    }
}

/* RX ring -> tap: every used buffer written out and posted again. */
static int rx_to_tap(struct tn_nsdrv *d, struct ring *rx, int *progress)
{
    uint32_t q = d->qsize;
    uint16_t end = used_idx(rx);
    if (end == rx->last_used)
        return 0;
    while (rx->last_used != end) {
        struct used_elem e = used_ring(rx)[rx->last_used & (q - 1)];
        rx->last_used++;
        if (e.id >= q)
            return -EPROTO;
        uint32_t len = e.len < d->buf_size ? e.len : d->buf_size;
        if (write(d->tap_fd, d->base + rx->bufs + (uint64_t)e.id * d->buf_size, len) < 0) {
            if (errno == EINTR) {
                rx->last_used--;
                continue;
            }
            d->stats.rx_errors++;
        } else {
            d->stats.rx_frames++;
            d->stats.rx_bytes += len;
        }
        rx->desc[e.id].len = d->buf_size;
        rx->desc[e.id].flags = DESC_F_WRITE;
        post(rx, q, (uint16_t)e.id);
    }
    *progress = 1;
    return publish(d, rx, d->rx_kick);
}

/* TX used entries: their buffers are free again. */
static int tx_reclaim(struct tn_nsdrv *d, struct ring *tx, uint16_t *free_ids, uint32_t *nfree)
{
    uint32_t q = d->qsize;
    uint16_t end = used_idx(tx);
    while (tx->last_used != end) {
        uint32_t id = used_ring(tx)[tx->last_used & (q - 1)].id;
        tx->last_used++;
        if (id >= q || *nfree >= q)
            return -EPROTO;
        free_ids[(*nfree)++] = (uint16_t)id;
    }
    return 0;
}

/* tap -> TX ring: up to batch frames read into free buffers and posted. */
static int tap_to_tx(struct tn_nsdrv *d, struct ring *tx, uint16_t *free_ids, uint32_t *nfree,
                     int *progress)
{
    uint32_t n = 0;
    while (*nfree > 0 && n < d->batch) {
        uint16_t id = free_ids[*nfree - 1];
        ssize_t r = read(d->tap_fd, d->base + tx->bufs + (uint64_t)id * d->buf_size, d->buf_size);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                break;
            if (errno == EFAULT || errno == EINVAL || errno == EMSGSIZE) {
                /* the frame did not fit (the kernel dropped it): count it */
                d->stats.tx_errors++;
                continue;
            }
            return -errno;
        }
        if (r == 0)
            break;
        (*nfree)--;
        tx->desc[id].len = (uint32_t)r;
        tx->desc[id].flags = 0;
        post(tx, d->qsize, id);
        d->stats.tx_frames++;
        d->stats.tx_bytes += (uint64_t)r;
        n++;
    }
    if (n == 0)
        return 0;
    *progress = 1;
    return publish(d, tx, d->tx_kick);
}

/* A ring as the front end laid it out: empty, its indexes 0. */
static struct ring ring_of(struct tn_nsdrv *d, uint64_t desc, uint64_t avail, uint64_t used,
                           uint64_t bufs)
{
    return (struct ring){
        .desc = (struct desc *)(d->base + desc),
        .avail = (uint16_t *)(d->base + avail),
        .used = (uint16_t *)(d->base + used),
        .bufs = bufs,
    };
}

static int watch(int ep, int op, int fd, uint32_t events)
{
    struct epoll_event ev = {.events = events, .data.fd = fd};
    return epoll_ctl(ep, op, fd, &ev) < 0 ? -errno : 0;
}

int tn_nsdrv_run(struct tn_nsdrv *d)
{
    int rc = tn_nsdrv_check(d);
    if (rc < 0)
        return rc;
    uint32_t q = d->qsize;
    struct ring tx = ring_of(d, d->tx_desc, d->tx_avail, d->tx_used, d->tx_bufs);
    struct ring rx = ring_of(d, d->rx_desc, d->rx_avail, d->rx_used, d->rx_bufs);
    uint16_t *free_ids = calloc(q, sizeof *free_ids);
    if (!free_ids)
        return -ENOMEM;
    /* The rings start empty (one run per layout): every TX buffer is free,
     * every RX buffer is posted now. */
    uint32_t nfree = 0;
    for (uint32_t i = 0; i < q; i++) {
        tx.desc[i].addr = tx.bufs + (uint64_t)i * d->buf_size;
        free_ids[nfree++] = (uint16_t)i;
    }
    tx.avail[0] = 0;  /* interrupts wanted: they are our wake-ups */
    rx.avail[0] = 0;
    for (uint32_t i = 0; i < q; i++) {
        rx.desc[i].addr = rx.bufs + (uint64_t)i * d->buf_size;
        rx.desc[i].len = d->buf_size;
        rx.desc[i].flags = DESC_F_WRITE;
        post(&rx, q, (uint16_t)i);
    }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) {
        free(free_ids);
        return -errno;
    }
    rc = watch(ep, EPOLL_CTL_ADD, d->stop_fd, EPOLLIN);
    if (!rc) rc = watch(ep, EPOLL_CTL_ADD, d->tx_call, EPOLLIN);
    if (!rc) rc = watch(ep, EPOLL_CTL_ADD, d->rx_call, EPOLLIN);
    if (!rc) rc = watch(ep, EPOLL_CTL_ADD, d->tap_fd, EPOLLIN);
    if (!rc) rc = publish(d, &rx, d->rx_kick);
    int tap_watched = 1;
    while (!rc) {
        int progress = 0;
        rc = tx_reclaim(d, &tx, free_ids, &nfree);
        if (!rc) rc = tap_to_tx(d, &tx, free_ids, &nfree, &progress);
        if (!rc) rc = rx_to_tap(d, &rx, &progress);
        if (rc || progress)
            continue;
        /* Nothing to do: sleep on the calls, the stop fd, and the tap while a
         * TX buffer is free to read it into. */
        int want_tap = nfree > 0;
        if (want_tap != tap_watched) {
            rc = watch(ep, EPOLL_CTL_MOD, d->tap_fd, want_tap ? EPOLLIN : 0);
            tap_watched = want_tap;
            if (rc)
                break;
        }
        struct epoll_event ev[4];
        int n = epoll_wait(ep, ev, 4, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            rc = -errno;
            break;
        }
        d->stats.wakeups++;
        int stop = 0;
        for (int i = 0; i < n; i++) {
            if (ev[i].data.fd == d->stop_fd)
                stop = 1;
            else if (ev[i].data.fd == d->tx_call || ev[i].data.fd == d->rx_call)
                drain_eventfd(ev[i].data.fd);
        }
        if (stop)
            break;
    }
    close(ep);
    free(free_ids);
    return rc;
}
