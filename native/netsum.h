/* Internet checksums and iovec windows shared by the native user-mode paths
 * (static inline: nothing here is part of the Python interface). */
#pragma once
/* cdef-skip */
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>

/* Sums are taken over little-endian 16-bit words: the folded result is the
 * byte-swapped network-order sum, and its complement stored as-is (memcpy of
 * a uint16_t) at an even offset is the right checksum field. */
static inline uint64_t ns_sum_le(const uint8_t *p, size_t len, uint64_t acc)
{
    /* 32 bytes a pass: the 32-bit halves of four 64-bit loads go to four
     * sums, so no add waits for the one before (each sum grows by less than
     * 2^33 a pass: no overflow below 64 GiB) */
    uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    while (len >= 32) {
        uint64_t w[4];
        memcpy(w, p, 32);
        a0 += (uint32_t)w[0] + (w[0] >> 32);
        a1 += (uint32_t)w[1] + (w[1] >> 32);
        a2 += (uint32_t)w[2] + (w[2] >> 32);
        a3 += (uint32_t)w[3] + (w[3] >> 32);
        p += 32;
        len -= 32;
    }
    acc += a0 + a1 + a2 + a3;
    while (len >= 4) {
        uint32_t v;
        memcpy(&v, p, 4);
        acc += v;
        p += 4;
        len -= 4;
    }
    if (len >= 2) {
        uint16_t v;
        memcpy(&v, p, 2);
        acc += v;
        p += 2;
        len -= 2;
    }
    if (len)
        acc += p[0];
    return acc;
}

static inline uint16_t ns_fold(uint64_t acc)
{
    for (int i = 0; i < 8 && (acc >> 16); i++)  /* 64 bits fold down in at most 5 */
        acc = (acc & 0xffff) + (acc >> 16);
    return (uint16_t)acc;
}

/* Sum len bytes of iovecs; a segment that starts at an odd position in the
 * stream contributes byte-swapped. */
static inline uint64_t ns_sum_iov(const struct iovec *iov, uint32_t n, uint32_t len, uint64_t acc)
{
    uint32_t pos = 0;
    for (uint32_t i = 0; i < n && pos < len; i++) {
        uint32_t take = iov[i].iov_len < len - pos ? (uint32_t)iov[i].iov_len : len - pos;
        uint16_t s = ns_fold(ns_sum_le(iov[i].iov_base, take, 0));
        acc += (pos & 1) ? __builtin_bswap16(s) : s;
        pos += take;
    }
    return acc;
}

/* The window [off, off+len) of iovecs as iovecs in out (at most max
 * entries); returns the entries used. */
static inline uint32_t ns_iov_window(const struct iovec *iov, uint32_t n, uint32_t off,
                                     uint32_t len, struct iovec *out, uint32_t max)
{
    uint32_t k = 0;
    for (uint32_t i = 0; i < n && len > 0 && k < max; i++) {
        size_t l = iov[i].iov_len;
        if (off >= l) {
            off -= (uint32_t)l;
            continue;
        }
        size_t take = l - off < len ? l - off : len;
        out[k].iov_base = (uint8_t *)iov[i].iov_base + off;
        out[k].iov_len = take;
        k++;
        len -= (uint32_t)take;
        off = 0;
    }
    return k;
}

/* Copy len bytes between flat memory and the iovecs' bytes [off, off+len):
 * into the iovecs with to_iov, out of them without; returns bytes copied. */
static inline uint32_t ns_iov_copy(const struct iovec *iov, uint32_t n, uint32_t off, uint8_t *buf,
                                   uint32_t len, int to_iov)
{
    uint32_t done = 0;
    for (uint32_t i = 0; i < n && done < len; i++) {
        size_t l = iov[i].iov_len;
        if (off >= l) {
            off -= (uint32_t)l;
            continue;
        }
        size_t take = l - off < len - done ? l - off : len - done;
        uint8_t *p = (uint8_t *)iov[i].iov_base + off;
        if (to_iov)
            memcpy(p, buf + done, take);
        else
            memcpy(buf + done, p, take);
        done += (uint32_t)take;
        off = 0;
    }
    return done;
}

static inline uint32_t ns_iov_put(const struct iovec *iov, uint32_t n, uint32_t off,
                                  const uint8_t *buf, uint32_t len)
{
    return ns_iov_copy(iov, n, off, (uint8_t *)buf, len, 1);
}

static inline uint32_t ns_iov_get(const struct iovec *iov, uint32_t n, uint32_t off, uint8_t *buf,
                                  uint32_t len)
{
    return ns_iov_copy(iov, n, off, buf, len, 0);
}
/* cdef-end */
