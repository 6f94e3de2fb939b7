"""Back-end side of the vhost-user wire: bytes and fds in, request objects out.

``RequestDecoder`` is sans-IO, in the style of h11 and wsproto: the Trio layer
``feed``s whatever ``recvmsg`` returned (bytes plus SCM_RIGHTS fds), then calls
``next_request`` until it returns None. A message may arrive in many pieces, or
several in one piece; nothing is consumed until a whole message is buffered.

Which message do fds belong to?
    Linux hands SCM_RIGHTS fds over with the ``recvmsg`` that reads the first
    byte of the ``sendmsg`` that carried them, and ends that read at the end of
    that send (``unix_stream_read_generic``). The read may still begin with the
    tail of earlier, fd-less sends. Every front-end we know (QEMU, DPDK
    virtio-user, rust-vmm's frontend in cloud-hypervisor) sends each message,
    fds included, with one ``sendmsg``; a short write only moves the tail to a
    later, fd-less send. So the decoder gives a read's fds to the *last message
    that starts in that read*; if no message starts in it (a sender that put the
    fds on a later part of its message), to the message in progress. A reader
    that reads header and payload separately, as rust-vmm's back-end does, gets
    the same answer.

Every malformed message raises ``RemoteProtocolError`` naming the request; the
decoder then closes every fd it still holds (that message's and any that
arrived for later ones) and is in ERROR: every later call raises
``LocalProtocolError``, like an h11 connection whose peer misbehaved.

Per-request rules live in one table, ``_LAYOUTS``: allowed payload sizes
(checked as soon as the header is in, so a bad size is refused before its
payload is buffered), how many fds the payload calls for, and a builder that
unpacks the payload into a ``messages`` dataclass, which validates its fields.
Requests outside the table decode to ``messages.Unsupported``.
"""

from __future__ import annotations

import enum
import errno
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import LocalProtocolError, RemoteProtocolError
from . import messages as m
from .constants import (
    HEADER_SIZE,
    MAX_FDS_PER_MESSAGE,
    MAX_MEM_REGIONS_TABLE,
    MAX_PAYLOAD_SIZE,
    MEM_REGION_SIZE,
    VHOST_USER_FLAG_NEED_REPLY,
    VHOST_USER_FLAG_REPLY,
    VHOST_USER_FLAGS_KNOWN,
    VHOST_USER_VERSION,
    VHOST_USER_VERSION_MASK,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    Request,
)

__all__ = ["SUPPORTED_REQUESTS", "RequestDecoder"]


class _Malformed(Exception):
    """Raised inside the decoder; becomes a RemoteProtocolError at the boundary."""


# --- payload size rules ------------------------------------------------------------

_U64 = m.U64_STRUCT.size
#: Requests without payload: QEMU, DPDK and rust-vmm send size 0. To be lenient
#: with front-ends that fill in the generic u64 anyway, an 8-byte payload is
#: accepted too (its value ignored); any other size is refused.
_EMPTY = frozenset({0, _U64})
_ONE_U64 = frozenset({_U64})
_VRING_STATE = frozenset({m.VRING_STATE_STRUCT.size})
_VRING_ADDR = frozenset({m.VRING_ADDR_STRUCT.size})
_SINGLE_REGION = frozenset({m.SINGLE_MEM_REGION_STRUCT.size})
_LOG = frozenset({m.LOG_STRUCT.size})
#: SET_MEM_TABLE carries only ``nregions`` entries (QEMU, DPDK and rust-vmm agree).
_MEM_TABLE = frozenset(
    m.MEM_TABLE_HEADER_STRUCT.size + n * MEM_REGION_SIZE
    for n in range(1, MAX_MEM_REGIONS_TABLE + 1)
)


# --- fd rules: payload -> (fewest, most) fds allowed --------------------------------

_FdRule = Callable[[bytes], tuple[int, int]]


def _no_fds(payload: bytes) -> tuple[int, int]:
    return (0, 0)


def _one_fd(payload: bytes) -> tuple[int, int]:
    return (1, 1)


def _discarded_fd(payload: bytes) -> tuple[int, int]:
    # REM_MEM_REG: "the back-end MAY accept messages with one file descriptor ...
    # [and] MUST close it without using it otherwise".
    return (0, 1)


def _fd_per_region(payload: bytes) -> tuple[int, int]:
    (nregions, _padding) = m.MEM_TABLE_HEADER_STRUCT.unpack_from(payload)
    # The padding is not checked: nothing depends on it.
    if m.MEM_TABLE_HEADER_STRUCT.size + nregions * MEM_REGION_SIZE != len(payload):
        raise _Malformed(f"nregions is {nregions} but the payload holds {len(payload)} bytes")
    return (nregions, nregions)


