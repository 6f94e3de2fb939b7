/* TCP data towards the guest without a copy of ours (read by cffi as the cdef).
 *
 * A connection's bytes from the host peer stay in its socket's receive queue
 * until the guest acknowledges them.  Python decides what to send (sequence
 * numbers, lengths, flags, window) and queues a *data entry* in the pair's
 * outbox (tn_uout_put_tcp): no bytes, only where they are.  The outbox's
 * consumer (tn_uout_drain, on the pair's Trio task or worker thread) lays the
 * entry into the RX ring: headers from the connection's template, the payload
 * peeked (MSG_PEEK at the entry's offset from the queue head, SO_PEEK_OFF)
 * straight from the socket into the guest's buffers, then the checksums.
 *
 * struct tn_tcpc is the connection's native part: the socket fd, the
 * sequence number of the receive queue's head (una: advanced by
 * tn_tcpc_consume when the guest acknowledged data), the kernel's peek offset
 * as last set, and the header template.  A mutex orders the drain's peeks
 * against Python's consume and close; a reference count keeps it alive while
 * outbox entries point at it.  tn_tcpc_close (Python's release) stops every
 * use of the fd before Python closes it; entries still queued are dropped
 * when drained.  An entry whose bytes were acknowledged meanwhile is dropped
 * (or trimmed) rather than sent.  Kernels without SO_PEEK_OFF for TCP (before
 * 6.9) peek from the head into a discard buffer for the skipped part. */
#pragma once
#include <stdint.h>

struct tn_uoutq;
struct tn_tcpc;

#define TN_TCPC_TMPL_MAX 80

struct tn_tcpc_stats {
    uint64_t laid;          /* data entries laid into a ring (or copied out) */
    uint64_t stale;         /* entries dropped: acknowledged meanwhile, or connection closed */
    uint64_t trimmed;       /* entries partly acknowledged meanwhile: the rest was sent */
    uint64_t short_peeks;   /* fewer bytes in the queue than the entry said: sent shorter */
    uint64_t peek_errors;   /* the peek failed (the connection was reset): entry dropped */
    uint64_t peeks;         /* peeks that laid entries: laid / peeks is entries per system call */
};

/* A connection's native part for socket fd (not owned): tmpl is its
 * Ethernet + IP + TCP header (tmpl_len 54 for IPv4, 74 for IPv6; lengths,
 * sequence numbers, flags, window and checksums are filled per frame), una
 * the sequence number of the first byte the socket will deliver.  no_peek_off
 * forces the path of kernels without SO_PEEK_OFF.  NULL: -ENOMEM or a bad
 * template. */
struct tn_tcpc *tn_tcpc_new(int fd, const uint8_t *tmpl, uint32_t tmpl_len, uint32_t una,
                            int no_peek_off);
/* Python's release: the fd is never used again once this returns. */
void tn_tcpc_close(struct tn_tcpc *c);
/* Bytes in the receive queue beyond offset; 0: none yet; -1: none and the
 * peer closed (end of stream); -errno on error. */
int64_t tn_tcpc_avail(struct tn_tcpc *c, uint32_t offset);
/* Drop n acknowledged bytes from the head of the receive queue (una += n);
 * returns the bytes dropped or -errno. */
int64_t tn_tcpc_consume(struct tn_tcpc *c, uint32_t n);
/* 1 when the kernel's SO_PEEK_OFF is used, 0 when the fallback is. */
int tn_tcpc_peek_off(const struct tn_tcpc *c);
/* Counters of every connection's data entries (process-wide). */
void tn_tcpc_stats_get(struct tn_tcpc_stats *out);

/* ---- guest → host: the TCP TX fast path -----------------------------------------
 *
 * A table of the connections (struct tn_ttable, keyed as the guest sends:
 * its address and port, the peer's) that the native TX path (tn_user_tx)
 * looks up for every TCP frame.  A frame is taken natively only when
 * Python allowed it for the connection (tn_tcpc_resume with data = 1) and
 * it is the plainest kind: ACK (PSH) only, no options, in order (seq =
 * rcv_nxt), acknowledging nothing new (ack = snd_una, the same window
 * field), with payload and good checksums.  A batch's consecutive such
 * segments of one connection are sent from the descriptors with one sendmsg
 * (struct tn_tcp_run), rcv_nxt advances, and the connection is acknowledged
 * natively (tn_tcp_acks_flush) or listed for Python (tn_ttable_take).
 * The guest's pure ACKs are taken too when Python allows it (push): they
 * drop the acknowledged bytes from the socket and queue the stream's next
 * segments after the batch (tn_tcp_acks_flush), as Python's push would.
 * Anything else, the segments of a run the socket did not take whole (their
 * chains are rewound and reach Python in the next batch), or any frame while
 * Python has the connection (between tn_tcpc_pause and tn_tcpc_resume) goes
 * to Python, and the connection stays Python's until it resumes it: frames
 * of one connection are never reordered. */

