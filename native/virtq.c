/* trionet's native ring core: see virtq.h for the contract.  This file:
 * guest memory and the split rings (pop, push, publish with the dirty log,
 * notifications); the copies and the batched paths are in virtq_batch.c. */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "virtq.h"

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define DESC_F_INDIRECT 4
#define AVAIL_F_NO_INTERRUPT 1
#define USED_F_NO_NOTIFY 1
#define DIR_READ 0
#define DIR_WRITE 1
#define DIR_ANY 2

/* ---- little-endian loads and stores, barriers ------------------------- */

static inline uint16_t ld16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t ld32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t ld64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline void st16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static inline void st32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "trionet's ring core assumes a little-endian host (virtio 1.x rings are little-endian)"
#endif

static inline uint16_t ld16_acquire(const uint8_t *p)
{
    return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE);
}

static inline void st16_release(uint8_t *p, uint16_t v)
{
    __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE);
}

static inline void full_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

const char *tn_strerror(int code)
{
    switch (code) {
    case TN_E_AVAIL_JUMP: return "avail index moved by more than the queue size";
    case TN_E_HEAD_RANGE: return "descriptor head index out of range";
    case TN_E_NEXT_RANGE: return "descriptor next index out of range";
    case TN_E_LOOP: return "descriptor chain loops or is longer than its table";
    case TN_E_ADDR: return "descriptor address outside guest memory";
    case TN_E_INDIRECT_NOT_NEGOTIATED: return "indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC";
    case TN_E_INDIRECT_NESTED: return "indirect descriptor inside an indirect table";
    case TN_E_INDIRECT_LEN: return "indirect table length is zero or not a multiple of 16";
    case TN_E_INDIRECT_WITH_NEXT: return "descriptor has both INDIRECT and NEXT";
    case TN_E_WRITE_IN_READ_CHAIN: return "device-writable descriptor where a readable one belongs";
    case TN_E_READ_IN_WRITE_CHAIN: return "device-readable descriptor where a writable one belongs";
    case TN_E_READ_AFTER_WRITE: return "device-readable descriptor after a writable one";
    case TN_E_TOO_MANY_IOV: return "descriptor chain has more segments than the backend accepts";
    case TN_E_CHAIN_TOO_LONG: return "descriptor chain total length overflows";
    case TN_E_INDIRECT_NOT_HEAD: return "indirect descriptor not at the head of its chain";
    case TN_E_NOT_READY: return "ring addresses are not set or not inside guest memory";
    case TN_E_INDIRECT_TOO_BIG: return "indirect table has more descriptors than the ring size or 1024";
    default: return "unknown ring error";
    }
}

/* ---- guest memory ------------------------------------------------------ */

void *tn_mmap(int fd, uint64_t size, uint64_t offset)
{
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, (off_t)offset);
    return p == MAP_FAILED ? NULL : p;
}

int tn_munmap(void *addr, uint64_t size)
{
    return munmap(addr, size) < 0 ? -errno : 0;
}

/* Host pointer for [gpa, gpa+len) when it lies inside one region, else NULL. */
uint8_t *tn_mem_gpa(const struct tn_mem *m, uint64_t gpa, uint64_t len)
{
    for (uint32_t i = 0; i < m->nregions; i++) {
        const struct tn_region *r = &m->regions[i];
        if (gpa >= r->gpa && gpa - r->gpa < r->size && len <= r->size - (gpa - r->gpa))
            return r->host + (gpa - r->gpa);
    }
    return NULL;
}

uint8_t *tn_mem_uva(const struct tn_mem *m, uint64_t uva, uint64_t len)
{
    for (uint32_t i = 0; i < m->nregions; i++) {
        const struct tn_region *r = &m->regions[i];
        if (uva >= r->uva && uva - r->uva < r->size && len <= r->size - (uva - r->uva))
            return r->host + (uva - r->uva);
    }
    return NULL;
}

