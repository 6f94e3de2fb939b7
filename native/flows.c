/* Flow table: see flows.h. */
#define _GNU_SOURCE
#include <string.h>
#include <time.h>

#include "flows.h"

static inline uint32_t mix(uint32_t h, uint32_t v)
{
    h ^= v;
    h *= 0x9e3779b1u;
    return h ^ (h >> 15);
}

/* Combine two endpoint words in an order-independent way. */
static inline uint32_t sym(uint32_t h, uint32_t a, uint32_t b)
{
    return mix(mix(h, a < b ? a : b), a < b ? b : a);
}

static inline uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint16_t rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }

uint32_t tn_flow_hash(const uint8_t *frame, uint32_t len, uint32_t hdr_len)
{
    if (len < hdr_len + 14)
        return 1;
    const uint8_t *eth = frame + hdr_len;
    uint32_t n = len - hdr_len, off = 12;
    uint16_t type = (uint16_t)(eth[12] << 8 | eth[13]);
    int vlans = 0;
    while ((type == 0x8100 || type == 0x88a8) && vlans++ < 2 && n >= off + 6) {
        off += 4;
        type = (uint16_t)(eth[off] << 8 | eth[off + 1]);
    }
    off += 2;
    uint32_t h = 0x811c9dc5u, proto = 0, l4 = 0;
    if (type == 0x0800 && n >= off + 20) {
        const uint8_t *ip = eth + off;
        uint32_t ihl = (uint32_t)(ip[0] & 0xf) * 4;
        proto = ip[9];
        h = sym(mix(h, 4), rd32(ip + 12), rd32(ip + 16));
        int frag = (rd16(ip + 6) & __builtin_bswap16(0x3fff)) != 0;
        if (!frag && ihl >= 20)
            l4 = off + ihl;
    } else if (type == 0x86dd && n >= off + 40) {
        const uint8_t *ip = eth + off;
        proto = ip[6];
        uint32_t a = 0, b = 0;
        for (int i = 0; i < 4; i++) {
            a = mix(a, rd32(ip + 8 + 4 * i));
            b = mix(b, rd32(ip + 24 + 4 * i));
        }
        h = sym(mix(h, 6), a, b);
        l4 = off + 40;
    } else {
        uint32_t a = mix(rd32(eth), rd16(eth + 4)), b = mix(rd32(eth + 6), rd16(eth + 10));
        h = sym(mix(h, type), a, b);
        return h ? h : 1;
    }
    h = mix(h, proto);
    if (l4 && (proto == 6 || proto == 17 || proto == 132) && n >= l4 + 4)
        h = sym(h, rd16(eth + l4), rd16(eth + l4 + 2));
    return h ? h : 1;
}

uint64_t tn_flow_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (uint64_t)ts.tv_sec;
}

void tn_flow_note(struct tn_flows *t, uint32_t hash, uint8_t pair, uint64_t now)
{
    struct tn_flow *s = &t->slots[hash % TN_FLOW_SLOTS];
    if (!s->valid)
        t->count++;
    else if (s->hash != hash)
        t->collisions++;
    s->hash = hash;
    s->pair = pair;
    s->valid = 1;
    s->stamp = now;
    t->notes++;
}

int tn_flow_lookup(const struct tn_flows *t, uint32_t hash, uint64_t now)
{
    const struct tn_flow *s = &t->slots[hash % TN_FLOW_SLOTS];
    if (!s->valid || s->hash != hash || now - s->stamp > t->ttl)
        return -1;
    return s->pair;
}

int tn_flow_pair_for(struct tn_flows *t, uint32_t hash, uint8_t active, uint64_t now)
{
    if (active == 0)
        active = 1;
    int p = tn_flow_lookup(t, hash, now);
    if (p >= 0 && p < active)
        return p;
    p = (int)(hash % active);
    tn_flow_note(t, hash, (uint8_t)p, now);
    return p;
}

uint32_t tn_flow_rehome(struct tn_flows *t, uint8_t active)
{
    uint32_t moved = 0;
    if (active == 0)
        active = 1;
    for (uint32_t i = 0; i < TN_FLOW_SLOTS; i++) {
        struct tn_flow *s = &t->slots[i];
        if (s->valid && s->pair >= active) {
            s->pair = (uint8_t)(s->hash % active);
            moved++;
        }
    }
    t->rehomed += moved;
    return moved;
}
