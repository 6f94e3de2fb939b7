/* The connections the native TCP paths know (see usertcp.h): the table
 * that indexes them under the guest's view of their key (its lookup, which
 * the TX fast path shares, is in internal/usertcp_impl.h), the list that
 * hands them to Python, Python's pause and resume of a connection, and the
 * table's counters. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>

#include "usertcp.h"
#include "internal/usertcp_impl.h"

/* ---- the connection table -------------------------------------------------------- */

struct tn_ttable *tn_ttable_new(void)
{
    struct tn_ttable *t = calloc(1, sizeof(*t));
    if (t == NULL)
        return NULL;
    pthread_rwlock_init(&t->index_lock, NULL);
    pthread_mutex_init(&t->list_lock, NULL);
    return t;
}

void tn_ttable_free(struct tn_ttable *t)
{
    pthread_rwlock_destroy(&t->index_lock);
    pthread_mutex_destroy(&t->list_lock);
    free(t);
}

int tn_ttable_add(struct tn_ttable *t, struct tn_tcpc *c, int v6, const uint8_t *src,
                  const uint8_t *dst, uint16_t sport, uint16_t dport)
{
    uint32_t alen = v6 ? 16 : 4;
    int rc = 0;
    pthread_rwlock_wrlock(&t->index_lock);
    if (c->indexed || find_slot(t, v6, src, dst, sport, dport) >= 0) {
        rc = -EEXIST;
    } else if (t->n >= TT_MAX) {
        rc = -ENOSPC;
    } else {
        c->v6 = (uint8_t)(v6 != 0);
        memcpy(c->src, src, alen);
        memcpy(c->dst, dst, alen);
        c->sport = sport;
        c->dport = dport;
        uint32_t i = key_hash(v6, src, dst, sport, dport) & TT_MASK;
        while (t->slot[i] != NULL)
            i = (i + 1) & TT_MASK;
        t->slot[i] = c;
        __atomic_add_fetch(&c->refs, 1, __ATOMIC_RELAXED);  /* the table's own */
        c->indexed = 1;
        t->n++;
    }
    pthread_rwlock_unlock(&t->index_lock);
    return rc;
}

void tn_ttable_del(struct tn_ttable *t, struct tn_tcpc *c)
{
    pthread_rwlock_wrlock(&t->index_lock);
    int i = c->indexed ? find_slot(t, c->v6, c->src, c->dst, c->sport, c->dport) : -1;
    if (i >= 0) {
        /* backward-shift deletion: no tombstones for linear probing */
        uint32_t hole = (uint32_t)i, j = (uint32_t)i;
        t->slot[hole] = NULL;
        for (;;) {
            j = (j + 1) & TT_MASK;
            struct tn_tcpc *x = t->slot[j];
            if (x == NULL)
                break;
            uint32_t home = key_hash(x->v6, x->src, x->dst, x->sport, x->dport) & TT_MASK;
            /* x may fill the hole unless its home lies cyclically in (hole, j] */
            int stays = hole <= j ? (home > hole && home <= j) : (home > hole || home <= j);
            if (!stays) {
                t->slot[hole] = x;
                t->slot[j] = NULL;
                hole = j;
            }
        }
        c->indexed = 0;
        t->n--;
    }
    pthread_rwlock_unlock(&t->index_lock);
    pthread_mutex_lock(&t->list_lock);  /* never handed to Python after this */
    for (uint32_t k = 0; k < t->nlisted; k++) {
        if (t->list[k] == c) {
            t->list[k] = t->list[--t->nlisted];
            break;
        }
    }
    c->listed = 0;
    c->gone = 1;
    pthread_mutex_unlock(&t->list_lock);
    if (i >= 0)
        tn_tcpc_unref(c);
}

uint32_t tn_ttable_take(struct tn_ttable *t, struct tn_tcpc **out, uint32_t max)
{
    pthread_mutex_lock(&t->list_lock);
    uint32_t n = t->nlisted < max ? t->nlisted : max;
    for (uint32_t k = 0; k < n; k++) {
        out[k] = t->list[t->nlisted - 1 - k];
        out[k]->listed = 0;
    }
    t->nlisted -= n;
    pthread_mutex_unlock(&t->list_lock);
    return n;
}

uint64_t tn_ttable_fast_frames(const struct tn_ttable *t)
{
    return __atomic_load_n(&t->fast_frames, __ATOMIC_RELAXED);
}