int tn_mem_uva_to_gpa(const struct tn_mem *m, uint64_t uva, uint64_t *gpa)
{
    for (uint32_t i = 0; i < m->nregions; i++) {
        const struct tn_region *r = &m->regions[i];
        if (uva >= r->uva && uva - r->uva < r->size) {
            *gpa = r->gpa + (uva - r->uva);
            return 0;
        }
    }
    return -1;
}

/* Does [gpa, gpa+len) run past the top of the 64-bit address space?  Such a
 * range would wrap to gpa 0 and go on in whatever region is mapped there. */
static int wraps(uint64_t gpa, uint64_t len)
{
    return len > 0 && gpa + (len - 1) < gpa;
}

/* Largest host span starting at gpa inside one region (len capped), or NULL. */
static uint8_t *span(const struct tn_mem *m, uint64_t gpa, uint64_t len, uint64_t *got)
{
    for (uint32_t i = 0; i < m->nregions; i++) {
        const struct tn_region *r = &m->regions[i];
        if (gpa >= r->gpa && gpa - r->gpa < r->size) {
            uint64_t room = r->size - (gpa - r->gpa);
            *got = len < room ? len : room;
            return r->host + (gpa - r->gpa);
        }
    }
    return NULL;
}

int tn_mem_read(const struct tn_mem *m, uint64_t gpa, void *dst, uint64_t len)
{
    uint8_t *out = dst;
    if (wraps(gpa, len))
        return TN_E_ADDR;
    while (len > 0) {
        uint64_t got;
        uint8_t *p = span(m, gpa, len, &got);
        if (p == NULL)
            return TN_E_ADDR;
        memcpy(out, p, got);
        out += got; gpa += got; len -= got;
    }
    return 0;
}

int tn_mem_write(const struct tn_mem *m, uint64_t gpa, const void *src, uint64_t len)
{
    const uint8_t *in = src;
    if (wraps(gpa, len))
        return TN_E_ADDR;
    while (len > 0) {
        uint64_t got;
        uint8_t *p = span(m, gpa, len, &got);
        if (p == NULL)
            return TN_E_ADDR;
        memcpy(p, in, got);
        tn_log_mark(__atomic_load_n(&m->log, __ATOMIC_ACQUIRE), gpa, got);
        in += got; gpa += got; len -= got;
    }
    return 0;
}

/* ---- split ring -------------------------------------------------------- */
/* avail: flags u16, idx u16, ring[size] u16, used_event u16
 * used:  flags u16, idx u16, ring[size] {u32 id, u32 len}, avail_event u16 */

void tn_vq_fail(struct tn_vq *vq, int code, uint64_t detail)
{
    if (!vq->broken) {
        vq->broken = 1;
        vq->error = code;
        vq->error_detail = detail;
    }
}

static int fail(struct tn_vq *vq, int code, uint64_t detail)
{
    tn_vq_fail(vq, code, detail);
    return code;
}

int tn_vq_setup(struct tn_vq *vq, const struct tn_mem *m, uint16_t size,
                uint64_t desc_gpa, uint64_t avail_gpa, uint64_t used_gpa)
{
    if (size == 0)
        return TN_E_NOT_READY;
    vq->size = size;
    vq->short_valid = 0;
    vq->desc = tn_mem_gpa(m, desc_gpa, 16ull * size);
    vq->avail = tn_mem_gpa(m, avail_gpa, 6ull + 2ull * size);
    vq->used = tn_mem_gpa(m, used_gpa, 6ull + 8ull * size);
    if (vq->desc == NULL || vq->avail == NULL || vq->used == NULL) {
        vq->desc = vq->avail = vq->used = NULL;
        return TN_E_NOT_READY;
    }
    vq->mem = m;
    vq->used_log = used_gpa;
    return 0;
}

uint16_t tn_vq_avail_idx(struct tn_vq *vq) { return ld16_acquire(vq->avail + 2); }

uint16_t tn_vq_used_idx_in_ring(struct tn_vq *vq) { return ld16(vq->used + 2); }

