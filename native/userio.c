/* The user-mode stack's native UDP fast path: see userio.h for the contract.
 *
 * Guest TX: a chain's first bytes are copied aside and parsed; a UDP frame of
 * a registered flow has its payload sent from the descriptors themselves (the
 * chain's iovecs narrowed in place), consecutive datagrams of one socket in
 * one sendmmsg.  Guest RX: the payload is received straight into the RX
 * buffers behind room for the headers, which are written afterwards. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "netsum.h"
#include "virtq.h"
#include "userio.h"
#include "usertcp.h"

#define DIR_READ 0
#define DIR_WRITE 1
#define VNET_F_NEEDS_CSUM 1
#define VNET_F_DATA_VALID 2
#define VNET_HDR_MAX 64           /* larger virtio-net headers: every frame goes to slow */
#define ETH_LEN 14
#define V4_LEN 20
#define V6_LEN 40
#define UDP_LEN 8
#define HDRS_MAX (ETH_LEN + V6_LEN + UDP_LEN)
#define MIN_FRAME 60
#define TX_RUN 64                 /* datagrams of one socket per sendmmsg */
#define RX_BATCH 32               /* datagrams of one socket per recvmmsg */
#define RX_EVENTS 64
#define RX_ROUNDS 8
#define MAX_DGRAM_V4 65507u       /* largest datagram a socket hands us */
#define MAX_DGRAM_V6 65527u
#define INDEX_MASK (TN_UFLOW_INDEX - 1)

_Static_assert((TN_UFLOW_INDEX & INDEX_MASK) == 0, "index size is a power of two");
_Static_assert(TN_UFLOW_INDEX >= 2 * TN_UFLOW_MAX, "index at most half full");
_Static_assert(TN_UFLOW_MAX <= 32767, "slots fit the int16_t index");
#define COUNT(a) (sizeof(a) / sizeof((a)[0]))
_Static_assert(COUNT(((struct tn_utable *)0)->flows) == TN_UFLOW_MAX, "flows[] size");
_Static_assert(COUNT(((struct tn_utable *)0)->free_slots) == TN_UFLOW_MAX, "free_slots[] size");
_Static_assert(COUNT(((struct tn_utable *)0)->index) == TN_UFLOW_INDEX, "index[] size");
_Static_assert(COUNT(((struct tn_utable *)0)->epfd) == TN_UFLOW_PAIRS, "epfd[] size");
_Static_assert(COUNT(((struct tn_utable *)0)->attention) == TN_UATTENTION_MAX, "attention[]");
_Static_assert(COUNT(((struct tn_slow *)0)->off) == TN_SLOW_FRAMES, "slow frame arrays");
_Static_assert(sizeof(((struct tn_slow *)0)->data) == TN_SLOW_BYTES, "slow data size");

static inline uint16_t be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline void put_be16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static inline uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

/* ---- Internet checksum (netsum.h) ----------------------------------------- */

uint16_t tn_sum16(const uint8_t *p, size_t len)
{
    return __builtin_bswap16(ns_fold(ns_sum_le(p, len, 0)));
}

/* Sum of the UDP pseudo-header (addresses from the IP header ip). */
static uint64_t sum_pseudo(const uint8_t *ip, int v6, uint16_t ulen)
{
    uint8_t tail[4] = {0, 17, (uint8_t)(ulen >> 8), (uint8_t)ulen};
    uint64_t acc = v6 ? ns_sum_le(ip + 8, 32, 0) : ns_sum_le(ip + 12, 8, 0);
    return ns_sum_le(tail, 4, acc);
}

/* ---- flow table ------------------------------------------------------------ */

static inline uint32_t mix(uint32_t h, uint32_t v)
{
    h ^= v;
    h *= 0x9e3779b1u;
    return h ^ (h >> 15);
}

static uint32_t key_hash(int v6, const uint8_t *src, const uint8_t *dst, uint16_t sport,
                         uint16_t dport)
{
    uint32_t h = 0x811c9dc5u ^ (uint32_t)(v6 != 0);
    for (int i = 0; i < (v6 ? 16 : 4); i += 4)
        h = mix(mix(h, rd32(src + i)), rd32(dst + i));
    h = mix(h, (uint32_t)sport << 16 | dport);
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    return h ^ (h >> 13);
}

static int key_eq(const struct tn_uflow *f, int v6, const uint8_t *src, const uint8_t *dst,
                  uint16_t sport, uint16_t dport)
{
    size_t n = v6 ? 16 : 4;
    return f->v6 == (v6 != 0) && f->gsport == sport && f->gdport == dport &&
           memcmp(f->gsrc, src, n) == 0 && memcmp(f->gdst, dst, n) == 0;
}

static uint32_t flow_home(const struct tn_uflow *f)
{
    return key_hash(f->v6, f->gsrc, f->gdst, f->gsport, f->gdport) & INDEX_MASK;
}

