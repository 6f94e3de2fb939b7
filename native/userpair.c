/* A user-mode queue pair's outbox and worker loop: see userpair.h. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

#include "virtq.h"
#include "userio.h"
#include "worker.h"
#include "userpair.h"
#include "usertcp.h"

#define HEADROOM 64               /* room for the largest virtio-net header userio takes */
#define VNET_F_DATA_VALID 2
#define POLL_MS 5                 /* a ring without a kick fd is polled */

#define COUNT(a) (sizeof(a) / sizeof((a)[0]))
_Static_assert(COUNT(((struct tn_uoutq *)0)->frames) == TN_UOUT_FRAMES, "frames[] size");
_Static_assert(COUNT(((struct tn_uoutq *)0)->len) == TN_UOUT_FRAMES, "len[] size");

/* ---- outbox ------------------------------------------------------------------ */

static pthread_mutex_t *qlock(struct tn_uoutq *q) { return q->lock; }

int tn_uout_init(struct tn_uoutq *q, int wake_fd, uint32_t limit)
{
    if (limit == 0 || limit > TN_UOUT_FRAMES)
        return -EINVAL;
    memset(q, 0, sizeof(*q));
    q->lock = malloc(sizeof(pthread_mutex_t));
    if (q->lock == NULL)
        return -ENOMEM;
    pthread_mutex_init(qlock(q), NULL);
    q->wake_fd = wake_fd;
    q->limit = limit;
    return 0;
}

/* Free one held frame or TCP data entry. */
static void release(uint8_t *buf, uint32_t len)
{
    if (len & TN_UOUT_LAZY)
        tn_tcp_entry_free((struct tn_tcp_entry *)buf);
    else
        free(buf);
}

/* Free the frames held (the caller holds the mutex). */
static void clear(struct tn_uoutq *q)
{
    for (uint32_t i = 0; i < q->n; i++) {
        uint32_t k = (q->head + i) % TN_UOUT_FRAMES;
        release(q->frames[k], q->len[k]);
        q->frames[k] = NULL;
    }
    q->n = 0;
    q->head = 0;
}

void tn_uout_close(struct tn_uoutq *q)
{
    if (q->lock == NULL)
        return;
    clear(q);
    pthread_mutex_destroy(qlock(q));
    free(q->lock);
    q->lock = NULL;
}

void tn_uout_clear(struct tn_uoutq *q)
{
    pthread_mutex_lock(qlock(q));
    clear(q);
    pthread_mutex_unlock(qlock(q));
}

/* Read the wake eventfd if it was written (the caller holds the mutex). */
static void unwake(struct tn_uoutq *q)
{
    if (q->signalled) {
        uint64_t v;
        (void)!read(q->wake_fd, &v, sizeof(v));
        q->signalled = 0;
    }
}

void tn_uout_unwake(struct tn_uoutq *q)
{
    pthread_mutex_lock(qlock(q));
    unwake(q);
    pthread_mutex_unlock(qlock(q));
}

/* Copy frame i out, and with pop drop it (the caller holds the mutex).  A
 * TCP data entry is peeked into buf; one dropped (stale) copies out as 0. */
static int copy_out(struct tn_uoutq *q, uint32_t i, uint8_t *buf, uint32_t cap, int pop)
{
    if (i >= q->n)
        return -1;
    uint32_t k = (q->head + i) % TN_UOUT_FRAMES, len = q->len[k];
    if (len & TN_UOUT_LAZY) {
        int got = tn_tcp_entry_flat((struct tn_tcp_entry *)q->frames[k], buf, cap);
        len = got < 0 ? 0 : (uint32_t)got;
    } else {
        memcpy(buf, q->frames[k] + HEADROOM, len < cap ? len : cap);
    }
    if (pop) {
        release(q->frames[k], q->len[k]);
        q->frames[k] = NULL;
        q->head = (q->head + 1) % TN_UOUT_FRAMES;
        q->n--;
    }
    return (int)len;
}

int tn_uout_get(struct tn_uoutq *q, uint32_t i, uint8_t *buf, uint32_t cap)
{
    pthread_mutex_lock(qlock(q));
    int len = copy_out(q, i, buf, cap, 0);
    pthread_mutex_unlock(qlock(q));
    return len;
}

