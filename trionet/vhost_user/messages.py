"""vhost-user messages as values, and their wire encodings.

One frozen, slotted dataclass per front-end request trionet understands; each
checks its fields when built and raises ``LocalProtocolError`` if they are
invalid (the back-end decoder in ``codec.py`` turns that into a
``RemoteProtocolError``). Every request ends with ``need_reply``: the header's
NEED_REPLY flag (REPLY_ACK).

Requests trionet does not implement, and unknown request codes, decode into
``Unsupported`` so the session can NACK them and close their fds.

This module also encodes requests (``encode_request``, for scripted
front-ends in tests and tools); the replies, both ways, are in ``replies.py``.
No I/O happens here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar, TypeAlias

from ..errors import LocalProtocolError
from .constants import (
    MAX_FDS_PER_MESSAGE,
    MAX_MEM_REGIONS_TABLE,
    MAX_PAYLOAD_SIZE,
    STRUCT_PREFIX,
    VHOST_USER_FLAG_NEED_REPLY,
    VHOST_USER_VERSION,
    VHOST_VRING_F_LOG,
    VIRTQUEUE_MAX_SIZE,
    VRING_NOFD_MASK,
    Request,
)

# --- wire layouts (see "Message Specification" in the spec) --------------------

#: request, flags, size.
HEADER_STRUCT = struct.Struct(STRUCT_PREFIX + "III")
#: A single 64-bit integer.
U64_STRUCT = struct.Struct(STRUCT_PREFIX + "Q")
#: Vring state: index, num.
VRING_STATE_STRUCT = struct.Struct(STRUCT_PREFIX + "II")
#: Vring address: index, flags, descriptor, used, available, log.
VRING_ADDR_STRUCT = struct.Struct(STRUCT_PREFIX + "IIQQQQ")
#: Memory table prefix: nregions, padding; ``nregions`` regions follow.
MEM_TABLE_HEADER_STRUCT = struct.Struct(STRUCT_PREFIX + "II")
#: One region: guest address, size, user address, mmap offset.
MEM_REGION_STRUCT = struct.Struct(STRUCT_PREFIX + "QQQQ")
#: ADD_MEM_REG / REM_MEM_REG: u64 padding, then one region.
SINGLE_MEM_REGION_STRUCT = struct.Struct(STRUCT_PREFIX + "QQQQQ")
#: SET_LOG_BASE with LOG_SHMFD: mmap_size (u64), mmap_offset (u64).
LOG_STRUCT = struct.Struct(STRUCT_PREFIX + "QQ")

_U8_BITS, _U16_BITS, _U32_BITS, _U64_BITS = 8, 16, 32, 64


def request_name(code: int) -> str:
    """``"SET_MEM_TABLE (5)"`` for a known code, ``"request 99"`` otherwise."""
    try:
        return f"{Request(code).name} ({code})"
    except ValueError:
        return f"request {code}"


def check_uint(owner: str, name: str, value: object, bits: int) -> None:
    """Raise ``LocalProtocolError`` unless ``value`` is an int that fits ``bits`` unsigned."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < (1 << bits):
        raise LocalProtocolError(f"{owner}.{name} must be a u{bits}, got {value!r}")