static int valid_slot(const struct tn_utable *t, int slot)
{
    return slot >= 0 && slot < TN_UFLOW_MAX && t->flows[slot].live;
}

/* ---- locks: see userio.h ---------------------------------------------------- */

struct locks {
    pthread_rwlock_t index;   /* read: a batch; write: add / del / move from Python */
    pthread_mutex_t move;     /* a batch moving a flow to its pair */
    pthread_mutex_t attention;
};

static struct locks *locks(const struct tn_utable *t) { return t->lock; }
static void read_lock(struct tn_utable *t) { pthread_rwlock_rdlock(&locks(t)->index); }
static void write_lock(struct tn_utable *t) { pthread_rwlock_wrlock(&locks(t)->index); }
static void unlock(struct tn_utable *t) { pthread_rwlock_unlock(&locks(t)->index); }
static void count(uint64_t *counter, uint64_t n) { __atomic_fetch_add(counter, n, __ATOMIC_RELAXED); }

static struct locks *locks_new(void)
{
    struct locks *l = calloc(1, sizeof(*l));
    pthread_rwlockattr_t attr;
    if (l == NULL || pthread_rwlockattr_init(&attr) != 0) {
        free(l);
        return NULL;
    }
    /* readers come back batch after batch: the default (readers first) would starve Python */
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    int rc = pthread_rwlock_init(&l->index, &attr);
    pthread_rwlockattr_destroy(&attr);
    if (rc != 0) {
        free(l);
        return NULL;
    }
    pthread_mutex_init(&l->move, NULL);
    pthread_mutex_init(&l->attention, NULL);
    return l;
}

void tn_slow_reset(struct tn_slow *s)
{
    s->n = 0;
    s->used = 0;
    s->full = 0;
}

int tn_utable_init(struct tn_utable *t)
{
    memset(t, 0, sizeof(*t));
    t->lock = locks_new();
    if (t->lock == NULL)
        return -ENOMEM;
    for (int i = 0; i < TN_UFLOW_INDEX; i++)
        t->index[i] = -1;
    for (int i = 0; i < TN_UFLOW_MAX; i++)
        t->free_slots[i] = (uint16_t)(TN_UFLOW_MAX - 1 - i);  /* slot 0 is taken first */
    t->nfree = TN_UFLOW_MAX;
    for (int i = 0; i < TN_UFLOW_PAIRS; i++)
        t->epfd[i] = -1;
    for (int i = 0; i < TN_UFLOW_PAIRS; i++) {
        t->epfd[i] = epoll_create1(EPOLL_CLOEXEC);
        if (t->epfd[i] < 0) {
            int e = errno;
            tn_utable_close(t);
            return -e;
        }
    }
    return 0;
}

void tn_utable_close(struct tn_utable *t)
{
    for (int i = 0; i < TN_UFLOW_PAIRS; i++) {
        if (t->epfd[i] >= 0)
            close(t->epfd[i]);
        t->epfd[i] = -1;
    }
    struct locks *l = t->lock;
    if (l != NULL) {
        pthread_rwlock_destroy(&l->index);
        pthread_mutex_destroy(&l->move);
        pthread_mutex_destroy(&l->attention);
        free(l);
        t->lock = NULL;
    }
}

static int find(const struct tn_utable *t, int v6, const uint8_t *src, const uint8_t *dst,
                uint16_t sport, uint16_t dport)
{
    uint32_t pos = key_hash(v6, src, dst, sport, dport) & INDEX_MASK;
    for (int i = 0; i < TN_UFLOW_INDEX; i++) {
        int s = t->index[pos];
        if (s < 0)
            return -1;
        if (key_eq(&t->flows[s], v6, src, dst, sport, dport))
            return s;
        pos = (pos + 1) & INDEX_MASK;
    }
    return -1;
}

int tn_uflow_find(struct tn_utable *t, int v6, const uint8_t *src, const uint8_t *dst,
                  uint16_t sport, uint16_t dport)
{
    read_lock(t);
    int slot = find(t, v6, src, dst, sport, dport);
    unlock(t);
    return slot;
}

/* Set spoke bits: atomically, since another pair's batch or Python may set
 * the other bit at the same time (a plain load first: mostly they are set). */
static void spoke(struct tn_uflow *f, uint8_t bits)
{
    if ((__atomic_load_n(&f->spoke, __ATOMIC_RELAXED) & bits) != bits)
        __atomic_fetch_or(&f->spoke, bits, __ATOMIC_RELAXED);
}

void tn_uflow_spoke(struct tn_utable *t, int slot, uint8_t bits)
{
    read_lock(t);
    if (valid_slot(t, slot))
        spoke(&t->flows[slot], bits);
    unlock(t);
}