int tn_uout_pop(struct tn_uoutq *q, uint8_t *buf, uint32_t cap)
{
    pthread_mutex_lock(qlock(q));
    int len = copy_out(q, 0, buf, cap, 1);
    pthread_mutex_unlock(qlock(q));
    return len;
}

/* Write wake_fd once per drain, unless deferred (the caller holds the mutex). */
static void signal_waiting(struct tn_uoutq *q)
{
    if (!q->signalled && !q->deferred) {  /* under the mutex: a drain that clears it sees the write */
        uint64_t one = 1;
        q->signalled = 1;
        (void)!write(q->wake_fd, &one, sizeof(one));
    }
}

void tn_uout_defer(struct tn_uoutq *q, int on)
{
    pthread_mutex_lock(qlock(q));
    q->deferred = on != 0;
    if (q->n > 0)
        signal_waiting(q);
    pthread_mutex_unlock(qlock(q));
}

/* Append a frame (the caller holds the mutex): 0 when full. */
static int append(struct tn_uoutq *q, uint8_t *buf, uint32_t len)
{
    if (q->n >= q->limit) {
        q->dropped++;
        return 0;
    }
    uint32_t k = (q->head + q->n) % TN_UOUT_FRAMES;
    q->frames[k] = buf;
    q->len[k] = len;
    q->n++;
    signal_waiting(q);
    return 1;
}

int tn_uout_put_tcp_locked(struct tn_uoutq *q, struct tn_tcpc *c, uint32_t seq, uint32_t ack,
                           uint16_t window, uint8_t flags, uint32_t len, uint32_t seg,
                           uint32_t mss)
{
    if (len == 0 || mss == 0 || mss > TN_MAX_FRAME || seg < mss)
        return -EINVAL;
    if (seg > mss && seg > TN_TCP_SEG_MAX)
        return -EINVAL;
    int queued = 0;
    for (uint32_t off = 0; off < len; off += seg) {
        uint32_t chunk = len - off < seg ? len - off : seg;
        uint8_t f = off + chunk < len ? (uint8_t)(flags & ~TN_TCP_PSH) : flags;
        uint16_t gso = chunk > mss ? (uint16_t)mss : 0;
        struct tn_tcp_entry *e = tn_tcp_entry_new(c, seq + off, ack, window, f, chunk, gso);
        if (e == NULL)
            return queued ? queued : -ENOMEM;
        if (append(q, (uint8_t *)e, TN_UOUT_LAZY | chunk))
            queued++;
        else
            tn_tcp_entry_free(e);  /* full: counted in dropped, as are the rest */
    }
    return queued;
}

int tn_uout_put_tcp(struct tn_uoutq *q, struct tn_tcpc *c, uint32_t seq, uint32_t ack,
                    uint16_t window, uint8_t flags, uint32_t len, uint32_t seg, uint32_t mss)
{
    pthread_mutex_lock(qlock(q));
    int queued = tn_uout_put_tcp_locked(q, c, seq, ack, window, flags, len, seg, mss);
    pthread_mutex_unlock(qlock(q));
    return queued;
}

int tn_uout_put_locked(struct tn_uoutq *q, const uint8_t *frame, uint32_t len)
{
    if (len == 0 || len > TN_MAX_FRAME)
        return -EINVAL;
    uint8_t *buf = malloc(HEADROOM + (size_t)len);
    if (buf == NULL)
        return -ENOMEM;
    memcpy(buf + HEADROOM, frame, len);
    int ok = append(q, buf, len);
    if (!ok)
        free(buf);
    return ok;
}

int tn_uout_put(struct tn_uoutq *q, const uint8_t *frame, uint32_t len)
{
    pthread_mutex_lock(qlock(q));
    int ok = tn_uout_put_locked(q, frame, len);
    pthread_mutex_unlock(qlock(q));
    return ok;
}

void tn_uout_lock(struct tn_uoutq *q) { pthread_mutex_lock(qlock(q)); }
void tn_uout_unlock(struct tn_uoutq *q) { pthread_mutex_unlock(qlock(q)); }
uint32_t tn_uout_room_locked(const struct tn_uoutq *q) { return q->n < q->limit ? q->limit - q->n : 0; }

