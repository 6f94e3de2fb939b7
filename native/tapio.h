/* Tap device ioctls and fd helpers for trionet (read by cffi as cdef). */
#pragma once
#include <stdint.h>
#include <stddef.h>

/* Open /dev/net/tun and bind it to tap NAME with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR
 * plus IFF_MULTI_QUEUE when multi_queue != 0.  The fd is O_NONBLOCK|O_CLOEXEC.
 * Returns the fd, or -errno.  The kernel's final name is written to name_out
 * (at least 16 bytes). */
int tn_tap_open(const char *name, int multi_queue, char *name_out);
/* TUNSETQUEUE with IFF_ATTACH_QUEUE (attach != 0) or IFF_DETACH_QUEUE. 0 or -errno. */
int tn_tap_set_queue(int fd, int attach);
/* TUNSETVNETHDRSZ. 0 or -errno. */
int tn_tap_set_vnet_hdr_sz(int fd, int size);
/* TUNSETOFFLOAD with TUN_F_* flags. 0 or -errno. */
int tn_tap_set_offload(int fd, unsigned int flags);
/* TUNGETFEATURES: the IFF_* flags this kernel's tun driver supports, or -errno. */
int tn_tap_get_features(int fd);

/* TUN_F_* offload bits and IFF_* flags, as the kernel defines them. */
#define TN_TUN_F_CSUM 1
#define TN_TUN_F_TSO4 2
#define TN_TUN_F_TSO6 4
#define TN_TUN_F_TSO_ECN 8
#define TN_TUN_F_UFO 16
