/* A queue pair's worker loop: see worker.h.  One thread per active pair; it
 * touches only its own rings, scratch and stats (and the shared flow table,
 * whose slots are single-writer-per-flow and tolerate races). */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <unistd.h>

#include "virtq.h"
#include "worker.h"

static void drain(int fd)
{
    uint64_t v;
    if (fd >= 0)
        (void)!read(fd, &v, sizeof(v));
}

/* A kick eventfd that poll() found readable: consume it and count it. */
static int kicked(struct tn_pair_io *io, const struct pollfd *pf, int i, int fd)
{
    if (i < 0 || !(pf[i].revents & POLLIN))
        return 0;
    drain(fd);
    io->stats->kicks++;
    return 1;
}

static void call(struct tn_pair_io *io, struct tn_vq *vq, int fd)
{
    if (fd < 0 || !tn_vq_needs_notify(vq))
        return;
    uint64_t one = 1;
    if (write(fd, &one, sizeof(one)) == sizeof(one))
        io->stats->notifications++;
}

static void add(struct tn_pair_io *io, const struct tn_batch *b, int rx)
{
    struct tn_pair_stats *s = io->stats;
    if (rx) {
        s->rx_packets += b->packets;
        s->rx_bytes += b->bytes;
        s->drops_rx_bad_frame += b->drops_bad_frame;
        s->drops_rx_io += b->drops_io;
        s->drops_rx_filtered += b->drops_filtered;
    } else {
        s->tx_packets += b->packets;
        s->tx_bytes += b->bytes;
        s->drops_tx_bad_frame += b->drops_bad_frame;
        s->drops_tx_io += b->drops_io;
    }
    s->drops_rx_no_buffer += b->drops_no_buffer;
}

static int fail(struct tn_pair_io *io, int ring, int code)
{
    io->error_ring = (uint8_t)ring;
    io->error = code;
    return code;
}

/* Loop backend: TX chains come back on this pair's RX ring; with a generator
 * frame (io->gen) the RX ring is also kept full of copies of it. */
static int run_loop(struct tn_pair_io *io)
{
    struct tn_batch tb, rb;
    int gen = io->gen != NULL && io->rx != NULL;
    int rx_full = 0;
    if (io->tx != NULL)
        tn_vq_disable_notify(io->tx);
    if (gen)
        tn_vq_disable_notify(io->rx);
    for (;;) {
        int tx_idle = 1, rx_idle = 1;
        if (io->tx != NULL) {
            int rc = tn_loop_batch(io->tx, io->rx, io->mem, io->mrg, io->hdr_len, io->batch,
                                   io->scratch, &tb, &rb, io->flows, io->pair);
            io->stats->batches++;
            if (rc < 0)
                return fail(io, 0, rc);
            add(io, &tb, 0);
            add(io, &rb, 1);
            if (rc > 0)
                call(io, io->tx, io->tx_call);
            if (rb.packets)
                call(io, io->rx, io->rx_call);
            if (io->rx != NULL && io->rx->broken)
                return fail(io, 1, io->rx->error);
            tx_idle = tb.ring_empty;
        }
        if (gen && !rx_full) {
            int rc = tn_rx_fill(io->rx, io->mem, io->mrg, io->hdr_len, io->gen, io->gen_len,
                                io->batch, io->scratch, &rb);
            io->stats->batches++;
            if (rc < 0)
                return fail(io, 1, rc);
            add(io, &rb, 1);
            if (rc > 0)
                call(io, io->rx, io->rx_call);
            rx_full = rb.ring_full;
            rx_idle = rx_full;
        }
        if (!tx_idle || !rx_idle)
            continue;
        /* idle: spin briefly for the driver, then ask for kicks and re-check */
        if (io->tx != NULL && tn_vq_spin(io->tx, gen ? 0 : io->spin_ns))
            continue;
        if (gen && tn_vq_spin(io->rx, io->spin_ns)) {
            rx_full = 0;
            continue;
        }
        if (io->tx != NULL && tn_vq_enable_notify(io->tx)) {
            tn_vq_disable_notify(io->tx);
            continue;
        }
        if (gen && tn_vq_enable_notify(io->rx)) {
            tn_vq_disable_notify(io->rx);
            rx_full = 0;
            continue;
        }
        struct pollfd pf[3];
        int n = 0, i_txk = -1, i_rxk = -1;
        pf[n++] = (struct pollfd){io->stop_fd, POLLIN, 0};
        if (io->tx != NULL && io->tx_kick >= 0) {
            i_txk = n;
            pf[n++] = (struct pollfd){io->tx_kick, POLLIN, 0};
        }
        if (gen && io->rx_kick >= 0) {
            i_rxk = n;
            pf[n++] = (struct pollfd){io->rx_kick, POLLIN, 0};
        }
        int polled = (io->tx != NULL && io->tx_kick < 0) || (gen && io->rx_kick < 0);
        int r = poll(pf, (nfds_t)n, polled ? 5 : -1);
        if (r < 0 && errno != EINTR)
            return 0;
        if (pf[0].revents)
            return 0;
        kicked(io, pf, i_txk, io->tx_kick);
        kicked(io, pf, i_rxk, io->rx_kick);
        if (io->tx != NULL)
            tn_vq_disable_notify(io->tx);
        if (gen) {
            tn_vq_disable_notify(io->rx);
            rx_full = 0;
        }
    }
}