uint32_t tn_uout_move(struct tn_uoutq *from, struct tn_uoutq *to)
{
    uint32_t moved = 0;
    if (from == to)
        return 0;
    for (;;) {  /* one frame at a time: never both mutexes at once */
        pthread_mutex_lock(qlock(from));
        if (from->n == 0) {
            pthread_mutex_unlock(qlock(from));
            return moved;
        }
        uint8_t *buf = from->frames[from->head];
        uint32_t len = from->len[from->head];
        from->frames[from->head] = NULL;
        from->head = (from->head + 1) % TN_UOUT_FRAMES;
        from->n--;
        pthread_mutex_unlock(qlock(from));
        pthread_mutex_lock(qlock(to));
        int ok = append(to, buf, len);
        pthread_mutex_unlock(qlock(to));
        if (ok)
            moved++;
        else
            release(buf, len);
    }
}

/* The outbox's entries after its head that continue the head entry's bytes
 * on its connection (q locked): n in all, at most max. */
static uint32_t entry_run(const struct tn_uoutq *q, uint32_t hdr_len, uint32_t max,
                          struct tn_tcp_entry **es)
{
    uint32_t n = 1;
    es[0] = (struct tn_tcp_entry *)q->frames[q->head];
    while (n < max && n < q->n) {
        uint32_t k = (q->head + n) % TN_UOUT_FRAMES, len = q->len[k];
        struct tn_tcp_entry *e = (struct tn_tcp_entry *)q->frames[k], *p = es[n - 1];
        if (!(len & TN_UOUT_LAZY) || (len & ~TN_UOUT_LAZY) > TN_MAX_FRAME - hdr_len ||
            !tn_tcp_entry_follows(e, p))
            break;
        es[n++] = e;
    }
    return n;
}

int tn_uout_drain(struct tn_uoutq *q, struct tn_vq *vq, const struct tn_mem *m, int mrg,
                  uint32_t hdr_len, int data_valid, uint32_t max, struct tn_scratch *s,
                  struct tn_batch *b)
{
    struct tn_batch one;
    struct tn_tcp_entry *es[TN_TCP_LAY_BATCH];
    int laid = 0;
    memset(b, 0, sizeof(*b));
    /* The mutex is held per frame, or per run of one connection's entries
     * laid with one peek: a put waits for one batch at most. */
    for (;;) {
        pthread_mutex_lock(qlock(q));
        unwake(q);
        if (q->n == 0) {
            pthread_mutex_unlock(qlock(q));
            b->fd_blocked = 1;
            break;
        }
        if ((uint32_t)laid >= max) {
            pthread_mutex_unlock(qlock(q));
            break;
        }
        uint8_t *buf = q->frames[q->head];
        uint32_t len = q->len[q->head], taken = 1;
        int rc = 0, drop = hdr_len > HEADROOM || (len & ~TN_UOUT_LAZY) > TN_MAX_FRAME - hdr_len;
        memset(&one, 0, sizeof(one));
        if (!drop && (len & TN_UOUT_LAZY)) {  /* TCP data: peeked from its socket */
            uint32_t left = max - (uint32_t)laid, n, got;
            n = entry_run(q, hdr_len, left < TN_TCP_LAY_BATCH ? left : TN_TCP_LAY_BATCH, es);
            rc = tn_tcp_entries_lay(es, n, vq, m, mrg, hdr_len, data_valid, s, &got, &one.bytes);
            taken = rc > 0 ? (uint32_t)rc : 1;
            one.packets = got;
        } else if (!drop) {
            uint8_t *hdr = buf + HEADROOM - hdr_len;
            memset(hdr, 0, hdr_len);
            if ((data_valid & TN_RX_DATA_VALID) && hdr_len > 0)
                hdr[0] = VNET_F_DATA_VALID;
            rc = tn_rx_fill(vq, m, mrg, hdr_len, hdr, hdr_len + len, 1, s, &one);
        }
        if (rc < 0) {
            pthread_mutex_unlock(qlock(q));
            return rc;
        }
        if (!drop && rc == 0) {
            int pending = tn_vq_pending(vq);
            /* even every buffer the guest can give would not hold it */
            drop = pending >= vq->size || (mrg && pending >= 256);
            if (!drop) {
                pthread_mutex_unlock(qlock(q));
                b->ring_full = 1;
                break;
            }
        }
        uint8_t *gone[TN_TCP_LAY_BATCH];
        uint32_t glen[TN_TCP_LAY_BATCH];
        for (uint32_t i = 0; i < taken; i++) {
            gone[i] = q->frames[q->head];
            glen[i] = q->len[q->head];
            q->frames[q->head] = NULL;
            q->head = (q->head + 1) % TN_UOUT_FRAMES;
            q->n--;
        }
        if (drop)
            q->oversize++;
        pthread_mutex_unlock(qlock(q));
        for (uint32_t i = 0; i < taken; i++)
            release(gone[i], glen[i]);
        if (drop) {
            b->drops_no_buffer++;
            continue;
        }
        /* entries dropped (acknowledged meanwhile, or their connection
         * closed) are counted where they were dropped */
        b->packets += one.packets;
        b->bytes += one.bytes;
        laid += (int)one.packets;
    }
    return laid;
}

