"""virtio-net and virtio transport feature bits, and what trionet offers.

Bit numbers are from the virtio 1.x specification (§5.1.3 and §6).  What we
offer is the base set below plus the offloads the chosen backend can honour.
"""

from __future__ import annotations

# virtio-net device features (§5.1.3)
CSUM = 0
GUEST_CSUM = 1
CTRL_GUEST_OFFLOADS = 2
MTU = 3
MAC = 5
GUEST_TSO4 = 7
GUEST_TSO6 = 8
GUEST_ECN = 9
GUEST_UFO = 10
HOST_TSO4 = 11
HOST_TSO6 = 12
HOST_ECN = 13
HOST_UFO = 14
MRG_RXBUF = 15
STATUS = 16
CTRL_VQ = 17
CTRL_RX = 18
CTRL_VLAN = 19
CTRL_RX_EXTRA = 20
GUEST_ANNOUNCE = 21
MQ = 22
CTRL_MAC_ADDR = 23

# transport features (§6)
NOTIFY_ON_EMPTY = 24
LOG_ALL = 26  # vhost's VHOST_F_LOG_ALL: dirty-page logging for live migration
ANY_LAYOUT = 27
RING_INDIRECT_DESC = 28
RING_EVENT_IDX = 29
VHOST_USER_PROTOCOL_FEATURES = 30  # vhost-user's own bit (VHOST_USER_F_PROTOCOL_FEATURES)
VERSION_1 = 32
ACCESS_PLATFORM = 33
RING_PACKED = 34
IN_ORDER = 35

OFFLOAD_BITS = (
    CSUM,
    GUEST_CSUM,
    GUEST_TSO4,
    GUEST_TSO6,
    GUEST_ECN,
    GUEST_UFO,
    HOST_TSO4,
    HOST_TSO6,
    HOST_ECN,
    HOST_UFO,
)


def bit(n: int) -> int:
    return 1 << n


def mask(*bits: int) -> int:
    m = 0
    for b in bits:
        m |= 1 << b
    return m


def has(features: int, b: int) -> bool:
    return bool(features >> b & 1)


# Always offered: split rings with indirect descriptors and EVENT_IDX, mergeable
# RX buffers, multiqueue with a control queue, and vhost-user protocol features.
BASE_FEATURES = mask(
    VERSION_1,
    RING_INDIRECT_DESC,
    RING_EVENT_IDX,
    IN_ORDER,
    NOTIFY_ON_EMPTY,
    ANY_LAYOUT,
    MRG_RXBUF,
    MQ,
    CTRL_VQ,
    CTRL_RX,
    CTRL_MAC_ADDR,
    CTRL_GUEST_OFFLOADS,
    GUEST_ANNOUNCE,
    STATUS,
    MTU,
    MAC,
    VHOST_USER_PROTOCOL_FEATURES,
    LOG_ALL,
)


def header_length(features: int) -> int:
    """Size of the virtio-net header both ways: 12 with VERSION_1 or MRG_RXBUF, else 10."""
    return 12 if has(features, VERSION_1) or has(features, MRG_RXBUF) else 10


def names(features: int) -> list[str]:
    """Readable names of the bits set, for logs."""
    known = {v: k for k, v in globals().items() if k.isupper() and isinstance(v, int) and v < 64}
    return [known.get(b, f"bit{b}") for b in range(64) if features >> b & 1]