struct tn_ttable;

/* NULL when out of memory. */
struct tn_ttable *tn_ttable_new(void);
/* Every connection must have been removed. */
void tn_ttable_free(struct tn_ttable *t);
/* Index c under the guest's view of its key (src: the guest, 4 or 16 bytes
 * by v6).  0, -EEXIST, -ENOSPC. */
int tn_ttable_add(struct tn_ttable *t, struct tn_tcpc *c, int v6, const uint8_t *src,
                  const uint8_t *dst, uint16_t sport, uint16_t dport);
void tn_ttable_del(struct tn_ttable *t, struct tn_tcpc *c);
/* Connections the fast path took data for since the last call (at most max
 * into out); each listed once. */
uint32_t tn_ttable_take(struct tn_ttable *t, struct tn_tcpc **out, uint32_t max);
/* Frames taken natively, and sent bytes, since the table was made; the
 * sendmsg calls that sent them (one per run of a connection's segments in a
 * TX batch), and the runs the socket took only part of. */
uint64_t tn_ttable_fast_frames(const struct tn_ttable *t);
uint64_t tn_ttable_fast_bytes(const struct tn_ttable *t);
uint64_t tn_ttable_fast_sends(const struct tn_ttable *t);
uint64_t tn_ttable_fast_partial(const struct tn_ttable *t);
/* The free space of c's send buffer for payload (-errno on error; -EBADF
 * once closed), with the bytes queued in it and its size: the one measure
 * both Python's window and the native ACKs' are made from. */
int64_t tn_tcpc_space(struct tn_tcpc *c, uint32_t *outq, uint32_t *sndbuf);

/* What the fast path did to a connection since Python last resumed it. */
struct tn_tcpc_sync {
    uint32_t rcv_nxt;             /* the guest's data sent up to here */
    uint32_t acked;               /* the native ACKs acknowledged up to here */
    uint32_t rcv_edge;            /* right edge of the windows advertised */
    uint32_t snd_una;             /* the guest acknowledged the host's stream up to here */
    uint32_t snd_nxt;             /* the host's stream was sent up to here */
    uint16_t window;              /* the window field of the last native ACK */
    uint16_t guest_window;        /* the window field of the guest's last ACK taken */
    uint8_t acks;                 /* 1: native ACKs were sent (acked, window valid) */
    uint8_t took;                 /* 1: frames were taken (pair: the last one's) */
    uint8_t pair;
    uint8_t moved;                /* 1: guest ACKs taken or data sent (snd_* valid) */
};
/* Python takes the connection: no frame of it goes the fast path until
 * resume.  *out: what the fast path did meanwhile. */
void tn_tcpc_pause(struct tn_tcpc *c, struct tn_tcpc_sync *out);
/* Python's state of the connection, handed over at resume. */
struct tn_tcpc_state {
    uint32_t rcv_nxt, snd_una, snd_nxt, rcv_edge;
    uint32_t mss;                 /* largest segment to the guest */
    uint32_t seg;                 /* payload per frame: mss, or up to TN_TCP_SEG_MAX
                                     (a GSO frame of mss-byte segments) for a guest
                                     that takes TSO for the connection's family */
    uint32_t max_snd_wnd;         /* the largest window the guest offered, bytes */
    uint16_t window_field;        /* the guest's last window field */
    uint16_t our_field;           /* the window field last advertised to the guest */
    uint8_t ws_to, ws_from;       /* window scales: towards the guest, from it */
    uint8_t data;                 /* the fast path may take data segments (ESTABLISHED) */
    uint8_t ack;                  /* ... and acknowledge the data it sends natively */
    uint8_t push;                 /* it may take the guest's pure ACKs and send more */
    uint8_t pair;                 /* the pair its frames go to (Python's home for it) */
    uint8_t timer;                /* Python's retransmission timer is running */
};
/* Python is done with it: the state the fast path checks frames against,
 * and what it may do.  With ack it acknowledges the guest data it took, once
 * per TX batch, from the connection's template: seq snd_nxt, the window the
 * socket's free space allows scaled by ws_to (as Python's _window, silly
 * windows avoided below min(mss, half the payload share of the send
 * buffer)).  A zero window, or a connection Python holds, is left to Python
 * (listed for tn_ttable_take).  With push it also takes the guest's pure
 * ACKs that acknowledge new data or open the window (never a duplicate ACK,
 * a zero window, or one acknowledging what was not sent): the acknowledged
 * bytes leave the socket's receive queue, and after the batch the stream
 * goes on as Python's push would (within the guest's window and the MSS,
 * no small segment while more waits, our_field as the window) into the
 * outbox of the pair the ACK came on.  The end of the stream, a full outbox
 * or an error is left to Python (listed). */