/* ---- worker ---------------------------------------------------------------------- */

static void signal_fd(int fd)
{
    uint64_t one = 1;
    (void)!write(fd, &one, sizeof(one));
}

static int drain_fd(const struct pollfd *pf, int i)
{
    uint64_t v;
    if (i < 0 || !(pf[i].revents & POLLIN))
        return 0;
    (void)!read(pf[i].fd, &v, sizeof(v));
    return 1;
}

static void call(struct tn_upair_io *io, struct tn_vq *vq, int fd)
{
    if (fd < 0 || !tn_vq_needs_notify(vq))
        return;
    uint64_t one = 1;
    if (write(fd, &one, sizeof(one)) == sizeof(one))
        io->stats->notifications++;
}

static void add(struct tn_upair_io *io, const struct tn_batch *b, int rx)
{
    struct tn_pair_stats *s = io->stats;
    if (rx) {
        s->rx_packets += b->packets;
        s->rx_bytes += b->bytes;
        s->drops_rx_bad_frame += b->drops_bad_frame;
        s->drops_rx_io += b->drops_io;
    } else {
        s->tx_packets += b->packets;
        s->tx_bytes += b->bytes;
        s->drops_tx_bad_frame += b->drops_bad_frame;
        s->drops_tx_io += b->drops_io;
    }
    s->drops_rx_no_buffer += b->drops_no_buffer;
    s->batches++;
}

static int fail(struct tn_upair_io *io, int ring, int code)
{
    io->error_ring = (uint8_t)ring;
    io->error = code;
    return code;
}

int tn_user_pair_handed(struct tn_upair_io *io)
{
    return (int)__atomic_load_n(&io->handed, __ATOMIC_ACQUIRE);
}

void tn_user_pair_resume(struct tn_upair_io *io)
{
    __atomic_store_n(&io->handed, 0, __ATOMIC_RELEASE);
    signal_fd(io->resume_fd);
}

/* RX: the outbox first, then the flows' datagrams.  Returns frames laid or
 * TN_E_*; *full: the ring had no room; *idle: nothing more to lay now. */
static int serve_rx(struct tn_upair_io *io, int *full, int *idle)
{
    struct tn_batch b;
    int rc = tn_uout_drain(io->out, io->rx, io->mem, io->mrg, io->hdr_len, io->data_valid,
                           io->batch, io->scratch, &b);
    if (rc < 0)
        return rc;
    add(io, &b, 1);
    int done = rc, out_empty = b.fd_blocked;
    *full = b.ring_full;
    *idle = *full;
    if (*full)
        return done;
    rc = tn_user_rx(io->rx, io->mem, io->mrg, io->hdr_len, io->data_valid, io->table, io->pair,
                    io->batch, io->scratch, &b);
    if (rc < 0)
        return rc;
    add(io, &b, 1);
    *full = b.ring_full;
    *idle = *full || (b.fd_blocked && out_empty);
    return done + rc;
}