def _check_bool(owner: str, name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise LocalProtocolError(f"{owner}.{name} must be a bool, got {value!r}")


def _check_fd(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise LocalProtocolError(f"{owner}.{name} must be a file descriptor, got {value!r}")


# --- memory regions -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MemRegion:
    """One region of guest memory, as SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG send it.

    ``user_addr`` is the front-end's virtual address of the region, which vring
    addresses refer to; ``mmap_offset`` is where the region starts in its fd.
    """

    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int

    def __post_init__(self) -> None:
        for name in ("guest_addr", "size", "user_addr", "mmap_offset"):
            check_uint("MemRegion", name, getattr(self, name), _U64_BITS)
        if self.size == 0:
            raise LocalProtocolError("MemRegion.size must not be 0")
        for name in ("guest_addr", "user_addr", "mmap_offset"):
            if getattr(self, name) + self.size > 1 << _U64_BITS:
                raise LocalProtocolError(
                    f"MemRegion.{name} {getattr(self, name):#x} + size {self.size:#x} "
                    "overflows 64 bits"
                )

    def pack(self) -> bytes:
        return MEM_REGION_STRUCT.pack(self.guest_addr, self.size, self.user_addr, self.mmap_offset)


# --- requests --------------------------------------------------------------------


class _Request:
    """Behaviour shared by every request; the dataclasses below carry the fields."""

    __slots__ = ()
    REQUEST: ClassVar[Request]
    need_reply: bool

    @property
    def request_code(self) -> int:
        """The request code this message travels under."""
        return int(self.REQUEST)

    def payload(self) -> bytes:
        """The payload bytes, without the header."""
        return b""

    def attached_fds(self) -> tuple[int, ...]:
        """The fds that travel with this message (SCM_RIGHTS)."""
        return ()

    def _check_need_reply(self) -> None:
        _check_bool(type(self).__name__, "need_reply", self.need_reply)

    def _check_u(self, name: str, bits: int) -> None:
        check_uint(type(self).__name__, name, getattr(self, name), bits)


class _NoPayload(_Request):
    __slots__ = ()

    def __post_init__(self) -> None:
        self._check_need_reply()


class _U64Payload(_Request):
    """Requests whose payload is one u64 field named by ``_FIELD``."""

    __slots__ = ()
    _FIELD: ClassVar[str]
    _BITS: ClassVar[int] = _U64_BITS

    def __post_init__(self) -> None:
        self._check_u(self._FIELD, self._BITS)
        self._check_need_reply()

    def payload(self) -> bytes:
        return U64_STRUCT.pack(getattr(self, self._FIELD))


@dataclass(frozen=True, slots=True)
class GetFeatures(_NoPayload):
    REQUEST = Request.GET_FEATURES
    need_reply: bool = False


@dataclass(frozen=True, slots=True)
class SetFeatures(_U64Payload):
    REQUEST = Request.SET_FEATURES
    _FIELD = "features"
    features: int
    need_reply: bool = False


@dataclass(frozen=True, slots=True)
class SetOwner(_NoPayload):
    REQUEST = Request.SET_OWNER
    need_reply: bool = False


@dataclass(frozen=True, slots=True)
class ResetOwner(_NoPayload):
    REQUEST = Request.RESET_OWNER
    need_reply: bool = False


@dataclass(frozen=True, slots=True)
class SetMemTable(_Request):
    """The whole memory map: one fd per region, in the same order."""

    REQUEST = Request.SET_MEM_TABLE
    regions: tuple[MemRegion, ...]
    fds: tuple[int, ...]
    need_reply: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.regions, tuple) or not all(
            isinstance(r, MemRegion) for r in self.regions
        ):
            raise LocalProtocolError("SetMemTable.regions must be a tuple of MemRegion")
        if not isinstance(self.fds, tuple):
            raise LocalProtocolError("SetMemTable.fds must be a tuple")
        for fd in self.fds:
            _check_fd("SetMemTable", "fds[]", fd)
        if not 1 <= len(self.regions) <= MAX_MEM_REGIONS_TABLE:
            raise LocalProtocolError(
                f"SetMemTable needs 1 to {MAX_MEM_REGIONS_TABLE} regions, got {len(self.regions)}"
            )
        if len(self.fds) != len(self.regions):
            raise LocalProtocolError(
                f"SetMemTable needs one fd per region: {len(self.regions)} regions, "
                f"{len(self.fds)} fds"
            )
        self._check_need_reply()

    def payload(self) -> bytes:
        head = MEM_TABLE_HEADER_STRUCT.pack(len(self.regions), 0)
        return head + b"".join(r.pack() for r in self.regions)

    def attached_fds(self) -> tuple[int, ...]:
        return self.fds


@dataclass(frozen=True, slots=True)
class GetMaxMemSlots(_NoPayload):
    REQUEST = Request.GET_MAX_MEM_SLOTS
    need_reply: bool = False


class _SingleRegion(_Request):
    __slots__ = ()
    region: MemRegion

    def _check_region(self) -> None:
        if not isinstance(self.region, MemRegion):
            raise LocalProtocolError(f"{type(self).__name__}.region must be a MemRegion")

    def payload(self) -> bytes:
        return U64_STRUCT.pack(0) + self.region.pack()


@dataclass(frozen=True, slots=True)
class AddMemReg(_SingleRegion):
    """Map one more region (CONFIGURE_MEM_SLOTS); exactly one fd."""

    REQUEST = Request.ADD_MEM_REG
    region: MemRegion
    fd: int
    need_reply: bool = False

    def __post_init__(self) -> None:
        self._check_region()
        _check_fd("AddMemReg", "fd", self.fd)
        self._check_need_reply()

    def attached_fds(self) -> tuple[int, ...]:
        return (self.fd,)


@dataclass(frozen=True, slots=True)
class RemMemReg(_SingleRegion):
    """Unmap the region with this guest address, user address and size.

    The spec lets a front-end attach an fd anyway (QEMU does); the decoder
    closes it, so the message never carries one.
    """

    REQUEST = Request.REM_MEM_REG
    region: MemRegion
    need_reply: bool = False

    def __post_init__(self) -> None:
        self._check_region()
        self._check_need_reply()


class _VringState(_Request):
    """Requests whose payload is a vring state (u32 index, u32 num)."""

    __slots__ = ()
    index: int

    def _num(self) -> int:
        return 0

    def __post_init__(self) -> None:
        self._check_u("index", _U32_BITS)
        self._check_need_reply()
        self._check_num()

    def _check_num(self) -> None:
        pass

    def payload(self) -> bytes:
        return VRING_STATE_STRUCT.pack(self.index, self._num())


@dataclass(frozen=True, slots=True)
class SetVringNum(_VringState):
    """Queue size; 1 to VIRTQUEUE_MAX_SIZE (power-of-two rules are the ring's business)."""

    REQUEST = Request.SET_VRING_NUM
    index: int
    num: int
    need_reply: bool = False

    def _num(self) -> int:
        return self.num

    def _check_num(self) -> None:
        self._check_u("num", _U32_BITS)
        if not 1 <= self.num <= VIRTQUEUE_MAX_SIZE:
            raise LocalProtocolError(
                f"SetVringNum.num must be 1..{VIRTQUEUE_MAX_SIZE}, got {self.num}"
            )


@dataclass(frozen=True, slots=True)
class SetVringAddr(_Request):
    """Ring addresses, in the front-end's address space (user addresses).

    Alignment is checked against the weakest rule both ring layouts share:
    descriptor table 16, driver area (avail) 2, device area (used) 4.
    """

    REQUEST = Request.SET_VRING_ADDR
    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int
    need_reply: bool = False

    _ALIGN: ClassVar[tuple[tuple[str, int], ...]] = (
        ("desc_user_addr", 16),
        ("used_user_addr", 4),
        ("avail_user_addr", 2),
    )

    def __post_init__(self) -> None:
        self._check_u("index", _U32_BITS)
        self._check_u("flags", _U32_BITS)
        for name in ("desc_user_addr", "used_user_addr", "avail_user_addr", "log_guest_addr"):
            self._check_u(name, _U64_BITS)
        if self.flags & ~VHOST_VRING_F_LOG:
            raise LocalProtocolError(f"SetVringAddr.flags has unknown bits: {self.flags:#x}")
        for name, align in self._ALIGN:
            value = getattr(self, name)
            if value % align:
                raise LocalProtocolError(
                    f"SetVringAddr.{name} {value:#x} is not {align}-byte aligned"
                )
        self._check_need_reply()

    def payload(self) -> bytes:
        return VRING_ADDR_STRUCT.pack(
            self.index,
            self.flags,
            self.desc_user_addr,
            self.used_user_addr,
            self.avail_user_addr,
            self.log_guest_addr,
        )


@dataclass(frozen=True, slots=True)
class SetVringBase(_VringState):
    """Where the back-end resumes; packed rings pack wrap counters into ``num``."""

    REQUEST = Request.SET_VRING_BASE
    index: int
    num: int
    need_reply: bool = False

    def _num(self) -> int:
        return self.num

    def _check_num(self) -> None:
        self._check_u("num", _U32_BITS)


@dataclass(frozen=True, slots=True)
class GetVringBase(_VringState):
    """Stop the ring and report its base; the request's ``num`` is ignored."""

    REQUEST = Request.GET_VRING_BASE
    index: int
    need_reply: bool = False


class _VringFd(_Request):
    """SET_VRING_KICK/CALL/ERR: u64 with the index in bits 0-7 and NOFD in bit 8."""

    __slots__ = ()
    index: int
    fd: int | None

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_uint(name, "index", self.index, _U8_BITS)
        if self.fd is not None:
            _check_fd(name, "fd", self.fd)
        self._check_need_reply()

    def payload(self) -> bytes:
        return U64_STRUCT.pack(self.index | (VRING_NOFD_MASK if self.fd is None else 0))

    def attached_fds(self) -> tuple[int, ...]:
        return () if self.fd is None else (self.fd,)


@dataclass(frozen=True, slots=True)
class SetVringKick(_VringFd):
    """Kick eventfd for a ring; ``fd`` None means "poll"."""

    REQUEST = Request.SET_VRING_KICK
    index: int
    fd: int | None
    need_reply: bool = False


@dataclass(frozen=True, slots=True)
class SetVringCall(_VringFd):
    """Call (interrupt) eventfd for a ring; ``fd`` None means "don't signal"."""

    REQUEST = Request.SET_VRING_CALL
    index: int
    fd: int | None
    need_reply: bool = False


@dataclass(frozen=True, slots=True)
class SetVringErr(_VringFd):
    """Error eventfd for a ring; ``fd`` None removes it."""

    REQUEST = Request.SET_VRING_ERR
    index: int
    fd: int | None
    need_reply: bool = False


@dataclass(frozen=True, slots=True)
class GetProtocolFeatures(_NoPayload):
    REQUEST = Request.GET_PROTOCOL_FEATURES
    need_reply: bool = False


@dataclass(frozen=True, slots=True)
class SetProtocolFeatures(_U64Payload):
    REQUEST = Request.SET_PROTOCOL_FEATURES
    _FIELD = "features"
    features: int
    need_reply: bool = False


@dataclass(frozen=True, slots=True)
class GetQueueNum(_NoPayload):
    REQUEST = Request.GET_QUEUE_NUM
    need_reply: bool = False


@dataclass(frozen=True, slots=True)
class SetVringEnable(_VringState):
    """Enable or disable a ring; on the wire ``num`` is 1 or 0, nothing else."""

    REQUEST = Request.SET_VRING_ENABLE
    index: int
    enable: bool
    need_reply: bool = False

    def _num(self) -> int:
        return int(self.enable)

    def _check_num(self) -> None:
        _check_bool("SetVringEnable", "enable", self.enable)


@dataclass(frozen=True, slots=True)
class SendRarp(_Request):
    """Announce the guest's MAC after migration; the MAC is the u64's first 6 bytes."""

    REQUEST = Request.SEND_RARP
    mac: bytes
    need_reply: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.mac, bytes) or len(self.mac) != 6:
            raise LocalProtocolError(f"SendRarp.mac must be 6 bytes, got {self.mac!r}")
        self._check_need_reply()

    def payload(self) -> bytes:
        return self.mac + b"\0\0"