/* An epoll set's entries: a UDP flow's slot, or a TCP connection tagged. */
#define EV_TCP (1ull << 63)

static int ep_add(struct tn_utable *t, uint8_t pair, int fd, int slot)
{
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)(uint32_t)slot};
    return epoll_ctl(t->epfd[pair], EPOLL_CTL_ADD, fd, &ev) < 0 ? -errno : 0;
}

int tn_utable_tcp_watch(struct tn_utable *t, struct tn_tcpc *c, uint8_t pair)
{
    int fd = tn_tcpc_fd(c), from = tn_tcpc_ep_pair(c);
    if (pair >= TN_UFLOW_PAIRS || t->epfd[pair] < 0)
        return -EINVAL;
    if (fd < 0)
        return -EBADF;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLET, .data.u64 = EV_TCP | (uintptr_t)c};
    if (from == pair)  /* re-arm: edge-triggered, an event now if data waits */
        return epoll_ctl(t->epfd[pair], EPOLL_CTL_MOD, fd, &ev) < 0 ? -errno : 0;
    write_lock(t);  /* no batch holds an event of c while it moves */
    if (from >= 0)
        epoll_ctl(t->epfd[from], EPOLL_CTL_DEL, fd, NULL);
    int rc = epoll_ctl(t->epfd[pair], EPOLL_CTL_ADD, fd, &ev) < 0 ? -errno : 0;
    tn_tcpc_set_ep_pair(c, rc == 0 ? pair : -1);
    unlock(t);
    return rc;
}

void tn_utable_tcp_unwatch(struct tn_utable *t, struct tn_tcpc *c)
{
    int fd = tn_tcpc_fd(c), from = tn_tcpc_ep_pair(c);
    if (from < 0)
        return;
    write_lock(t);  /* a batch that took an event of c is done with it */
    if (fd >= 0)
        epoll_ctl(t->epfd[from], EPOLL_CTL_DEL, fd, NULL);
    tn_tcpc_set_ep_pair(c, -1);
    unlock(t);
}

static int template_ok(const struct tn_uflow *f)
{
    const uint8_t *p = f->tmpl;
    if (f->v6)
        return f->tmpl_len == ETH_LEN + V6_LEN + UDP_LEN && be16(p + 12) == 0x86dd &&
               p[14] >> 4 == 6 && p[20] == 17;
    return f->tmpl_len == ETH_LEN + V4_LEN + UDP_LEN && be16(p + 12) == 0x0800 &&
           p[14] == 0x45 && p[23] == 17;
}

static int add(struct tn_utable *t, const struct tn_uflow *f)
{
    if (f->fd < 0 || f->pair >= TN_UFLOW_PAIRS || f->v6 > 1 || !template_ok(f))
        return -EINVAL;
    if (t->nfree == 0)
        return TN_UFLOW_E_FULL;
    struct tn_uflow key = *f;
    if (!key.v6) {  /* IPv4 keys: only the first 4 bytes count */
        memset(key.gsrc + 4, 0, 12);
        memset(key.gdst + 4, 0, 12);
    }
    uint32_t pos = key_hash(key.v6, key.gsrc, key.gdst, key.gsport, key.gdport) & INDEX_MASK;
    int i;
    for (i = 0; i < TN_UFLOW_INDEX && t->index[pos] >= 0; i++) {
        if (key_eq(&t->flows[t->index[pos]], key.v6, key.gsrc, key.gdst, key.gsport, key.gdport))
            return TN_UFLOW_E_EXISTS;
        pos = (pos + 1) & INDEX_MASK;
    }
    if (i == TN_UFLOW_INDEX)
        return TN_UFLOW_E_FULL;  /* cannot happen while the index is at most half full */
    int slot = t->free_slots[t->nfree - 1];
    int rc = ep_add(t, key.pair, key.fd, slot);
    if (rc < 0)
        return rc;
    t->nfree--;
    key.live = 1;
    t->flows[slot] = key;
    t->index[pos] = (int16_t)slot;
    t->count++;
    return slot;
}

int tn_uflow_add(struct tn_utable *t, const struct tn_uflow *f)
{
    write_lock(t);
    int rc = add(t, f);
    unlock(t);
    return rc;
}