static int run(struct tn_upair_io *io)
{
    struct tn_batch b;
    struct tn_vq *tx = io->tx, *rx = io->rx;
    int held = 0;       /* slow is Python's */
    int rx_full = 0;    /* waiting for the driver to add RX buffers */
    uint64_t errors = __atomic_load_n(&io->table->sock_errors, __ATOMIC_RELAXED);
    io->error = 0;
    __atomic_store_n(&io->handed, 0, __ATOMIC_RELEASE);
    if (tx != NULL)
        tn_vq_disable_notify(tx);
    if (rx != NULL)
        tn_vq_disable_notify(rx);
    for (;;) {
        int tx_idle = 1, rx_idle = 1;
        if (tx != NULL && !held) {
            int rc = tn_user_tx(tx, io->mem, io->hdr_len, io->batch, io->table, io->pair,
                                io->slow, &b);
            if (rc < 0)
                return fail(io, 0, rc);
            add(io, &b, 0);
            if (rc > 0)
                call(io, tx, io->tx_call);
            if (io->slow->n > 0) {
                held = 1;
                __atomic_store_n(&io->handed, 1, __ATOMIC_RELEASE);
                signal_fd(io->slow_fd);
            }
            tx_idle = held || b.ring_empty;
        }
        if (rx != NULL && !rx_full) {
            int rc = serve_rx(io, &rx_full, &rx_idle);
            if (rc < 0)
                return fail(io, 1, rc);
            if (rc > 0)
                call(io, rx, io->rx_call);
        }
        /* connections either batch listed for Python: guest data sent
         * natively (Python acknowledges it), host data it has to send */
        if (tn_ttable_should_signal(io->table->tcp))
            signal_fd(io->slow_fd);
        uint64_t now = __atomic_load_n(&io->table->sock_errors, __ATOMIC_RELAXED);
        if (now != errors) {  /* some flow's socket has an error for Python to read */
            errors = now;
            signal_fd(io->slow_fd);
        }
        if (!tx_idle || !rx_idle)
            continue;
        /* idle: spin briefly for the driver, then ask for kicks and re-check */
        if (tx != NULL && !held && tn_vq_spin(tx, io->spin_ns))
            continue;
        if (tx != NULL && !held && tn_vq_enable_notify(tx)) {
            tn_vq_disable_notify(tx);
            continue;
        }
        /* a full ring that buffers raced into gets another round: the driver
         * added them before it could see the new avail event, so it will not
         * kick for them.  (The C core remembers how far the last try looked:
         * only buffers added since then count as news, so this cannot spin.) */
        if (rx != NULL && rx_full && tn_vq_enable_notify(rx)) {
            tn_vq_disable_notify(rx);
            rx_full = 0;
            continue;
        }
        struct pollfd pf[6];
        int n = 0, i_txk = -1, i_rxk = -1, i_resume = -1;
        pf[n++] = (struct pollfd){io->stop_fd, POLLIN, 0};
        if (tx != NULL && !held && io->tx_kick >= 0) {
            i_txk = n;
            pf[n++] = (struct pollfd){io->tx_kick, POLLIN, 0};
        }
        if (held) {
            i_resume = n;
            pf[n++] = (struct pollfd){io->resume_fd, POLLIN, 0};
        }
        if (rx != NULL && rx_full && io->rx_kick >= 0) {
            i_rxk = n;
            pf[n++] = (struct pollfd){io->rx_kick, POLLIN, 0};
        }
        if (rx != NULL && !rx_full) {
            pf[n++] = (struct pollfd){io->out->wake_fd, POLLIN, 0};
            pf[n++] = (struct pollfd){io->table->epfd[io->pair], POLLIN, 0};
        }
        int polled = (tx != NULL && !held && io->tx_kick < 0) ||
                     (rx != NULL && rx_full && io->rx_kick < 0);
        int r = poll(pf, (nfds_t)n, polled ? POLL_MS : -1);
        if (r < 0 && errno != EINTR)
            return 0;
        if (pf[0].revents)
            return 0;
        if (drain_fd(pf, i_txk))
            io->stats->kicks++;
        if (tx != NULL && !held)
            tn_vq_disable_notify(tx);
        if (drain_fd(pf, i_resume))
            held = __atomic_load_n(&io->handed, __ATOMIC_ACQUIRE) != 0;
        int rx_kicked = drain_fd(pf, i_rxk);
        if (rx_kicked)
            io->stats->kicks++;
        if (rx_full && (rx_kicked || i_rxk < 0)) {  /* kicked, or polled */
            rx_full = 0;
            tn_vq_disable_notify(rx);
        }
    }
}

int tn_user_pair_run(struct tn_upair_io *io)
{
    /* named for top -H and tests while it serves (the thread is borrowed) */
    char name[16], old[16] = "";
    (void)prctl(PR_GET_NAME, old, 0, 0, 0);
    snprintf(name, sizeof(name), "tn-user-%u", (unsigned)io->pair);
    (void)prctl(PR_SET_NAME, name, 0, 0, 0);
    int rc = run(io);
    (void)prctl(PR_SET_NAME, old, 0, 0, 0);
    return rc;
}