/* Chains available to pop, or TN_E_AVAIL_JUMP (ring broken). */
int tn_vq_pending(struct tn_vq *vq)
{
    if (vq->broken)
        return vq->error;
    if (vq->desc == NULL)
        return TN_E_NOT_READY;
    uint16_t n = (uint16_t)(tn_vq_avail_idx(vq) - vq->last_avail);
    if (n > vq->size)
        return fail(vq, TN_E_AVAIL_JUMP, n);
    return n;
}

/* Append [addr, addr+len) as host iovecs (split where guest regions split). */
static int add_iov(const struct tn_mem *m, uint64_t addr, uint32_t len, struct iovec *iov,
                   uint32_t max_iov, uint32_t *niov)
{
    if (wraps(addr, len))
        return TN_E_ADDR;
    while (len > 0) {
        uint64_t got;
        uint8_t *p = span(m, addr, len, &got);
        if (p == NULL)
            return TN_E_ADDR;
        if (*niov >= max_iov)
            return TN_E_TOO_MANY_IOV;
        iov[*niov].iov_base = p;
        iov[*niov].iov_len = got;
        (*niov)++;
        addr += got; len -= (uint32_t)got;
    }
    return 0;
}

int tn_vq_pop_iov(struct tn_vq *vq, const struct tn_mem *m, int dir, struct iovec *iov,
                  uint32_t max_iov, uint32_t *niov, uint32_t *nread, uint32_t *read_len,
                  uint32_t *write_len, uint16_t *head_out)
{
    int n = tn_vq_pending(vq);
    if (n <= 0)
        return n;
    uint16_t slot = vq->last_avail % vq->size;
    uint16_t head = ld16(vq->avail + 4 + 2 * slot);
    if (head >= vq->size)
        return fail(vq, TN_E_HEAD_RANGE, head);

    const uint8_t *table = vq->desc;
    uint32_t table_len = vq->size;
    uint32_t idx = head, ttl = vq->size, first_iov = *niov;
    uint64_t rlen = 0, wlen = 0;
    int seen_write = 0, in_indirect = 0, rc;
    *nread = 0;

    for (;;) {
        const uint8_t *d = table + 16u * idx;
        uint64_t addr = ld64(d);
        uint32_t len = ld32(d + 8);
        uint16_t flags = ld16(d + 12);
        uint16_t next = ld16(d + 14);

        if (flags & DESC_F_INDIRECT) {
            if (!vq->indirect)
                return fail(vq, TN_E_INDIRECT_NOT_NEGOTIATED, idx);
            if (in_indirect)
                return fail(vq, TN_E_INDIRECT_NESTED, idx);
            if (flags & DESC_F_NEXT)
                return fail(vq, TN_E_INDIRECT_WITH_NEXT, idx);
            if (idx != head || *niov != first_iov)
                return fail(vq, TN_E_INDIRECT_NOT_HEAD, idx);
            if (len == 0 || len % 16 != 0)
                return fail(vq, TN_E_INDIRECT_LEN, len);
            if (len / 16 > TN_MAX_INDIRECT && len / 16 > vq->size)
                return fail(vq, TN_E_INDIRECT_TOO_BIG, len / 16);
            table = tn_mem_gpa(m, addr, len);
            if (table == NULL)
                return fail(vq, TN_E_ADDR, addr);
            table_len = len / 16;
            ttl = table_len;
            idx = 0;
            in_indirect = 1;
            continue;
        }
        if (flags & DESC_F_WRITE) {
            if (dir == DIR_READ)
                return fail(vq, TN_E_WRITE_IN_READ_CHAIN, idx);
            seen_write = 1;
            wlen += len;
        } else {
            if (dir == DIR_WRITE)
                return fail(vq, TN_E_READ_IN_WRITE_CHAIN, idx);
            if (seen_write)
                return fail(vq, TN_E_READ_AFTER_WRITE, idx);
            rlen += len;
        }
        if (rlen + wlen > 0xffffffffull)
            return fail(vq, TN_E_CHAIN_TOO_LONG, rlen + wlen);
        rc = add_iov(m, addr, len, iov, max_iov, niov);
        if (rc < 0) {
            if (rc == TN_E_TOO_MANY_IOV && *niov - first_iov < TN_MAX_CHAIN_IOV && first_iov > 0) {
                /* caller's batch space ran out, not the chain's fault */
                *niov = first_iov;
                return 0;
            }
            return fail(vq, rc, rc == TN_E_ADDR ? addr : idx);
        }
        if (!(flags & DESC_F_WRITE))
            *nread = *niov - first_iov;
        if (!(flags & DESC_F_NEXT))
            break;
        if (--ttl == 0)
            return fail(vq, TN_E_LOOP, idx);
        if (next >= table_len)
            return fail(vq, TN_E_NEXT_RANGE, next);
        idx = next;
    }
    *read_len = (uint32_t)rlen;
    *write_len = (uint32_t)wlen;
    *head_out = head;
    vq->last_avail++;
    return 1;
}

