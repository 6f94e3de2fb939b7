"""The vhost-user codec on malformed and random input: RequestDecoder refuses
what breaks the protocol and closes every fd it holds, takes the largest
payload allowed, and survives random bytes, headers and truncation without
leaking an fd.  Well-formed input: test_vhost_user_codec."""

from __future__ import annotations

import os

import pytest
from hypothesis import example, given
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
    region_bytes,
    u64,
)
from trionet.errors import LocalProtocolError, RemoteProtocolError
from trionet.vhost_user import messages as m
from trionet.vhost_user.codec import SUPPORTED_REQUESTS, RequestDecoder
from trionet.vhost_user.constants import (
    MAX_PAYLOAD_SIZE,
    VHOST_USER_FLAG_NEED_REPLY,
    VHOST_USER_FLAG_REPLY,
    VRING_NOFD_MASK,
    Request,
)

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


# --- property tests ------------------------------------------------------------------


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