void tn_tcpc_resume(struct tn_tcpc *c, const struct tn_tcpc_state *s);
/* Where the native ACKs for frames taken on pair go (the pair's outbox). */
void tn_ttable_set_out(struct tn_ttable *t, uint32_t pair, struct tn_uoutq *q);
/* Native ACKs sent, and ACKs left to Python, since the table was made. */
uint64_t tn_ttable_native_acks(const struct tn_ttable *t);
uint64_t tn_ttable_acks_to_python(const struct tn_ttable *t);
/* Guest ACKs taken natively, and the segments of host data sent natively. */
uint64_t tn_ttable_guest_acks(const struct tn_ttable *t);
uint64_t tn_ttable_push_segments(const struct tn_ttable *t);
/* Host data arrivals (the socket's epoll edge) handled natively: the stream
 * went on from C, or the connection was listed for Python. */
uint64_t tn_ttable_host_ready(const struct tn_ttable *t);

/* One push, Python's or native: outbox frames it leaves for other traffic,
 * and segments it queues at most. */
#define TN_TCP_OUTBOX_RESERVE 64
#define TN_TCP_PUSH_BURST 256

/* A GSO frame's payload at most: its frame (IPv6 headers, a 12-byte
 * virtio-net header) fits TN_MAX_FRAME, and IPv4's total length 16 bits. */
#define TN_TCP_SEG_MAX 65476

/* Queue data entries for len bytes (> 0) at sequence number seq of c's
 * stream, one per frame of at most seg bytes, with ack and the window field
 * as given; flags on the last frame, without PSH on the others.  A frame
 * longer than mss goes to the guest as one GSO frame of mss-byte segments
 * (the guest took TSO: the drain's TN_RX_TSO4/6), else only its first mss
 * bytes go.  Returns how many were queued (those that found the queue full
 * are counted in dropped), -EINVAL or -ENOMEM. */
int tn_uout_put_tcp(struct tn_uoutq *q, struct tn_tcpc *c, uint32_t seq, uint32_t ack,
                    uint16_t window, uint8_t flags, uint32_t len, uint32_t seg, uint32_t mss);

/* cdef-skip */
/* For the outbox (userpair.c): a data entry, flagged in the outbox's len[]. */
#define TN_UOUT_LAZY 0x80000000u
#define TN_TCP_PSH 0x08
struct tn_vq;
struct tn_mem;
struct tn_scratch;
struct tn_tcp_entry;
/* A data entry holding a reference to c; NULL when out of memory.  gso: the
 * segment size when len is longer (one GSO frame), else 0. */
struct tn_tcp_entry *tn_tcp_entry_new(struct tn_tcpc *c, uint32_t seq, uint32_t ack,
                                      uint16_t window, uint8_t flags, uint32_t len,
                                      uint16_t gso);
void tn_tcp_entry_free(struct tn_tcp_entry *e);
/* Lay entries es[0..n) of one connection, each continuing the previous
 * one's bytes, into the RX ring with one peek (at most TN_TCP_LAY_BATCH;
 * fewer when the ring or the scratch holds fewer) and publish them.  Returns
 * how many were taken from the outbox: *laid of them laid (their frames'
 * lengths summed in *bytes), the rest dropped (stale, closed, peek error);
 * 0 when the first finds no room (nothing taken); or a negative TN_E_* of
 * the ring. */