def _vring_fd(payload: bytes) -> tuple[int, int]:
    (value,) = m.U64_STRUCT.unpack(payload)
    return (0, 0) if value & VRING_NOFD_MASK else (1, 1)


# --- builders: (payload, fds, need_reply) -> message ----------------------------------

_Builder = Callable[[bytes, tuple[int, ...], bool], m.RequestMessage]


def _empty(cls: Callable[..., m.RequestMessage]) -> _Builder:
    return lambda payload, fds, need_reply: cls(need_reply=need_reply)


def _u64(cls: Callable[..., m.RequestMessage]) -> _Builder:
    return lambda payload, fds, need_reply: cls(*m.U64_STRUCT.unpack(payload), need_reply)


def _vring_state(cls: Callable[..., m.RequestMessage]) -> _Builder:
    return lambda payload, fds, need_reply: cls(*m.VRING_STATE_STRUCT.unpack(payload), need_reply)


def _build_get_vring_base(payload: bytes, fds: tuple[int, ...], need_reply: bool) -> m.GetVringBase:
    (index, _num) = m.VRING_STATE_STRUCT.unpack(payload)
    return m.GetVringBase(index, need_reply)


def _build_set_vring_enable(
    payload: bytes, fds: tuple[int, ...], need_reply: bool
) -> m.SetVringEnable:
    (index, num) = m.VRING_STATE_STRUCT.unpack(payload)
    if num not in (0, 1):
        raise _Malformed(f"num must be 0 or 1, got {num}")
    return m.SetVringEnable(index, bool(num), need_reply)


def _build_set_vring_addr(payload: bytes, fds: tuple[int, ...], need_reply: bool) -> m.SetVringAddr:
    index, flags, desc, used, avail, log = m.VRING_ADDR_STRUCT.unpack(payload)
    return m.SetVringAddr(index, flags, desc, used, avail, log, need_reply)


def _vring_fd_builder(cls: Callable[..., m.RequestMessage]) -> _Builder:
    def build(payload: bytes, fds: tuple[int, ...], need_reply: bool) -> m.RequestMessage:
        (value,) = m.U64_STRUCT.unpack(payload)
        # Bits 9-63 are unused; like rust-vmm and libvhost-user we ignore them.
        return cls(value & VRING_IDX_MASK, fds[0] if fds else None, need_reply)

    return build


def _region(fields: tuple[int, ...]) -> m.MemRegion:
    guest_addr, size, user_addr, mmap_offset = fields
    return m.MemRegion(guest_addr, size, user_addr, mmap_offset)


def _build_set_mem_table(payload: bytes, fds: tuple[int, ...], need_reply: bool) -> m.SetMemTable:
    (nregions, _padding) = m.MEM_TABLE_HEADER_STRUCT.unpack_from(payload)
    start = m.MEM_TABLE_HEADER_STRUCT.size
    regions = tuple(
        _region(m.MEM_REGION_STRUCT.unpack_from(payload, start + i * MEM_REGION_SIZE))
        for i in range(nregions)
    )
    return m.SetMemTable(regions, fds, need_reply)


def _build_add_mem_reg(payload: bytes, fds: tuple[int, ...], need_reply: bool) -> m.AddMemReg:
    (_padding, *fields) = m.SINGLE_MEM_REGION_STRUCT.unpack(payload)
    return m.AddMemReg(_region(tuple(fields)), fds[0], need_reply)


def _build_rem_mem_reg(payload: bytes, fds: tuple[int, ...], need_reply: bool) -> m.RemMemReg:
    (_padding, *fields) = m.SINGLE_MEM_REGION_STRUCT.unpack(payload)
    return m.RemMemReg(_region(tuple(fields)), need_reply)


def _build_send_rarp(payload: bytes, fds: tuple[int, ...], need_reply: bool) -> m.SendRarp:
    # The MAC is the u64's first 6 bytes; QEMU zeroes the other two, we ignore them.
    return m.SendRarp(payload[:6], need_reply)


def _build_set_log_base(payload: bytes, fds: tuple[int, ...], need_reply: bool) -> m.SetLogBase:
    size, offset = m.LOG_STRUCT.unpack(payload)
    return m.SetLogBase(size, offset, fds[0], need_reply)


def _build_set_log_fd(payload: bytes, fds: tuple[int, ...], need_reply: bool) -> m.SetLogFd:
    return m.SetLogFd(fds[0], need_reply)


def _build_set_status(payload: bytes, fds: tuple[int, ...], need_reply: bool) -> m.SetStatus:
    (value,) = m.U64_STRUCT.unpack(payload)
    if value > 0xFF:
        raise _Malformed(f"status {value:#x} does not fit in a byte")
    return m.SetStatus(value, need_reply)


@dataclass(frozen=True, slots=True)
class _Layout:
    sizes: frozenset[int]
    fds: _FdRule
    build: _Builder
    #: Close the fds as soon as they are counted (REM_MEM_REG).
    discard_fds: bool = False


