/* The user-mode stack's native UDP fast path: see userio.h for the contract.
 *
 * This file: the flow table (its slots, the index over the flows' keys and
 * the free list), its locks, the pairs' epoll sets (the UDP flows, and the
 * TCP connections whose host data C pushes) and the attention list.  The
 * index's lookup and the locks' helpers are in internal/userio_impl.h;
 * guest TX is in userio_tx.c, guest RX in userio_rx.c. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "netsum.h"
#include "userio.h"
#include "usertcp.h"
#include "internal/userio_impl.h"

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

/* ---- Internet checksum (netsum.h) ----------------------------------------- */

uint16_t tn_sum16(const uint8_t *p, size_t len)
{
    return __builtin_bswap16(ns_fold(ns_sum_le(p, len, 0)));
}

/* ---- flow table ------------------------------------------------------------ */

static uint32_t flow_home(const struct tn_uflow *f)
{
    return key_hash(f->v6, f->gsrc, f->gdst, f->gsport, f->gdport) & INDEX_MASK;
}

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

int tn_uflow_find(struct tn_utable *t, int v6, const uint8_t *src, const uint8_t *dst,
                  uint16_t sport, uint16_t dport)
{
    read_lock(t);
    int slot = find(t, v6, src, dst, sport, dport);
    unlock(t);
    return slot;
}

void tn_uflow_spoke(struct tn_utable *t, int slot, uint8_t bits)
{
    read_lock(t);
    if (valid_slot(t, slot))
        spoke(&t->flows[slot], bits);
    unlock(t);
}

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
int tn_uflow_move_locked(struct tn_utable *t, int slot, uint8_t pair)
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
    int rc = !valid_slot(t, slot) || pair >= TN_UFLOW_PAIRS
                 ? -EINVAL
                 : tn_uflow_move_locked(t, slot, pair);
    unlock(t);
    return rc;
}

/* A socket error: Python reads the flow's error queue and clears err. */
void tn_uflow_flag_err(struct tn_utable *t, int slot)
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