@dataclass(frozen=True, slots=True)
class SetLogBase(_Request):
    """The dirty-page bitmap of a migration (LOG_SHMFD): ``size`` bytes of
    ``fd`` from ``offset``.  Answered with an empty reply once mapped."""

    REQUEST = Request.SET_LOG_BASE
    size: int
    offset: int
    fd: int
    need_reply: bool = False

    def __post_init__(self) -> None:
        self._check_u("size", _U64_BITS)
        self._check_u("offset", _U64_BITS)
        _check_fd("SetLogBase", "fd", self.fd)
        self._check_need_reply()

    def payload(self) -> bytes:
        return LOG_STRUCT.pack(self.size, self.offset)

    def attached_fds(self) -> tuple[int, ...]:
        return (self.fd,)


@dataclass(frozen=True, slots=True)
class SetLogFd(_Request):
    """An eventfd to signal log syncs on (QEMU sends none; trionet needs none)."""

    REQUEST = Request.SET_LOG_FD
    fd: int
    need_reply: bool = False

    def __post_init__(self) -> None:
        _check_fd("SetLogFd", "fd", self.fd)
        self._check_need_reply()

    def attached_fds(self) -> tuple[int, ...]:
        return (self.fd,)


@dataclass(frozen=True, slots=True)
class NetSetMtu(_U64Payload):
    """The MTU to expose; whether it is acceptable is the session's call (it NACKs)."""

    REQUEST = Request.NET_SET_MTU
    _FIELD = "mtu"
    mtu: int
    need_reply: bool = False