/* 1 when e continues prev's bytes on the same connection. */
int tn_tcp_entry_follows(const struct tn_tcp_entry *e, const struct tn_tcp_entry *prev);
#define TN_TCP_LAY_BATCH 16
int tn_tcp_entries_lay(struct tn_tcp_entry *const *es, uint32_t n, struct tn_vq *vq,
                       const struct tn_mem *m, int mrg, uint32_t hdr_len, int data_valid,
                       struct tn_scratch *s, uint32_t *laid, uint64_t *bytes);
/* The entry as a flat frame in buf (cap bytes): its length (which may exceed
 * cap: then only cap bytes were written), or -1 when dropped. */
int tn_tcp_entry_flat(struct tn_tcp_entry *e, uint8_t *buf, uint32_t cap);
/* A TX batch's connections that owe the guest a native ACK (each holds a
 * reference; tn_tcp_acks_flush sends and releases them). */
#define TN_TCP_ACKS_MAX 64
struct tn_tcp_acks {
    uint32_t n;
    struct tn_tcpc *c[TN_TCP_ACKS_MAX];
};
/* A run of one connection's in-order data segments from one TX batch, sent
 * with one sendmsg when it ends (tn_tcp_run_flush).  Its chains are popped
 * but not yet used: the run's chains are always the last ones popped. */
#define TN_TCP_RUN_FRAMES 256
#define TN_TCP_RUN_IOV 1024
struct tn_tcp_run {
    struct tn_tcpc *c;            /* a reference while the run is open */
    uint32_t seq, bytes, n, npl;
    uint8_t pair;
    uint16_t head[TN_TCP_RUN_FRAMES];
    uint32_t len[TN_TCP_RUN_FRAMES], flen[TN_TCP_RUN_FRAMES];
    struct iovec pl[TN_TCP_RUN_IOV];
};
/* For tn_user_tx: the frame (flen bytes after the virtio-net header; ch: the
 * chain with that head; h: its first got bytes, the copy tn_user_tx parsed,
 * up to the virtio-net header and an IPv6 frame's TCP header) is 1 taken
 * into the run (the chain is the run's now), 0 not for the fast path (the
 * connection stays Python's for the rest of the batch), 2 for the fast path
 * but not this run: flush it and ask again, 3 a guest ACK handled (the chain
 * is done with; the connection owes a push in acks). */
int tn_tcp_tx_join(struct tn_ttable *t, struct tn_tcp_run *run, struct tn_tcp_acks *acks,
                   const struct iovec *ch, uint32_t nch, const uint8_t *h, uint32_t got,
                   uint32_t hdr_len, uint32_t flen, uint8_t vnet_flags, uint8_t pair,
                   uint16_t head);
/* Send the run with one sendmsg: the chains of the segments the socket took
 * whole are used; returns how many of the last chains were not (the caller
 * rewinds them: the next batch hands them to Python, which holds what the
 * socket refuses), their frames' bytes in *unbytes.  A run whose connection
 * Python took meanwhile sends nothing. */
uint32_t tn_tcp_run_flush(struct tn_ttable *t, struct tn_tcp_run *run, struct tn_vq *vq,
                          struct tn_tcp_acks *acks, uint64_t *unbytes);
/* After the batch: one ACK per connection in acks that sent guest data,
 * and more host data for those whose guest ACKs were taken, into the outbox
 * of pair (or the connection listed for Python); acks is empty afterwards. */
void tn_tcp_acks_flush(struct tn_ttable *t, struct tn_tcp_acks *acks, uint8_t pair);
/* For the worker: 1 once after the table listed connections (signal Python). */
int tn_ttable_should_signal(struct tn_ttable *t);
/* For the epoll sets of userio.c: c's socket fd (-1 once closed), and the
 * pair whose set watches it (-1: none; only Python's thread changes it). */
int tn_tcpc_fd(const struct tn_tcpc *c);
int tn_tcpc_ep_pair(const struct tn_tcpc *c);
void tn_tcpc_set_ep_pair(struct tn_tcpc *c, int pair);
/* Host data arrived on c's socket (an edge of pair's epoll set, read lock of
 * the flow table held): with push allowed, the stream goes on into pair's
 * outbox as after a guest ACK; the end of the stream, a full outbox, an
 * error, or a connection the guest moved to another pair is listed for
 * Python.  A connection Python holds is left alone (its resume looks again). */
void tn_tcp_ready(struct tn_ttable *t, struct tn_tcpc *c, uint8_t pair);
/* cdef-end */
