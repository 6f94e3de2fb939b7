"""vhost-user replies: the back-end's encoders and the front-end's decoder.

The back-end answers with ``encode_reply_*`` (a header with the REPLY flag,
then the payload); scripted front-ends in tests and tools split what comes
back with ``ReplyDecoder``. The requests and the header layout are in
``messages.py``. No I/O happens here.
"""

from __future__ import annotations

from ..errors import LocalProtocolError, RemoteProtocolError
from .constants import HEADER_SIZE, MAX_PAYLOAD_SIZE, VHOST_USER_FLAG_REPLY, VHOST_USER_VERSION
from .messages import (
    HEADER_STRUCT,
    U64_STRUCT,
    VRING_STATE_STRUCT,
    check_uint,
    encode_header,
    request_name,
)

# --- back-end side: replies going out ----------------------------------------------


def _encode_reply(request: int, payload: bytes) -> bytes:
    check_uint("reply", "request", request, 32)
    return encode_header(request, VHOST_USER_VERSION | VHOST_USER_FLAG_REPLY, len(payload)) + (
        payload
    )


def encode_reply_u64(request: int, value: int) -> bytes:
    """A reply carrying one u64 (GET_FEATURES, GET_QUEUE_NUM, GET_STATUS, ...)."""
    check_uint("reply", "value", value, 64)
    return _encode_reply(request, U64_STRUCT.pack(value))


def encode_reply_vring_state(request: int, index: int, num: int) -> bytes:
    """A reply carrying a vring state (GET_VRING_BASE)."""
    check_uint("reply", "index", index, 32)
    check_uint("reply", "num", num, 32)
    return _encode_reply(request, VRING_STATE_STRUCT.pack(index, num))


def encode_reply_payload(request: int, payload: bytes) -> bytes:
    """A reply carrying ``payload`` as is (GET_CONFIG's failure: empty)."""
    if not isinstance(payload, bytes) or len(payload) > MAX_PAYLOAD_SIZE:
        raise LocalProtocolError(f"reply payload must be bytes of at most {MAX_PAYLOAD_SIZE}")
    return _encode_reply(request, payload)


def encode_reply_ack(request: int, ok: bool) -> bytes:
    """A REPLY_ACK answer: u64 0 for success, 1 for failure."""
    return encode_reply_u64(request, 0 if ok else 1)


# --- front-end side: replies coming back -------------------------------------------


class ReplyDecoder:
    """Splits the back-end's byte stream into replies (for scripted front-ends).

    ``feed`` bytes as they arrive; ``next_reply`` returns ``(request, flags,
    payload)`` once a whole reply is buffered, else None. A reply must have
    flags exactly VERSION | REPLY (as QEMU insists) and a payload of at most
    ``MAX_PAYLOAD_SIZE``; anything else raises ``RemoteProtocolError``, after
    which every call raises ``LocalProtocolError``.
    """

    __slots__ = ("_buf", "_error")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._error: str | None = None

    def _check_state(self) -> None:
        if self._error is not None:
            raise LocalProtocolError(f"ReplyDecoder is in ERROR state after: {self._error}")

    def feed(self, data: bytes) -> None:
        self._check_state()
        self._buf += data

    @property
    def pending_bytes(self) -> int:
        """Bytes buffered that are not yet a whole reply."""
        return len(self._buf)

    def next_reply(self) -> tuple[int, int, bytes] | None:
        self._check_state()
        if len(self._buf) < HEADER_SIZE:
            return None
        request, flags, size = HEADER_STRUCT.unpack_from(self._buf)
        expected = VHOST_USER_VERSION | VHOST_USER_FLAG_REPLY
        problem = None
        if flags != expected:
            problem = f"flags {flags:#x}, expected {expected:#x}"
        elif size > MAX_PAYLOAD_SIZE:
            problem = f"payload size {size} exceeds {MAX_PAYLOAD_SIZE}"
        if problem is not None:
            self._error = f"bad reply to {request_name(request)}: {problem}"
            self._buf.clear()
            raise RemoteProtocolError(self._error)
        end = HEADER_SIZE + size
        if len(self._buf) < end:
            return None
        payload = bytes(self._buf[HEADER_SIZE:end])
        del self._buf[:end]
        return request, flags, payload