int tn_vq_pop(struct tn_vq *vq, const struct tn_mem *m, int dir, struct tn_chain *c)
{
    uint32_t niov = 0, nread = 0, rl = 0, wl = 0;
    uint16_t head = 0;
    int rc = tn_vq_pop_iov(vq, m, dir, c->iov, TN_MAX_CHAIN_IOV, &niov, &nread, &rl, &wl, &head);
    if (rc <= 0)
        return rc;
    c->head = head;
    c->nread = (uint16_t)nread;
    c->nwrite = (uint16_t)(niov - nread);
    c->read_len = rl;
    c->write_len = wl;
    return 1;
}

void tn_vq_rewind(struct tn_vq *vq, uint16_t n) { vq->last_avail -= n; }

int tn_vq_discard(struct tn_vq *vq, const struct tn_mem *m, int dir, uint32_t max)
{
    struct iovec iov[TN_MAX_CHAIN_IOV];
    int done = 0;
    while ((uint32_t)done < max) {
        uint32_t niov = 0, nread, rl, wl;
        uint16_t head;
        int rc = tn_vq_pop_iov(vq, m, dir, iov, TN_MAX_CHAIN_IOV, &niov, &nread, &rl, &wl, &head);
        if (rc < 0) {
            if (done)
                tn_vq_publish(vq);
            return rc;
        }
        if (rc == 0)
            break;
        tn_vq_push(vq, head, 0);
        done++;
    }
    if (done)
        tn_vq_publish(vq);
    return done;
}

void tn_vq_push(struct tn_vq *vq, uint16_t head, uint32_t len)
{
    uint8_t *e = vq->used + 4 + 8u * (vq->used_idx % vq->size);
    st32(e, head);
    st32(e + 4, len);
    vq->used_idx++;
}

/* ---- dirty logging ------------------------------------------------------- */

static inline struct tn_log *vq_log(const struct tn_vq *vq)
{
    return vq->mem != NULL ? __atomic_load_n(&vq->mem->log, __ATOMIC_ACQUIRE) : NULL;
}

/* Mark the pages of the first len device-writable bytes of the chain at head
 * (what a completion of length len wrote).  The chain was checked when it was
 * popped; this walk is bounded again all the same, and stops quietly at
 * anything odd (the driver changing a chain it handed over hurts only it). */
static void log_chain(struct tn_log *log, const struct tn_vq *vq, uint32_t head, uint32_t len)
{
    const uint8_t *table = vq->desc;
    uint32_t table_len = vq->size, idx = head, ttl = vq->size;
    int in_indirect = 0;
    if (head >= vq->size)
        return;
    while (len > 0) {
        const uint8_t *d = table + 16u * idx;
        uint64_t addr = ld64(d);
        uint32_t dlen = ld32(d + 8);
        uint16_t flags = ld16(d + 12), next = ld16(d + 14);
        if (flags & DESC_F_INDIRECT) {
            if (in_indirect || dlen < 16 || dlen / 16 > 0xffff)
                return;
            table = tn_mem_gpa(vq->mem, addr, dlen);
            if (table == NULL)
                return;
            table_len = ttl = dlen / 16;
            idx = 0;
            in_indirect = 1;
            continue;
        }
        if (flags & DESC_F_WRITE) {
            uint32_t take = dlen < len ? dlen : len;
            tn_log_mark(log, addr, take);
            len -= take;
        }
        if (!(flags & DESC_F_NEXT) || --ttl == 0 || next >= table_len)
            return;
        idx = next;
    }
}