static void del(struct tn_utable *t, int slot)
{
    if (!valid_slot(t, slot))
        return;
    struct tn_uflow *f = &t->flows[slot];
    epoll_ctl(t->epfd[f->pair], EPOLL_CTL_DEL, f->fd, NULL);  /* the fd may be closed already */
    uint32_t hole = flow_home(f);
    int i;
    for (i = 0; i < TN_UFLOW_INDEX && t->index[hole] != slot; i++)
        hole = (hole + 1) & INDEX_MASK;
    if (i < TN_UFLOW_INDEX) {
        /* linear probing without tombstones: shift later entries back into the hole */
        t->index[hole] = -1;
        uint32_t j = hole;
        for (int k = 0; k < TN_UFLOW_INDEX; k++) {
            j = (j + 1) & INDEX_MASK;
            int s = t->index[j];
            if (s < 0)
                break;
            uint32_t home = flow_home(&t->flows[s]);
            /* s may fill the hole unless its home lies cyclically in (hole, j] */
            if (((j - home) & INDEX_MASK) >= ((j - hole) & INDEX_MASK)) {
                t->index[hole] = (int16_t)s;
                t->index[j] = -1;
                hole = j;
            }
        }
    }
    pthread_mutex_lock(&locks(t)->attention);
    for (uint32_t a = 0; a < t->nattention && a < TN_UATTENTION_MAX; a++) {
        if (t->attention[a] == slot) {
            t->attention[a] = t->attention[--t->nattention];
            break;
        }
    }
    pthread_mutex_unlock(&locks(t)->attention);
    f->live = 0;
    f->fd = -1;
    t->free_slots[t->nfree++] = (uint16_t)slot;
    t->count--;
}

void tn_uflow_del(struct tn_utable *t, int slot)
{
    write_lock(t);
    del(t, slot);
    unlock(t);
}

/* Re-home a live flow onto pair's epoll set (the caller holds the write lock,
 * or the read lock and the move mutex). */
static int move(struct tn_utable *t, int slot, uint8_t pair)
{
    struct tn_uflow *f = &t->flows[slot];
    uint8_t from = __atomic_load_n(&f->pair, __ATOMIC_RELAXED);
    if (from == pair)
        return 0;
    int rc = ep_add(t, pair, f->fd, slot);
    if (rc < 0)
        return rc;
    epoll_ctl(t->epfd[from], EPOLL_CTL_DEL, f->fd, NULL);
    __atomic_store_n(&f->pair, pair, __ATOMIC_RELAXED);
    return 0;
}

int tn_uflow_move(struct tn_utable *t, int slot, uint8_t pair)
{
    write_lock(t);
    int rc = !valid_slot(t, slot) || pair >= TN_UFLOW_PAIRS ? -EINVAL : move(t, slot, pair);
    unlock(t);
    return rc;
}

/* A socket error: Python reads the flow's error queue and clears err. */
static void flag_err(struct tn_utable *t, int slot)
{
    struct tn_uflow *f = &t->flows[slot];
    pthread_mutex_lock(&locks(t)->attention);
    if (!f->err) {
        f->err = 1;
        if (t->nattention < TN_UATTENTION_MAX)
            t->attention[t->nattention++] = slot;
        else
            t->attention_overflow = 1;
        count(&t->sock_errors, 1);
    }
    pthread_mutex_unlock(&locks(t)->attention);
}

uint32_t tn_uattention_take(struct tn_utable *t, int32_t *out, uint8_t *overflow)
{
    pthread_mutex_lock(&locks(t)->attention);
    uint32_t n = t->nattention < TN_UATTENTION_MAX ? t->nattention : TN_UATTENTION_MAX;
    memcpy(out, t->attention, n * sizeof(*out));
    *overflow = t->attention_overflow;
    t->nattention = 0;
    t->attention_overflow = 0;
    pthread_mutex_unlock(&locks(t)->attention);
    return n;
}

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
            flag_err(t, r->slot[i]);
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
    if (move(t, slot, pair) < 0)
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
    uint8_t h[VNET_HDR_MAX + HDRS_MAX];
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
        uint32_t want = hdr_len + HDRS_MAX < sizeof(h) ? hdr_len + HDRS_MAX : sizeof(h);
        uint32_t got = tn_iov_to_buf(ch, nch, h, want < rl ? want : rl);
        uint8_t flags = hdr_len >= 1 ? h[0] : 0, gso = hdr_len >= 2 ? h[1] : 0;
        struct udp_frame u;
        int slot = -1;
        if (hdr_len <= VNET_HDR_MAX && gso == 0 && parse_udp(h + hdr_len, got - hdr_len, flen, &u))
            slot = find(t, u.v6, u.src, u.dst, u.sport, u.dport);
        int joined = 0;  /* TCP data of the fast path: into the run, sent when it ends */
        if (slot < 0 && gso == 0 && t->tcp != NULL) {
            joined = tn_tcp_tx_join(t->tcp, trun, acks, ch, nch, hdr_len, flen, flags, pair, head);
            if (joined == 2) {
                if (tcp_end(t, trun, vq, acks, b, &done, 1))
                    break;
                joined = tn_tcp_tx_join(t->tcp, trun, acks, ch, nch, hdr_len, flen, flags, pair,
                                        head);
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
    if (c->data_valid)
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
        flag_err(c->t, slot);
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
                flag_err(t, slot);
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