uint64_t tn_ttable_fast_bytes(const struct tn_ttable *t)
{
    return __atomic_load_n(&t->fast_bytes, __ATOMIC_RELAXED);
}

int tn_ttable_should_signal(struct tn_ttable *t)
{
    if (t == NULL || !__atomic_load_n(&t->signal, __ATOMIC_RELAXED))
        return 0;
    return __atomic_exchange_n(&t->signal, 0, __ATOMIC_ACQ_REL);
}

void tn_tcpc_pause(struct tn_tcpc *c, struct tn_tcpc_sync *out)
{
    pthread_mutex_lock(&c->lock);
    c->fast = 0;
    c->held = 1;
    out->rcv_nxt = c->rcv_nxt;
    out->acked = c->acked;
    out->rcv_edge = c->rcv_edge;
    out->window = c->our_field;
    out->acks = c->acks;
    out->took = c->took;
    out->pair = c->pair;
    out->snd_una = c->snd_una;
    out->snd_nxt = c->snd_nxt;
    out->guest_window = c->window_field;
    out->moved = c->moved;
    c->acks = c->took = c->moved = 0;
    pthread_mutex_unlock(&c->lock);
}

void tn_tcpc_resume(struct tn_tcpc *c, const struct tn_tcpc_state *st)
{
    pthread_mutex_lock(&c->lock);
    c->rcv_nxt = st->rcv_nxt;
    c->snd_una = st->snd_una;
    c->window_field = st->window_field;
    c->fast = (st->data != 0 || st->push != 0) && c->fd >= 0;
    c->held = 0;
    c->snd_nxt = st->snd_nxt;
    c->rcv_edge = st->rcv_edge;
    c->ws = st->ws_to > 14 ? 14 : st->ws_to;
    c->ws_from = st->ws_from > 14 ? 14 : st->ws_from;
    c->mss = st->mss;
    c->seg = st->seg > st->mss && st->seg <= TN_TCP_SEG_MAX ? st->seg : st->mss;
    c->ack = st->ack != 0;
    c->our_field = st->our_field;
    c->max_snd_wnd = st->max_snd_wnd;
    c->data = st->data != 0;
    c->push = c->fast && st->push != 0 && c->mss > 0;
    if (st->pair < TN_TCP_PAIRS)
        c->pair = st->pair;
    c->timer = st->timer != 0;
    pthread_mutex_unlock(&c->lock);
}

uint64_t tn_ttable_host_ready(const struct tn_ttable *t)
{
    return __atomic_load_n(&t->host_ready, __ATOMIC_RELAXED);
}

void tn_ttable_set_out(struct tn_ttable *t, uint32_t pair, struct tn_uoutq *q)
{
    if (pair < TN_TCP_PAIRS)
        t->out[pair] = q;
}

uint64_t tn_ttable_fast_sends(const struct tn_ttable *t)
{
    return __atomic_load_n(&t->fast_sends, __ATOMIC_RELAXED);
}

uint64_t tn_ttable_fast_partial(const struct tn_ttable *t)
{
    return __atomic_load_n(&t->fast_partial, __ATOMIC_RELAXED);
}

uint64_t tn_ttable_native_acks(const struct tn_ttable *t)
{
    return __atomic_load_n(&t->native_acks, __ATOMIC_RELAXED);
}

uint64_t tn_ttable_acks_to_python(const struct tn_ttable *t)
{
    return __atomic_load_n(&t->acks_to_python, __ATOMIC_RELAXED);
}

uint64_t tn_ttable_guest_acks(const struct tn_ttable *t)
{
    return __atomic_load_n(&t->guest_acks, __ATOMIC_RELAXED);
}

uint64_t tn_ttable_push_segments(const struct tn_ttable *t)
{
    return __atomic_load_n(&t->push_segments, __ATOMIC_RELAXED);
}

/* List c for Python to acknowledge (c locked).  The list holds every
 * connection (TT_LIST), and none that tn_ttable_del removed: a run or an ACK
 * flushed after Python deleted c leaves no pointer to it behind. */
void tn_ttable_list_for_ack(struct tn_ttable *t, struct tn_tcpc *c)
{
    pthread_mutex_lock(&t->list_lock);
    if (!c->listed && !c->gone) {
        t->list[t->nlisted++] = c;
        c->listed = 1;
        __atomic_store_n(&t->signal, 1, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&t->list_lock);
}
