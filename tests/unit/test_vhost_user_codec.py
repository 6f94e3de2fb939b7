"""The vhost-user codec on well-formed input: constants, message values,
requests round-tripping through encode_request and RequestDecoder (split
anywhere, fds with the right message), tolerated oddities, and replies.
Malformed and random input: test_vhost_user_codec_malformed."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.vhost_user_wire import (
    FUZZ,
    REGION,
    REGION2,
    U64_MAX,
    Fds,
    V,
    close_quietly,
    decode_all,
    every_request,
    is_open,
    mem_table,
    no_fd_leak,
    raw,
    u64,
)
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
    ProtocolFeature,
    Request,
)
from trionet.vhost_user.replies import (
    ReplyDecoder,
    encode_reply_ack,
    encode_reply_u64,
    encode_reply_vring_state,
)

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