_LAYOUTS: dict[int, _Layout] = {
    Request.GET_FEATURES: _Layout(_EMPTY, _no_fds, _empty(m.GetFeatures)),
    Request.SET_FEATURES: _Layout(_ONE_U64, _no_fds, _u64(m.SetFeatures)),
    Request.SET_OWNER: _Layout(_EMPTY, _no_fds, _empty(m.SetOwner)),
    Request.RESET_OWNER: _Layout(_EMPTY, _no_fds, _empty(m.ResetOwner)),
    Request.SET_MEM_TABLE: _Layout(_MEM_TABLE, _fd_per_region, _build_set_mem_table),
    Request.SET_VRING_NUM: _Layout(_VRING_STATE, _no_fds, _vring_state(m.SetVringNum)),
    Request.SET_VRING_ADDR: _Layout(_VRING_ADDR, _no_fds, _build_set_vring_addr),
    Request.SET_VRING_BASE: _Layout(_VRING_STATE, _no_fds, _vring_state(m.SetVringBase)),
    Request.GET_VRING_BASE: _Layout(_VRING_STATE, _no_fds, _build_get_vring_base),
    Request.SET_VRING_KICK: _Layout(_ONE_U64, _vring_fd, _vring_fd_builder(m.SetVringKick)),
    Request.SET_VRING_CALL: _Layout(_ONE_U64, _vring_fd, _vring_fd_builder(m.SetVringCall)),
    Request.SET_VRING_ERR: _Layout(_ONE_U64, _vring_fd, _vring_fd_builder(m.SetVringErr)),
    Request.GET_PROTOCOL_FEATURES: _Layout(_EMPTY, _no_fds, _empty(m.GetProtocolFeatures)),
    Request.SET_PROTOCOL_FEATURES: _Layout(_ONE_U64, _no_fds, _u64(m.SetProtocolFeatures)),
    Request.GET_QUEUE_NUM: _Layout(_EMPTY, _no_fds, _empty(m.GetQueueNum)),
    Request.SET_VRING_ENABLE: _Layout(_VRING_STATE, _no_fds, _build_set_vring_enable),
    Request.SEND_RARP: _Layout(_ONE_U64, _no_fds, _build_send_rarp),
    Request.NET_SET_MTU: _Layout(_ONE_U64, _no_fds, _u64(m.NetSetMtu)),
    Request.SET_LOG_BASE: _Layout(_LOG, _one_fd, _build_set_log_base),
    Request.SET_LOG_FD: _Layout(_EMPTY, _one_fd, _build_set_log_fd),
    Request.RESET_DEVICE: _Layout(_EMPTY, _no_fds, _empty(m.ResetDevice)),
    Request.GET_MAX_MEM_SLOTS: _Layout(_EMPTY, _no_fds, _empty(m.GetMaxMemSlots)),
    Request.ADD_MEM_REG: _Layout(_SINGLE_REGION, _one_fd, _build_add_mem_reg),
    Request.REM_MEM_REG: _Layout(
        _SINGLE_REGION, _discarded_fd, _build_rem_mem_reg, discard_fds=True
    ),
    Request.SET_STATUS: _Layout(_ONE_U64, _no_fds, _build_set_status),
    Request.GET_STATUS: _Layout(_EMPTY, _no_fds, _empty(m.GetStatus)),
}

#: The request codes ``RequestDecoder`` turns into their own message types.
SUPPORTED_REQUESTS: frozenset[int] = frozenset(_LAYOUTS)


def _close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError as exc:  # already gone: nothing to leak
            if exc.errno != errno.EBADF:
                raise


def _check_header(request: int, flags: int, size: int) -> str | None:
    """What is wrong with a request header, or None."""
    if flags & VHOST_USER_VERSION_MASK != VHOST_USER_VERSION:
        return f"version {flags & VHOST_USER_VERSION_MASK}, expected {VHOST_USER_VERSION}"
    if flags & VHOST_USER_FLAG_REPLY:
        return "REPLY flag set on a request"
    if flags & ~VHOST_USER_FLAGS_KNOWN:
        return f"reserved flag bits set: {flags:#x}"
    if size > MAX_PAYLOAD_SIZE:
        return f"payload size {size} exceeds {MAX_PAYLOAD_SIZE}"
    layout = _LAYOUTS.get(request)
    if layout is not None and size not in layout.sizes:
        return f"payload size {size}, expected one of {sorted(layout.sizes)}"
    return None


class _State(enum.Enum):
    OPEN = "open"
    ERROR = "error"
    CLOSED = "closed"