/* Tap backend: TX to the tap queue, tap queue to RX, each a batch at a time. */
static int run_tap(struct tn_pair_io *io)
{
    struct tn_batch b;
    int tx_blocked = 0, rx_full = 0;
    int tap_gone = 0; /* the tap was deleted: its queue fd only says EBADFD (and POLLERR) */
    if (io->tx != NULL)
        tn_vq_disable_notify(io->tx);
    if (io->rx != NULL)
        tn_vq_disable_notify(io->rx);
    for (;;) {
        int tx_idle = 1, rx_idle = 1;
        if (io->tx != NULL && !tx_blocked) {
            int rc = tn_tx_to_fd(io->tx, io->mem, io->tap_fd, io->hdr_len, io->batch, &b,
                                 io->flows, io->pair);
            io->stats->batches++;
            if (rc < 0)
                return fail(io, 0, rc);
            add(io, &b, 0);
            if (rc > 0)
                call(io, io->tx, io->tx_call);
            tx_blocked = b.fd_blocked;
            tx_idle = b.fd_blocked || (b.ring_empty && !tn_vq_spin(io->tx, io->spin_ns));
        }
        if (io->rx != NULL && !rx_full && !tap_gone) {
            int rc = tn_rx_from_fd(io->rx, io->mem, io->tap_fd, io->mrg, io->hdr_len, io->need,
                                   io->batch, io->scratch, &b, io->filter);
            io->stats->batches++;
            if (rc < 0)
                return fail(io, 1, rc);
            add(io, &b, 1);
            if (rc > 0)
                call(io, io->rx, io->rx_call);
            rx_full = b.ring_full;
            rx_idle = b.ring_full || b.fd_blocked;
            if (b.drops_io && b.last_errno == EBADFD)
                tap_gone = 1; /* stop reading it rather than spin on POLLERR */
        }
        if (!tx_idle || !rx_idle)
            continue;
        /* about to sleep: ask for kicks, and re-check what raced in */
        if (io->tx != NULL && !tx_blocked && tn_vq_enable_notify(io->tx)) {
            tn_vq_disable_notify(io->tx);
            continue;
        }
        if (io->rx != NULL && rx_full && tn_vq_enable_notify(io->rx)) {
            tn_vq_disable_notify(io->rx);
            rx_full = 0;
            continue;
        }
        struct pollfd pf[4];
        int n = 0, i_txk = -1, i_rxk = -1, i_tap = -1;
        pf[n++] = (struct pollfd){io->stop_fd, POLLIN, 0};
        if (io->tx != NULL && io->tx_kick >= 0 && !tx_blocked) {
            i_txk = n;
            pf[n++] = (struct pollfd){io->tx_kick, POLLIN, 0};
        }
        if (io->rx != NULL && rx_full && io->rx_kick >= 0) {
            i_rxk = n;
            pf[n++] = (struct pollfd){io->rx_kick, POLLIN, 0};
        }
        short tap_ev = (short)((io->rx != NULL && !rx_full && !tap_gone ? POLLIN : 0) |
                               (tx_blocked ? POLLOUT : 0));
        if (tap_ev) {
            i_tap = n;
            pf[n++] = (struct pollfd){io->tap_fd, tap_ev, 0};
        }
        int polled = io->tx_kick < 0 || (rx_full && io->rx_kick < 0);
        int r = poll(pf, (nfds_t)n, polled ? 5 : -1);
        if (r < 0 && errno != EINTR)
            return 0;
        if (pf[0].revents)
            return 0;
        if (kicked(io, pf, i_txk, io->tx_kick))
            tn_vq_disable_notify(io->tx);
        if (kicked(io, pf, i_rxk, io->rx_kick)) {
            rx_full = 0;
            tn_vq_disable_notify(io->rx);
        }
        if (i_tap >= 0 && (pf[i_tap].revents & (POLLOUT | POLLERR)))
            tx_blocked = 0;
        if (polled) {
            tx_blocked = 0;
            rx_full = 0;
        }
    }
}

int tn_pair_run(struct tn_pair_io *io)
{
    io->error = 0;
    if (io->tap_fd < 0)
        return io->tx != NULL || (io->gen != NULL && io->rx != NULL) ? run_loop(io) : 0;
    return run_tap(io);
}