@dataclass(frozen=True, slots=True)
class SetStatus(_U64Payload):
    """Virtio device status byte, sent as a u64."""

    REQUEST = Request.SET_STATUS
    _FIELD = "status"
    _BITS = _U8_BITS
    status: int
    need_reply: bool = False


@dataclass(frozen=True, slots=True)
class GetStatus(_NoPayload):
    REQUEST = Request.GET_STATUS
    need_reply: bool = False


@dataclass(frozen=True, slots=True)
class ResetDevice(_NoPayload):
    REQUEST = Request.RESET_DEVICE
    need_reply: bool = False


@dataclass(frozen=True, slots=True)
class Unsupported:
    """A request trionet does not implement, or an unknown code, kept raw.

    The receiver owns ``fds`` and must close them.
    """

    request: int
    payload: bytes
    fds: tuple[int, ...]
    need_reply: bool = False

    def __post_init__(self) -> None:
        check_uint("Unsupported", "request", self.request, _U32_BITS)
        if not isinstance(self.payload, bytes) or len(self.payload) > MAX_PAYLOAD_SIZE:
            raise LocalProtocolError(
                f"Unsupported.payload must be bytes of at most {MAX_PAYLOAD_SIZE}"
            )
        if not isinstance(self.fds, tuple) or len(self.fds) > MAX_FDS_PER_MESSAGE:
            raise LocalProtocolError(
                f"Unsupported.fds must be a tuple of at most {MAX_FDS_PER_MESSAGE} fds"
            )
        for fd in self.fds:
            _check_fd("Unsupported", "fds[]", fd)
        _check_bool("Unsupported", "need_reply", self.need_reply)

    @property
    def request_code(self) -> int:
        return self.request

    def attached_fds(self) -> tuple[int, ...]:
        return self.fds