class RequestDecoder:
    """Turns the front-end's byte stream and fds into ``messages`` objects.

    The decoder owns every fd fed to it until it hands them out inside a
    message (the receiver then owns them) or closes them (malformed message,
    ``close()``).
    """

    __slots__ = ("_buf", "_consumed", "_error", "_pending_fds", "_state")

    def __init__(self) -> None:
        self._buf = bytearray()
        #: Stream offset of ``_buf[0]``, which is always the start of a message.
        self._consumed = 0
        #: fds by the stream offset of the message they belong to.
        self._pending_fds: dict[int, list[int]] = {}
        self._state = _State.OPEN
        self._error: str | None = None

    # --- state ---------------------------------------------------------------

    def _check_open(self) -> None:
        if self._state is _State.ERROR:
            raise LocalProtocolError(f"RequestDecoder is in ERROR state after: {self._error}")
        if self._state is _State.CLOSED:
            raise LocalProtocolError("RequestDecoder is closed")

    @property
    def pending_bytes(self) -> int:
        """Bytes buffered that are not yet a whole message (0 at a message boundary)."""
        return len(self._buf)

    @property
    def held_fds(self) -> int:
        """How many fds the decoder holds for messages not yet returned."""
        return sum(len(fds) for fds in self._pending_fds.values())

    def close(self) -> None:
        """Close every fd still held and refuse further use. Idempotent."""
        if self._state is _State.OPEN:
            self._state = _State.CLOSED
        self._release_all()

    def _release_all(self) -> None:
        pending, self._pending_fds = self._pending_fds, {}
        self._buf.clear()
        _close_fds([fd for fds in pending.values() for fd in fds])

    def _fail(self, msg: str) -> RemoteProtocolError:
        self._state = _State.ERROR
        self._error = msg
        self._release_all()
        return RemoteProtocolError(msg)

    # --- input ---------------------------------------------------------------

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Add bytes and the fds that came with them (see the module doc for which
        message gets the fds). In ERROR or closed state the fds are closed and
        ``LocalProtocolError`` is raised."""
        if self._state is not _State.OPEN:
            _close_fds(fds)
            self._check_open()
        chunk_start = len(self._buf)
        self._buf += data
        if fds:
            owner = self._consumed + self._fd_owner(chunk_start)
            self._pending_fds.setdefault(owner, []).extend(fds)

    def _fd_owner(self, chunk_start: int) -> int:
        """Buffer offset of the message that the fds of the chunk at ``chunk_start`` go to."""
        end = len(self._buf)
        starts = []
        pos = 0
        while pos <= end:
            starts.append(pos)
            if pos + HEADER_SIZE > end:
                break
            (_request, _flags, size) = m.HEADER_STRUCT.unpack_from(self._buf, pos)
            if size > MAX_PAYLOAD_SIZE:
                break  # malformed: next_request will say so
            pos += HEADER_SIZE + size
        in_chunk = [s for s in starts if chunk_start <= s < end]
        if in_chunk:
            return in_chunk[-1]
        return max(s for s in starts if s <= chunk_start)

    # --- output --------------------------------------------------------------

    def next_request(self) -> m.RequestMessage | None:
        """The next whole request, or None until more bytes are fed."""
        self._check_open()
        if len(self._buf) < HEADER_SIZE:
            return None
        request, flags, size = m.HEADER_STRUCT.unpack_from(self._buf)
        problem = _check_header(request, flags, size)
        if problem is not None:
            raise self._fail(f"malformed {m.request_name(request)}: {problem}")
        end = HEADER_SIZE + size
        if len(self._buf) < end:
            return None
        payload = bytes(self._buf[HEADER_SIZE:end])
        del self._buf[:end]
        self._consumed += end
        fds: list[int] = []
        for offset in sorted(o for o in self._pending_fds if o < self._consumed):
            fds.extend(self._pending_fds.pop(offset))
        try:
            return self._build(request, flags, payload, fds)
        except (_Malformed, LocalProtocolError) as exc:
            _close_fds(fds)
            raise self._fail(f"malformed {m.request_name(request)}: {exc}") from None

    def _build(self, request: int, flags: int, payload: bytes, fds: list[int]) -> m.RequestMessage:
        need_reply = bool(flags & VHOST_USER_FLAG_NEED_REPLY)
        if len(fds) > MAX_FDS_PER_MESSAGE:
            raise _Malformed(f"{len(fds)} fds attached, at most {MAX_FDS_PER_MESSAGE} allowed")
        layout = _LAYOUTS.get(request)
        if layout is None:
            return m.Unsupported(request, payload, tuple(fds), need_reply)
        fewest, most = layout.fds(payload)
        if not fewest <= len(fds) <= most:
            wanted = str(fewest) if fewest == most else f"{fewest} to {most}"
            raise _Malformed(f"{len(fds)} fds attached, expected {wanted}")
        if layout.discard_fds:
            _close_fds(fds)
            fds.clear()
        return layout.build(payload, tuple(fds), need_reply)