static inline void log_used(struct tn_log *log, const struct tn_vq *vq, uint64_t off, uint64_t len)
{
    tn_log_mark(log, vq->used_log + off, len);
}

void tn_vq_publish(struct tn_vq *vq)
{
    struct tn_log *log = vq_log(vq);
    if (log != NULL) {
        /* entries pushed since the last publish: from the index we last stored */
        uint16_t from = ld16(vq->used + 2), n = (uint16_t)(vq->used_idx - from);
        if (n > vq->size) {
            from = (uint16_t)(vq->used_idx - vq->size);
            n = vq->size;
        }
        for (uint16_t i = 0; i < n; i++) {
            uint32_t slot = (uint16_t)(from + i) % vq->size;
            const uint8_t *e = vq->used + 4 + 8u * slot;
            log_chain(log, vq, ld32(e), ld32(e + 4));
            log_used(log, vq, 4 + 8u * slot, 8);
        }
    }
    st16_release(vq->used + 2, vq->used_idx);
    if (log != NULL)
        log_used(log, vq, 2, 2);
}

/* Does the guest want an interrupt for what was published since the last one? */
int tn_vq_needs_notify(struct tn_vq *vq)
{
    full_fence();
    if (vq->event_idx) {
        uint16_t old = vq->signalled_used, new_idx = vq->used_idx;
        uint16_t event = ld16(vq->avail + 4 + 2 * vq->size);
        int valid = vq->signalled_valid;
        vq->signalled_used = new_idx;
        vq->signalled_valid = 1;
        if (!valid)
            return 1;
        /* vring_need_event: did new_idx pass event since old? (wrapping) */
        return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
    }
    return !(ld16(vq->avail) & AVAIL_F_NO_INTERRUPT);
}

/* The avail index up to which the ring has been looked at: last_avail, or
 * further when the last RX gather from here found the room too small. */
static uint16_t seen_avail(const struct tn_vq *vq)
{
    return vq->short_valid && vq->short_from == vq->last_avail ? vq->short_at : vq->last_avail;
}

/* Has the driver made buffers available beyond those looked at?  (Counted
 * from last_avail, so an avail index moved backwards is no news either.) */
static int avail_news(struct tn_vq *vq, uint16_t seen)
{
    return (uint16_t)(tn_vq_avail_idx(vq) - vq->last_avail) > (uint16_t)(seen - vq->last_avail);
}

/* Ask the guest to kick on new buffers; 1 if some arrived meanwhile. */
int tn_vq_enable_notify(struct tn_vq *vq)
{
    if (vq->desc == NULL || vq->broken)
        return 0;
    uint16_t seen = seen_avail(vq);
    struct tn_log *log = vq_log(vq);
    if (vq->event_idx) {
        st16(vq->used + 4 + 8u * vq->size, seen);
        if (log != NULL)
            log_used(log, vq, 4 + 8u * vq->size, 2);
    } else {
        st16(vq->used, ld16(vq->used) & ~USED_F_NO_NOTIFY);
        if (log != NULL)
            log_used(log, vq, 0, 2);
    }
    full_fence();
    return avail_news(vq, seen);
}

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int tn_vq_spin(struct tn_vq *vq, uint32_t ns)
{
    if (vq->desc == NULL || vq->broken || ns == 0)
        return 0;
    uint64_t end = now_ns() + ns;
    uint16_t seen = seen_avail(vq);
    do {
        for (int i = 0; i < 64; i++) {
            if (avail_news(vq, seen))
                return 1;
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
        }
    } while (now_ns() < end);
    return 0;
}

void tn_vq_disable_notify(struct tn_vq *vq)
{
    if (vq->desc == NULL || vq->event_idx)
        return;
    st16(vq->used, ld16(vq->used) | USED_F_NO_NOTIFY);
    struct tn_log *log = vq_log(vq);
    if (log != NULL)
        log_used(log, vq, 0, 2);
}
