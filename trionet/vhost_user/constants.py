"""Numbers of the vhost-user protocol, from QEMU's ``docs/interop/vhost-user.rst``.

Everything here is plain data: request codes, protocol feature bits, header
flags and the size bounds the codec enforces. All multi-byte fields on the wire
are in the machine's native byte order (``STRUCT_PREFIX``).
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = [
    "HEADER_SIZE",
    "MAX_FDS_PER_MESSAGE",
    "MAX_MEM_REGIONS_TABLE",
    "MAX_PAYLOAD_SIZE",
    "MEM_REGION_SIZE",
    "STRUCT_PREFIX",
    "VHOST_USER_FLAGS_KNOWN",
    "VHOST_USER_FLAG_NEED_REPLY",
    "VHOST_USER_FLAG_REPLY",
    "VHOST_USER_F_PROTOCOL_FEATURES",
    "VHOST_USER_VERSION",
    "VHOST_USER_VERSION_MASK",
    "VHOST_VRING_F_LOG",
    "VIRTQUEUE_MAX_SIZE",
    "VRING_IDX_MASK",
    "VRING_NOFD_MASK",
    "ProtocolFeature",
    "Request",
]


class Request(enum.IntEnum):
    """Front-end (VMM) to back-end request codes ("Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21  # formerly SET_SLAVE_REQ_FD
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class ProtocolFeature(enum.IntFlag):
    """``VHOST_USER_PROTOCOL_F_*``, as bit masks (the spec numbers the bits)."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    BACKEND_REQ = 1 << 5  # formerly SLAVE_REQ
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10  # formerly SLAVE_SEND_FD
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19


#: Virtio feature bit (in GET/SET_FEATURES) that announces GET/SET_PROTOCOL_FEATURES.
VHOST_USER_F_PROTOCOL_FEATURES: Final = 30

# --- header -------------------------------------------------------------------

#: ``struct`` prefix for every wire layout: native byte order, standard sizes, no padding.
STRUCT_PREFIX: Final = "="

#: request (u32), flags (u32), size (u32).
HEADER_SIZE: Final = 12

#: The low two bits of ``flags`` carry the protocol version, which must be 1.
VHOST_USER_VERSION_MASK: Final = 0x3
VHOST_USER_VERSION: Final = 0x1
#: Set on every message the back-end sends in answer to a request.
VHOST_USER_FLAG_REPLY: Final = 0x4
#: Set by the front-end when it wants a REPLY_ACK answer to a request.
VHOST_USER_FLAG_NEED_REPLY: Final = 0x8
#: Every defined flag bit; anything else is reserved and must be zero.
VHOST_USER_FLAGS_KNOWN: Final = (
    VHOST_USER_VERSION_MASK | VHOST_USER_FLAG_REPLY | VHOST_USER_FLAG_NEED_REPLY
)

#: Upper bound on the ``size`` header field of any message, checked as soon as the
#: header is in. The largest payload trionet decodes is a full SET_MEM_TABLE
#: (8 + 8 * 32 = 264 bytes), but unsupported requests are read whole before they
#: are NACKed, and the largest of those the spec defines is GET/SET_CONFIG: a
#: 12-byte ``VhostUserConfig`` header plus at most 4096 bytes of config space.
#: Anything bigger is garbage or hostile, and refusing it at the header bounds
#: what one message can make us buffer.
MAX_PAYLOAD_SIZE: Final = 4096 + HEADER_SIZE

#: At most this many SCM_RIGHTS fds travel with one message. QEMU's
#: ``VHOST_MEMORY_BASELINE_NREGIONS``; DPDK's virtio-user uses the same bound.
MAX_FDS_PER_MESSAGE: Final = 8

#: Most regions one SET_MEM_TABLE may carry (one fd each). Front-ends with more
#: memory slots use ADD_MEM_REG / REM_MEM_REG (CONFIGURE_MEM_SLOTS) instead.
MAX_MEM_REGIONS_TABLE: Final = 8

#: One memory region on the wire: guest_addr, size, user_addr, mmap_offset (4 x u64).
MEM_REGION_SIZE: Final = 32

# --- payload fields -----------------------------------------------------------

#: SET_VRING_KICK/CALL/ERR u64 payload: bits 0-7 are the vring index ...
VRING_IDX_MASK: Final = 0xFF
#: ... and bit 8 says "no fd attached" (poll instead).
VRING_NOFD_MASK: Final = 0x100

#: The only flag defined for SET_VRING_ADDR: log writes to the used ring.
VHOST_VRING_F_LOG: Final = 0x1

#: Virtio caps every queue size (split and packed) at 32768 entries.
VIRTQUEUE_MAX_SIZE: Final = 32768
