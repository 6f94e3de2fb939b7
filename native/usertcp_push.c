/* The native TCP paths towards the guest (see usertcp.h): after a TX batch,
 * the ACKs for the guest data it sent and the stream's next segments after
 * the guest's ACKs it took (tn_tcp_acks_flush); on host data, the stream's
 * next segments (tn_tcp_ready); and the free space of a socket's send
 * buffer, the one measure Python's window and the native ACKs' are made
 * from (tn_tcpc_space). */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>

#include "virtq.h"
#include "userpair.h"
#include "usertcp.h"
#include "internal/usertcp_impl.h"

#ifndef SO_MEMINFO
#define SO_MEMINFO 55
#endif
#define SK_MEMINFO_SNDBUF 3
#define SK_MEMINFO_WMEM_QUEUED 5
#define SK_MEMINFO_VARS 9
#ifndef SIOCOUTQ
#define SIOCOUTQ 0x5411           /* TIOCOUTQ */
#endif
#define TCP_ACK 0x10

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
    uint32_t inflight = c->snd_nxt - c->snd_una, mss = c->mss, seg = c->seg;
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
    int64_t avail = tn_tcpc_avail_locked(c, inflight);
    if (avail <= 0)
        return avail == 0 ? 0 : -1;
    uint32_t have = (uint32_t)avail;
    uint64_t want = usable;
    if (want > (uint64_t)room * seg)
        want = (uint64_t)room * seg;
    if (want > have)
        want = have;
    uint32_t sws = c->max_snd_wnd / 2 < mss ? c->max_snd_wnd / 2 : mss;
    if (want < have && inflight > 0 && want < sws)
        return 0;  /* RFC 1122 §4.2.3.4: the next ACK opens more */
    int n = tn_uout_put_tcp_locked(q, c, c->snd_nxt, c->rcv_nxt, c->our_field,
                                   TCP_ACK | TN_TCP_PSH, (uint32_t)want, seg, mss);
    if (n <= 0)
        return -1;
    uint32_t frames = (uint32_t)((want + seg - 1) / seg);
    c->snd_nxt += (uint32_t)n >= frames ? (uint32_t)want : (uint32_t)n * seg;
    c->moved = 1;
    __atomic_fetch_add(&t->push_segments, (uint64_t)n, __ATOMIC_RELAXED);
    /* sent with nothing in flight before while Python's retransmission timer
     * is off (it saw everything acknowledged): it is told (listed), to arm
     * it.  A running one, set for earlier data, looks again when it fires. */
    if (inflight == 0 && !c->timer) {
        c->timer = 1;
        return -1;
    }
    return (uint32_t)n >= frames ? n : -1;
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
    struct tn_tcp_entry e = {
        .c = c, .seq = c->snd_nxt, .ack = c->rcv_nxt, .window = field, .flags = TCP_ACK};
    uint32_t tl = c->tmpl_len, flen = tl;
    memcpy(frame, c->tmpl, tl);
    tn_tcp_headers(&e, frame, tl, c->snd_nxt, 0, 0);
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
            tn_ttable_list_for_ack(t, c);
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
            tn_ttable_list_for_ack(t, c);
        pthread_mutex_unlock(&c->lock);
        if (q != NULL)
            tn_uout_unlock(q);
        tn_tcpc_unref(c);
    }
    acks->n = 0;
}
