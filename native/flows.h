/* Flow-to-queue-pair table shared by every pair of a VM (read by cffi as cdef).
 *
 * Direct-mapped by a symmetric flow hash (a reply hashes like its request):
 * O(1) note and lookup, fixed size, entries expire after ttl seconds. */
#pragma once
#include <stdint.h>

#define TN_FLOW_SLOTS 8192

struct tn_flow {
    uint32_t hash;
    uint8_t pair;
    uint8_t valid;
    uint16_t pad;
    uint64_t stamp;           /* seconds (CLOCK_MONOTONIC_COARSE) of the last note */
};

struct tn_flows {
    uint32_t ttl;             /* seconds an idle flow is remembered */
    uint32_t count;           /* valid slots (approximate once flows expire) */
    uint64_t notes;
    uint64_t collisions;      /* a flow evicted another */
    uint64_t rehomed;
    struct tn_flow slots[8192];
};

/* Symmetric hash of the flow a frame belongs to (frame starts with hdr_len
 * bytes of virtio-net header): IPv4/IPv6 addresses + TCP/UDP/SCTP ports when
 * present, else Ethernet addresses.  Never 0. */
uint32_t tn_flow_hash(const uint8_t *frame, uint32_t len, uint32_t hdr_len);
uint64_t tn_flow_now(void);
void tn_flow_note(struct tn_flows *t, uint32_t hash, uint8_t pair, uint64_t now);
/* The pair the flow was last sent on, or -1 (unknown or expired). */
int tn_flow_lookup(const struct tn_flows *t, uint32_t hash, uint64_t now);
/* The pair for traffic of this flow coming from the host side: the one it was
 * last sent on if active, else spread by hash over the active pairs. */
int tn_flow_pair_for(struct tn_flows *t, uint32_t hash, uint8_t active, uint64_t now);
/* Move every flow on a pair >= active onto an active pair by hash. */
uint32_t tn_flow_rehome(struct tn_flows *t, uint8_t active);