RequestMessage: TypeAlias = (
    GetFeatures
    | SetFeatures
    | SetOwner
    | ResetOwner
    | SetMemTable
    | GetMaxMemSlots
    | AddMemReg
    | RemMemReg
    | SetVringNum
    | SetVringAddr
    | SetVringBase
    | GetVringBase
    | SetVringKick
    | SetVringCall
    | SetVringErr
    | GetProtocolFeatures
    | SetProtocolFeatures
    | GetQueueNum
    | SetVringEnable
    | SendRarp
    | SetLogBase
    | SetLogFd
    | NetSetMtu
    | SetStatus
    | GetStatus
    | ResetDevice
    | Unsupported
)

# --- encoding ----------------------------------------------------------------------


def encode_header(request: int, flags: int, size: int) -> bytes:
    """The 12-byte header, as is; no checks (tests use it to build bad messages)."""
    return HEADER_STRUCT.pack(request, flags, size)


def encode_request(req: RequestMessage) -> tuple[bytes, list[int]]:
    """Front-end side: the bytes to send and the fds to attach to their first byte."""
    payload = req.payload if isinstance(req, Unsupported) else req.payload()
    flags = VHOST_USER_VERSION | (VHOST_USER_FLAG_NEED_REPLY if req.need_reply else 0)
    return encode_header(req.request_code, flags, len(payload)) + payload, list(req.attached_fds())
