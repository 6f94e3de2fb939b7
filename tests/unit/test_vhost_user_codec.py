"""The vhost-user codec: constants, message values, RequestDecoder, replies."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from trionet.errors import LocalProtocolError, RemoteProtocolError
from trionet.vhost_user import messages as m
from trionet.vhost_user.codec import SUPPORTED_REQUESTS, RequestDecoder
from trionet.vhost_user.constants import (
    HEADER_SIZE,
    MAX_FDS_PER_MESSAGE,
    MAX_PAYLOAD_SIZE,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_FLAG_NEED_REPLY,
    VHOST_USER_FLAG_REPLY,
    VHOST_USER_VERSION,
    VRING_NOFD_MASK,
    ProtocolFeature,
    Request,
)
from trionet.vhost_user.replies import (
    ReplyDecoder,
    encode_reply_ack,
    encode_reply_u64,
    encode_reply_vring_state,
)

V = VHOST_USER_VERSION
U64_MAX = (1 << 64) - 1

# --- helpers -------------------------------------------------------------------------


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        assert exc.errno == errno.EBADF
        return False
    return True


def close_quietly(fds: list[int] | tuple[int, ...]) -> None:
    for fd in fds:
        with suppress(OSError):
            os.close(fd)


@contextmanager
def no_fd_leak() -> Iterator[None]:
    before = open_fd_count()
    yield
    assert open_fd_count() == before


class Fds:
    """Hands out real fds (eventfds and pipe ends) and closes what is left."""

    def __init__(self) -> None:
        self.made: list[int] = []

    def __call__(self) -> int:
        if len(self.made) % 2:
            r, w = os.pipe()
            os.close(w)
            fd = r
        else:
            fd = os.eventfd(0)
        self.made.append(fd)
        return fd

    def close_all(self) -> None:
        close_quietly(self.made)
        self.made.clear()


@pytest.fixture
def make_fd() -> Iterator[Fds]:
    fds = Fds()
    yield fds
    fds.close_all()


def raw(request: int, payload: bytes = b"", flags: int = V, size: int | None = None) -> bytes:
    return m.encode_header(request, flags, len(payload) if size is None else size) + payload


def u64(value: int) -> bytes:
    return m.U64_STRUCT.pack(value)


def region_bytes(guest: int, size: int, user: int, off: int) -> bytes:
    return m.MEM_REGION_STRUCT.pack(guest, size, user, off)


def mem_table(regions: list[bytes], nregions: int | None = None, padding: int = 0) -> bytes:
    n = len(regions) if nregions is None else nregions
    return m.MEM_TABLE_HEADER_STRUCT.pack(n, padding) + b"".join(regions)


def decode_all(dec: RequestDecoder) -> list[m.RequestMessage]:
    out = []
    while (req := dec.next_request()) is not None:
        out.append(req)
    return out


REGION = m.MemRegion(0x0, 0x4000_0000, 0x7F00_0000_0000, 0)
REGION2 = m.MemRegion(0x1_0000_0000, 0x1000_0000, 0x7F80_0000_0000, 0x4000_0000)


def every_request(make_fd: Callable[[], int]) -> list[m.RequestMessage]:
    """One of each supported request (some twice), plus Unsupported ones."""
    return [
        m.GetFeatures(),
        m.SetFeatures(1 << VHOST_USER_F_PROTOCOL_FEATURES | 1 << 32 | 0x20, need_reply=True),
        m.SetOwner(),
        m.ResetOwner(),
        m.SetMemTable((REGION,), (make_fd(),)),
        m.SetMemTable((REGION, REGION2) * 4, tuple(make_fd() for _ in range(8)), True),
        m.GetMaxMemSlots(),
        m.AddMemReg(REGION2, make_fd(), need_reply=True),
        m.RemMemReg(REGION2),
        m.SetVringNum(1, 256),
        m.SetVringAddr(1, 1, 0x7F00_0000_1000, 0x7F00_0000_3000, 0x7F00_0000_2000, 0x4000),
        m.SetVringBase(0, 0x8001_8001),
        m.GetVringBase(2),
        m.SetVringKick(0, make_fd()),
        m.SetVringKick(255, None),
        m.SetVringCall(1, make_fd(), need_reply=True),
        m.SetVringCall(1, None),
        m.SetVringErr(2, make_fd()),
        m.SetVringErr(2, None),
        m.GetProtocolFeatures(),
        m.SetProtocolFeatures(int(ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK)),
        m.GetQueueNum(),
        m.SetVringEnable(3, True),
        m.SetVringEnable(0, False, need_reply=True),
        m.SendRarp(b"\x52\x54\x00\x12\x34\x56"),
        m.NetSetMtu(9000),
        m.SetStatus(0xF),
        m.GetStatus(),
        m.ResetDevice(need_reply=True),
        m.SetLogBase(4096, 0, make_fd(), need_reply=True),
        m.SetLogFd(make_fd()),
        m.Unsupported(Request.POSTCOPY_ADVISE, u64(0), (make_fd(),), True),
        m.Unsupported(Request.GET_CONFIG, b"\0" * (12 + 256), ()),
        m.Unsupported(99, b"", ()),
    ]


def release(req: m.RequestMessage) -> None:
    close_quietly(req.attached_fds())


# --- constants -----------------------------------------------------------------------


def test_protocol_feature_bits_match_spec_numbering() -> None:
    spec = {
        "MQ": 0,
        "LOG_SHMFD": 1,
        "RARP": 2,
        "REPLY_ACK": 3,
        "MTU": 4,
        "BACKEND_REQ": 5,
        "CROSS_ENDIAN": 6,
        "CRYPTO_SESSION": 7,
        "PAGEFAULT": 8,
        "CONFIG": 9,
        "BACKEND_SEND_FD": 10,
        "HOST_NOTIFIER": 11,
        "INFLIGHT_SHMFD": 12,
        "RESET_DEVICE": 13,
        "INBAND_NOTIFICATIONS": 14,
        "CONFIGURE_MEM_SLOTS": 15,
        "STATUS": 16,
    }
    for name, bit in spec.items():
        assert ProtocolFeature[name] == 1 << bit


def test_request_codes_are_contiguous_from_1() -> None:
    assert [r.value for r in Request] == list(range(1, len(Request) + 1))
    assert Request.SET_STATUS.value == 39 and Request.GET_STATUS.value == 40
    assert Request.ADD_MEM_REG.value == 37 and Request.REM_MEM_REG.value == 38
    assert VHOST_USER_F_PROTOCOL_FEATURES == 30
    assert HEADER_SIZE == 12


# --- round trips -----------------------------------------------------------------------


def test_every_request_round_trips(make_fd: Fds) -> None:
    for req in every_request(make_fd):
        data, fds = m.encode_request(req)
        dec = RequestDecoder()
        dec.feed(data, fds)
        got = dec.next_request()
        if isinstance(req, m.RemMemReg):
            assert got == req
        else:
            assert got == req, req
            assert list(got.attached_fds()) == fds  # the very same fds, now ours
        assert dec.next_request() is None
        assert dec.pending_bytes == 0 and dec.held_fds == 0
        dec.close()
        assert all(is_open(fd) for fd in fds)  # close() does not touch handed-out fds


def test_supported_set_is_what_the_brief_lists() -> None:
    assert {Request(c).name for c in SUPPORTED_REQUESTS} == {
        "GET_FEATURES", "SET_FEATURES", "SET_OWNER", "RESET_OWNER", "SET_MEM_TABLE",
        "GET_MAX_MEM_SLOTS", "ADD_MEM_REG", "REM_MEM_REG", "SET_VRING_NUM", "SET_VRING_ADDR",
        "SET_VRING_BASE", "GET_VRING_BASE", "SET_VRING_KICK", "SET_VRING_CALL", "SET_VRING_ERR",
        "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "GET_QUEUE_NUM", "SET_VRING_ENABLE",
        "SEND_RARP", "NET_SET_MTU", "SET_STATUS", "GET_STATUS", "RESET_DEVICE",
        "SET_LOG_BASE", "SET_LOG_FD",
    }  # fmt: skip


@pytest.mark.parametrize(
    "code",
    [c for c in Request if c not in SUPPORTED_REQUESTS] + [0, 44, 1000, 0xFFFF_FFFF],
)
def test_unsupported_and_unknown_codes_decode_raw(code: int, make_fd: Fds) -> None:
    fd = make_fd()
    dec = RequestDecoder()
    dec.feed(raw(code, b"abcdefgh", flags=V | VHOST_USER_FLAG_NEED_REPLY), [fd])
    assert dec.next_request() == m.Unsupported(code, b"abcdefgh", (fd,), need_reply=True)
    assert is_open(fd)


def make_split_cases(make_fd: Fds) -> list[m.RequestMessage]:
    return [
        m.SetMemTable((REGION, REGION2, REGION), (make_fd(), make_fd(), make_fd())),
        m.SetVringAddr(7, 0, 0x1000, 0x3000, 0x2000, 0),
        m.SetVringKick(4, make_fd(), need_reply=True),
        m.GetFeatures(),
    ]


def test_split_at_every_byte_boundary(make_fd: Fds) -> None:
    for req in make_split_cases(make_fd):
        data, fds = m.encode_request(req)
        for cut in range(len(data) + 1):
            dec = RequestDecoder()
            dec.feed(data[:cut], fds)  # fds come with the first byte of the send
            if cut < len(data):
                assert dec.next_request() is None
                assert dec.next_request() is None  # nothing consumed by trying
                dec.feed(data[cut:])
            assert dec.next_request() == req
            assert dec.next_request() is None


def test_split_with_fds_on_a_later_piece(make_fd: Fds) -> None:
    """A sender that attaches the fds to a later part of its message."""
    for req in make_split_cases(make_fd):
        data, fds = m.encode_request(req)
        for cut in range(1, len(data)):
            dec = RequestDecoder()
            dec.feed(data[:cut])
            assert dec.next_request() is None
            dec.feed(data[cut:], fds)
            assert dec.next_request() == req


def test_byte_at_a_time_stream(make_fd: Fds) -> None:
    reqs = every_request(make_fd)
    dec = RequestDecoder()
    got: list[m.RequestMessage] = []
    for req in reqs:
        data, fds = m.encode_request(req)
        for i in range(len(data)):
            dec.feed(data[i : i + 1], fds if i == 0 else ())
            got.extend(decode_all(dec))
    assert got == [r for r in reqs]


def test_several_messages_in_one_feed(make_fd: Fds) -> None:
    kick = make_fd()
    reqs: list[m.RequestMessage] = [
        m.SetVringNum(0, 256),
        m.SetVringBase(0, 0),
        m.SetVringAddr(0, 0, 0x1000, 0x3000, 0x2000, 0),
        m.SetVringKick(0, kick),
    ]
    blob = b"".join(m.encode_request(r)[0] for r in reqs)
    dec = RequestDecoder()
    # Like the kernel: a read may glue fd-less sends to the one carrying the fds.
    dec.feed(blob, [kick])
    assert decode_all(dec) == reqs


def test_fds_go_to_the_message_starting_in_the_read(make_fd: Fds) -> None:
    """A read that starts with the tail of message A and then carries B and its fd."""
    call = make_fd()
    a = m.encode_request(m.SetVringAddr(0, 0, 0x1000, 0x3000, 0x2000, 0))[0]
    b = m.encode_request(m.SetVringCall(0, call))[0]
    c = m.encode_request(m.GetFeatures())[0]
    for cut in range(1, len(a)):
        dec = RequestDecoder()
        dec.feed(a[:cut])
        dec.feed(a[cut:] + b[:5], [call])
        assert dec.next_request() == m.SetVringAddr(0, 0, 0x1000, 0x3000, 0x2000, 0)
        assert dec.next_request() is None
        dec.feed(b[5:] + c)
        assert decode_all(dec) == [m.SetVringCall(0, call), m.GetFeatures()]


def test_fds_fed_alone_at_a_boundary_go_to_the_next_message(make_fd: Fds) -> None:
    fd = make_fd()
    dec = RequestDecoder()
    dec.feed(m.encode_request(m.GetFeatures())[0])
    dec.feed(b"", [fd])
    assert dec.next_request() == m.GetFeatures()
    dec.feed(m.encode_request(m.SetVringErr(1, fd))[0])
    assert dec.next_request() == m.SetVringErr(1, fd)


# --- tolerance -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    [
        Request.GET_FEATURES,
        Request.SET_OWNER,
        Request.RESET_OWNER,
        Request.GET_PROTOCOL_FEATURES,
        Request.GET_QUEUE_NUM,
        Request.GET_MAX_MEM_SLOTS,
        Request.GET_STATUS,
        Request.RESET_DEVICE,
    ],
)
def test_no_payload_requests_accept_a_u64(code: int) -> None:
    dec = RequestDecoder()
    dec.feed(raw(code, u64(12345)) + raw(code))
    first, second = decode_all(dec)
    assert first == second and first.request_code == code


def test_tolerated_oddities(make_fd: Fds) -> None:
    fd = make_fd()
    dec = RequestDecoder()
    dec.feed(raw(Request.SET_VRING_KICK, u64(0xFFFF_0000_0000_FE00 | 5)), [fd])  # high bits
    dec.feed(raw(Request.SEND_RARP, b"\x02\0\0\0\0\x01\xff\xff"))  # junk after the MAC
    dec.feed(raw(Request.GET_VRING_BASE, m.VRING_STATE_STRUCT.pack(3, 77)))  # num ignored
    fd2 = make_fd()
    dec.feed(raw(Request.SET_MEM_TABLE, mem_table([REGION.pack()], padding=7)), [fd2])
    assert decode_all(dec) == [
        m.SetVringKick(5, fd),
        m.SendRarp(b"\x02\0\0\0\0\x01"),
        m.GetVringBase(3),
        m.SetMemTable((REGION,), (fd2,)),
    ]


def test_rem_mem_reg_fd_is_closed(make_fd: Fds) -> None:
    fd = make_fd()
    dec = RequestDecoder()
    dec.feed(m.encode_request(m.RemMemReg(REGION))[0], [fd])
    assert dec.next_request() == m.RemMemReg(REGION)
    assert not is_open(fd)


# --- malformed input -----------------------------------------------------------------

SET_FEATURES = Request.SET_FEATURES
KICK = Request.SET_VRING_KICK
NOFD = VRING_NOFD_MASK
GOOD_ADDR = m.VRING_ADDR_STRUCT.pack(0, 0, 0x1000, 0x3000, 0x2000, 0)
SINGLE = u64(0) + REGION.pack()

# (id, bytes, number of fds to attach, text expected in the error)
MALFORMED: list[tuple[str, bytes, int, str]] = [
    ("short-u64", raw(SET_FEATURES, b"\0" * 4), 0, "SET_FEATURES"),
    ("long-u64", raw(SET_FEATURES, b"\0" * 16), 0, "payload size 16"),
    ("get-features-16", raw(Request.GET_FEATURES, b"\0" * 16), 0, "GET_FEATURES"),
    ("short-addr", raw(Request.SET_VRING_ADDR, GOOD_ADDR[:-8]), 0, "SET_VRING_ADDR"),
    ("short-state", raw(Request.SET_VRING_NUM, b"\0" * 4), 0, "SET_VRING_NUM"),
    ("empty-rem", raw(Request.REM_MEM_REG), 0, "REM_MEM_REG"),
    ("kick-missing-fd", raw(KICK, u64(1)), 0, "0 fds attached, expected 1"),
    ("call-missing-fd", raw(Request.SET_VRING_CALL, u64(0)), 0, "SET_VRING_CALL"),
    ("kick-nofd-with-fd", raw(KICK, u64(1 | NOFD)), 1, "1 fds attached, expected 0"),
    ("err-two-fds", raw(Request.SET_VRING_ERR, u64(1)), 2, "SET_VRING_ERR"),
    ("extra-fd", raw(SET_FEATURES, u64(1)), 1, "SET_FEATURES"),
    ("get-features-fd", raw(Request.GET_FEATURES), 1, "GET_FEATURES"),
    ("add-mem-no-fd", raw(Request.ADD_MEM_REG, SINGLE), 0, "ADD_MEM_REG"),
    ("add-mem-two-fds", raw(Request.ADD_MEM_REG, SINGLE), 2, "ADD_MEM_REG"),
    ("rem-mem-two-fds", raw(Request.REM_MEM_REG, SINGLE), 2, "REM_MEM_REG"),
    ("table-missing-fd", raw(5, mem_table([REGION.pack(), REGION2.pack()])), 1, "expected 2"),
    ("table-extra-fd", raw(5, mem_table([REGION.pack()])), 2, "SET_MEM_TABLE"),
    ("table-empty", raw(5, mem_table([])), 0, "payload size 8"),
    ("table-9-regions", raw(5, mem_table([REGION.pack()] * 9)), 8, "payload size 296"),
    ("table-count-lies", raw(5, mem_table([REGION.pack()] * 2, nregions=3)), 2, "nregions is 3"),
    ("table-count-huge", raw(5, mem_table([REGION.pack()], nregions=1 << 31)), 1, "nregions"),
    ("region-size-0", raw(5, mem_table([region_bytes(0, 0, 0, 0)])), 1, "size must not be 0"),
    ("region-guest-wraps", raw(5, mem_table([region_bytes(U64_MAX, 2, 0, 0)])), 1, "overflow"),
    ("region-user-wraps", raw(5, mem_table([region_bytes(0, 2, U64_MAX, 0)])), 1, "user_addr"),
    ("add-region-wraps", raw(37, u64(0) + region_bytes(0, 1 << 63, 3 << 62, 0)), 1, "overflow"),
    ("version-0", raw(Request.GET_FEATURES, flags=0), 0, "version 0"),
    ("version-2", raw(Request.GET_FEATURES, flags=2), 0, "version 2"),
    ("version-3", raw(KICK, u64(1), flags=3), 1, "SET_VRING_KICK"),
    ("reply-flag", raw(Request.GET_FEATURES, flags=V | VHOST_USER_FLAG_REPLY), 0, "REPLY"),
    ("reserved-flag", raw(Request.GET_FEATURES, flags=V | 0x10), 0, "reserved"),
    ("oversized", raw(99, size=MAX_PAYLOAD_SIZE + 1), 0, "exceeds"),
    ("oversized-huge", raw(SET_FEATURES, size=0xFFFF_FFFF), 1, "exceeds"),
    ("enable-2", raw(18, m.VRING_STATE_STRUCT.pack(0, 2)), 0, "num must be 0 or 1, got 2"),
    ("status-256", raw(Request.SET_STATUS, u64(0x100)), 0, "SET_STATUS"),
    ("vring-num-0", raw(Request.SET_VRING_NUM, m.VRING_STATE_STRUCT.pack(0, 0)), 0, "num"),
    ("vring-num-big", raw(8, m.VRING_STATE_STRUCT.pack(0, 32769)), 0, "SET_VRING_NUM"),
    ("addr-flags", raw(9, m.VRING_ADDR_STRUCT.pack(0, 2, 0x1000, 0x3000, 0x2000, 0)), 0, "flags"),
    ("addr-desc-align", raw(9, m.VRING_ADDR_STRUCT.pack(0, 0, 0x1008, 0, 0, 0)), 0, "aligned"),
    ("addr-used-align", raw(9, m.VRING_ADDR_STRUCT.pack(0, 0, 0, 2, 0, 0)), 0, "aligned"),
    ("addr-avail-align", raw(9, m.VRING_ADDR_STRUCT.pack(0, 0, 0, 0, 1, 0)), 0, "aligned"),
    ("unsupported-9-fds", raw(Request.SET_VRING_ENDIAN), 9, "at most 8"),
]


@pytest.mark.parametrize(
    ("data", "nfds", "text"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_malformed_is_refused_and_fds_closed(
    data: bytes, nfds: int, text: str, make_fd: Fds
) -> None:
    with no_fd_leak():
        fds = [make_fd() for _ in range(nfds)]
        later = make_fd()  # an fd for a later message, held when the error hits
        dec = RequestDecoder()
        dec.feed(data, fds)
        dec.feed(m.encode_request(m.SetVringCall(0, later))[0], [later])
        with pytest.raises(RemoteProtocolError) as info:
            dec.next_request()
        assert text in str(info.value)
        assert info.value.fatal
        assert not any(is_open(fd) for fd in [*fds, later])
        with pytest.raises(LocalProtocolError):
            dec.next_request()
        extra = make_fd()
        with pytest.raises(LocalProtocolError):
            dec.feed(b"more", [extra])
        assert not is_open(extra)  # the decoder took ownership, then closed it
        make_fd.made.clear()  # every one of them is closed already


def test_oversized_is_refused_from_the_header_alone() -> None:
    dec = RequestDecoder()
    dec.feed(m.encode_header(Request.SET_CONFIG, V, MAX_PAYLOAD_SIZE + 1))
    with pytest.raises(RemoteProtocolError, match="SET_CONFIG"):
        dec.next_request()


def test_wrong_size_is_refused_before_the_payload_arrives() -> None:
    dec = RequestDecoder()
    dec.feed(m.encode_header(Request.SET_VRING_NUM, V, 4000))
    with pytest.raises(RemoteProtocolError, match="SET_VRING_NUM"):
        dec.next_request()


def test_largest_unsupported_payload_is_accepted() -> None:
    dec = RequestDecoder()
    dec.feed(raw(Request.SET_CONFIG, b"\xaa" * MAX_PAYLOAD_SIZE))
    req = dec.next_request()
    assert isinstance(req, m.Unsupported) and len(req.payload) == MAX_PAYLOAD_SIZE


def test_close_releases_held_fds(make_fd: Fds) -> None:
    with no_fd_leak():
        fds = [make_fd(), make_fd()]
        make_fd.made.clear()
        dec = RequestDecoder()
        data, _ = m.encode_request(m.SetMemTable((REGION, REGION2), tuple(fds)))
        dec.feed(data[:20], fds)
        assert dec.next_request() is None
        assert dec.held_fds == 2 and dec.pending_bytes == 20
        dec.close()
        dec.close()
        assert not any(is_open(fd) for fd in fds)
        with pytest.raises(LocalProtocolError):
            dec.next_request()


# --- message constructors ------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: m.MemRegion(0, 0, 0, 0),
        lambda: m.MemRegion(2, U64_MAX, 0, 0),
        lambda: m.MemRegion(0, 16, 0, U64_MAX),
        lambda: m.MemRegion(-1, 16, 0, 0),
        lambda: m.SetFeatures(1 << 64),
        lambda: m.SetFeatures(True),
        lambda: m.SetMemTable((), ()),
        lambda: m.SetMemTable((REGION,), ()),
        lambda: m.SetMemTable((REGION,) * 9, tuple(range(9))),
        lambda: m.SetMemTable([REGION], (3,)),  # type: ignore[arg-type]
        lambda: m.AddMemReg(REGION, -1),
        lambda: m.SetVringKick(256, None),
        lambda: m.SetVringCall(0, -5),
        lambda: m.SetVringEnable(0, 1),  # type: ignore[arg-type]
        lambda: m.SetVringNum(0, 0),
        lambda: m.SetVringBase(1 << 32, 0),
        lambda: m.SendRarp(b"\0" * 5),
        lambda: m.SetStatus(256),
        lambda: m.GetFeatures(need_reply=1),  # type: ignore[arg-type]
        lambda: m.Unsupported(1, b"\0" * (MAX_PAYLOAD_SIZE + 1), ()),
        lambda: m.Unsupported(1, b"", tuple(range(MAX_FDS_PER_MESSAGE + 1))),
    ],
)
def test_constructors_validate(build: Callable[[], object]) -> None:
    with pytest.raises(LocalProtocolError):
        build()


def test_messages_are_frozen() -> None:
    req = m.SetVringNum(0, 256)
    with pytest.raises(AttributeError):
        req.num = 512  # type: ignore[misc]
    kick: object = m.SetVringKick(0, 5)
    assert kick != m.SetVringCall(0, 5)


# --- replies (back-end -> front-end) ---------------------------------------------------


def test_reply_encoders() -> None:
    flags = V | VHOST_USER_FLAG_REPLY
    assert encode_reply_u64(1, 0x1234) == m.HEADER_STRUCT.pack(1, flags, 8) + u64(0x1234)
    assert encode_reply_vring_state(11, 2, 300) == (
        m.HEADER_STRUCT.pack(11, flags, 8) + m.VRING_STATE_STRUCT.pack(2, 300)
    )
    assert encode_reply_ack(5, True)[HEADER_SIZE:] == u64(0)
    assert encode_reply_ack(5, False)[HEADER_SIZE:] == u64(1)
    with pytest.raises(LocalProtocolError):
        encode_reply_u64(1, -1)


def test_reply_decoder_round_trip_split_everywhere() -> None:
    stream = (
        encode_reply_u64(Request.GET_FEATURES, 1 << 30)
        + encode_reply_vring_state(Request.GET_VRING_BASE, 1, 42)
        + encode_reply_ack(Request.SET_MEM_TABLE, False)
    )
    flags = V | VHOST_USER_FLAG_REPLY
    want = [
        (Request.GET_FEATURES, flags, u64(1 << 30)),
        (Request.GET_VRING_BASE, flags, m.VRING_STATE_STRUCT.pack(1, 42)),
        (Request.SET_MEM_TABLE, flags, u64(1)),
    ]
    for cut in range(len(stream) + 1):
        dec = ReplyDecoder()
        got = []
        for piece in (stream[:cut], stream[cut:]):
            dec.feed(piece)
            while (reply := dec.next_reply()) is not None:
                got.append(reply)
        assert got == want
        assert dec.pending_bytes == 0


@pytest.mark.parametrize(
    ("flags", "size"),
    [
        (V, 8),  # no REPLY flag
        (VHOST_USER_FLAG_REPLY, 8),  # version 0
        (2 | VHOST_USER_FLAG_REPLY, 8),
        (V | VHOST_USER_FLAG_REPLY | VHOST_USER_FLAG_NEED_REPLY, 8),
        (V | VHOST_USER_FLAG_REPLY | 0x100, 8),
        (V | VHOST_USER_FLAG_REPLY, MAX_PAYLOAD_SIZE + 1),
    ],
)
def test_reply_decoder_refuses_garbage(flags: int, size: int) -> None:
    dec = ReplyDecoder()
    dec.feed(m.encode_header(Request.GET_FEATURES, flags, size))
    with pytest.raises(RemoteProtocolError, match="GET_FEATURES"):
        dec.next_reply()
    with pytest.raises(LocalProtocolError):
        dec.feed(b"x")
    with pytest.raises(LocalProtocolError):
        dec.next_reply()


# --- property tests ------------------------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run_decoder(pieces: list[tuple[bytes, int]]) -> None:
    """Feed pieces (bytes, number of fresh fds) and drain; only RemoteProtocolError may
    escape, and no fd may leak."""
    with no_fd_leak():
        dec = RequestDecoder()
        handed_out: list[int] = []
        try:
            for data, nfds in pieces:
                fds = [os.eventfd(0) for _ in range(nfds)]
                dec.feed(data, fds)
                for req in decode_all(dec):
                    handed_out.extend(req.attached_fds())
        except RemoteProtocolError:
            with pytest.raises(LocalProtocolError):
                dec.next_request()
        finally:
            dec.close()
            close_quietly(handed_out)


pieces_st = st.lists(st.tuples(st.binary(max_size=80), st.integers(0, 3)), max_size=8)


@FUZZ
@given(pieces_st)
def test_fuzz_random_bytes(pieces: list[tuple[bytes, int]]) -> None:
    run_decoder(pieces)


codes_st = st.one_of(st.sampled_from(sorted(SUPPORTED_REQUESTS)), st.integers(0, 60))
flags_st = st.one_of(
    st.sampled_from([V, V | VHOST_USER_FLAG_NEED_REPLY]), st.integers(0, (1 << 32) - 1)
)
sizes_st = st.one_of(
    st.sampled_from([0, 4, 8, 16, 40, 8 + 32, 8 + 64, 8 + 8 * 32, 8 + 9 * 32, MAX_PAYLOAD_SIZE]),
    st.integers(0, MAX_PAYLOAD_SIZE + 2),
)


@st.composite
def header_messages(draw: st.DrawFn) -> list[tuple[bytes, int]]:
    out = []
    for _ in range(draw(st.integers(1, 4))):
        code, flags, size = draw(codes_st), draw(flags_st), draw(sizes_st)
        if size <= MAX_PAYLOAD_SIZE:
            body = draw(st.binary(min_size=min(size, 64), max_size=min(size, 64)))
            body = body.ljust(size, b"\0")
        else:
            body = b""
        out.append((m.encode_header(code, flags, size) + body, draw(st.integers(0, 9))))
    return out


@FUZZ
@given(header_messages())
@example([(raw(Request.SET_VRING_KICK, u64(NOFD)), 0)])
@example([(raw(Request.SET_MEM_TABLE, mem_table([REGION.pack()] * 2)), 2)])
def test_fuzz_random_headers(pieces: list[tuple[bytes, int]]) -> None:
    run_decoder(pieces)


@FUZZ
@given(st.data())
def test_fuzz_truncation_is_never_an_error(data: st.DataObject) -> None:
    with no_fd_leak():
        fds = Fds()
        reqs = every_request(fds)
        req = data.draw(st.sampled_from(reqs))
        encoded, req_fds = m.encode_request(req)
        for fd in set(fds.made) - set(req_fds):
            os.close(fd)
        cut = data.draw(st.integers(0, len(encoded) - 1))
        dec = RequestDecoder()
        dec.feed(encoded[:cut], req_fds)
        assert dec.next_request() is None
        dec.close()
        assert not any(is_open(fd) for fd in req_fds)


u32 = st.integers(0, (1 << 32) - 1)
u64s = st.integers(0, U64_MAX)
bools = st.booleans()


@st.composite
def regions(draw: st.DrawFn) -> m.MemRegion:
    size = draw(st.integers(1, U64_MAX))
    limit = (1 << 64) - size
    return m.MemRegion(
        draw(st.integers(0, limit)),
        size,
        draw(st.integers(0, limit)),
        draw(st.integers(0, limit)),
    )


valid_requests = st.one_of(
    st.builds(m.GetFeatures, bools),
    st.builds(m.SetFeatures, u64s, bools),
    st.builds(m.SetProtocolFeatures, u64s, bools),
    st.builds(m.NetSetMtu, u64s, bools),
    st.builds(m.SetStatus, st.integers(0, 255), bools),
    st.builds(m.SetVringNum, u32, st.integers(1, 32768), bools),
    st.builds(m.SetVringBase, u32, u32, bools),
    st.builds(m.GetVringBase, u32, bools),
    st.builds(m.SetVringEnable, u32, bools, bools),
    st.builds(
        m.SetVringAddr,
        u32,
        st.sampled_from([0, 1]),
        u64s.map(lambda a: a & ~0xF),
        u64s.map(lambda a: a & ~0x3),
        u64s.map(lambda a: a & ~0x1),
        u64s,
        bools,
    ),
    st.builds(m.SendRarp, st.binary(min_size=6, max_size=6), bools),
    st.builds(m.RemMemReg, regions(), bools),
    st.builds(m.GetStatus, bools),
    st.builds(m.ResetDevice, bools),
    st.builds(
        m.Unsupported,
        st.sampled_from([22, 23, 24, 25, 31, 32, 41, 77]),
        st.binary(max_size=64),
        st.just(()),
        bools,
    ),
)


@FUZZ
@given(valid_requests)
def test_round_trip_random_values(req: m.RequestMessage) -> None:
    data, fds = m.encode_request(req)
    dec = RequestDecoder()
    dec.feed(data, fds)
    assert dec.next_request() == req


@FUZZ
@given(
    st.lists(regions(), min_size=1, max_size=8),
    st.integers(0, 255),
    st.booleans(),
    st.sampled_from([m.SetVringKick, m.SetVringCall, m.SetVringErr]),
    st.integers(1, 5),
)
def test_round_trip_random_fd_requests(
    table: list[m.MemRegion],
    index: int,
    nofd: bool,
    vring_cls: Callable[..., m.RequestMessage],
    split: int,
) -> None:
    with no_fd_leak():
        fds = [os.eventfd(0) for _ in range(len(table) + 2)]
        try:
            reqs = [
                m.SetMemTable(tuple(table), tuple(fds[: len(table)]), True),
                m.AddMemReg(table[0], fds[-2]),
                vring_cls(index, None if nofd else fds[-1]),
            ]
            dec = RequestDecoder()
            got = []
            for req in reqs:
                data, req_fds = m.encode_request(req)
                cut = min(split, len(data))
                dec.feed(data[:cut], req_fds)
                got.extend(decode_all(dec))
                dec.feed(data[cut:])
                got.extend(decode_all(dec))
            assert got == reqs
            dec.close()
        finally:
            close_quietly(fds)
