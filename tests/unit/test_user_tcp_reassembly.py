"""Guest data past a gap (``tcp_segment.Reassembly`` in ``TcpConn``): held
until the gap fills, then delivered and acknowledged in one go; and the
duplicate ACKs that make the guest retransmit the gap keep their window
field, or the guest does not count them (RFC 5681 §2).  Sans-IO, with the
scripted host socket and wire of ``test_user_tcp_window``."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tests.unit.test_user_tcp_window import IRS, ISS, Host, deliver, established
from trionet.backends.user import tcp_conn as T
from trionet.backends.user.tcp_segment import Reassembly

A = T.ACK | T.PSH
STREAM = bytes(range(256)) * 40  # 10240 bytes


def piece(i: int, size: int = 1000) -> tuple[int, bytes]:
    return IRS + 1 + i * size, STREAM[i * size : (i + 1) * size]


def test_segments_past_a_gap_are_delivered_when_it_fills() -> None:
    host = Host()
    conn, wire = established(host)
    for i in (1, 2, 3):  # the first segment was lost
        seq, data = piece(i)
        deliver(conn, T.Segment(seq, ISS + 1, A, 512, data), 1.0)
    assert host.sent == b""
    assert [ack for _f, _s, ack, _w, _p in wire.out] == [IRS + 1] * 3  # duplicate ACKs
    seq, data = piece(0)
    deliver(conn, T.Segment(seq, ISS + 1, A, 512, data), 1.1)  # the retransmission
    assert bytes(host.sent) == STREAM[:4000]
    assert wire.out[-1][2] == IRS + 1 + 4000  # one ACK covers everything
    assert conn.bytes_from_guest == 4000 and not conn.reasm


def test_duplicate_acks_keep_the_window_field_of_the_last_ack() -> None:
    """The socket's free space changes between them; the window field must
    not, or the guest's fast retransmit never comes."""
    host = Host(free=500_000)
    conn, wire = established(host)
    seq, data = piece(0)
    deliver(conn, T.Segment(seq, ISS + 1, A, 512, data), 1.0)
    field = wire.out[-1][3]
    for i, free in zip((2, 3, 4), (300_000, 200_000, 400_000), strict=True):
        host.free = free  # the host peer reads, the socket fills
        seq, data = piece(i)
        deliver(conn, T.Segment(seq, ISS + 1, A, 512, data), 1.0 + i / 10)
    dups = wire.out[-3:]
    assert [(ack, window) for _f, _s, ack, window, _p in dups] == [(IRS + 1001, field)] * 3


def test_data_the_native_path_sent_reaches_held_data() -> None:
    """The native TX path took the segment that fills the gap: ``took``
    delivers what was held behind it."""
    host = Host()
    conn, _wire = established(host)
    seq, data = piece(1)
    deliver(conn, T.Segment(seq, ISS + 1, A, 512, data), 1.0)
    host.sent += STREAM[:1000]  # what the native path wrote to the socket
    conn.took(IRS + 1 + 1000, 1.1)
    assert bytes(host.sent) == STREAM[:2000]
    assert conn.rcv_nxt == IRS + 1 + 2000 and conn.ack_due


def test_held_data_the_socket_does_not_take_stays_held() -> None:
    host = Host(free=100_000)
    conn, wire = established(host)
    seq, data = piece(1)
    deliver(conn, T.Segment(seq, ISS + 1, A, 512, data), 1.0)
    host.free = 1500  # the socket fills up meanwhile
    seq, data = piece(0)
    deliver(conn, T.Segment(seq, ISS + 1, A, 512, data), 1.1)
    assert bytes(host.sent) == STREAM[:1500] and conn.rcv_nxt == IRS + 1 + 1500
    assert conn.want_write  # waits for the socket
    host.free = 10_000
    wire.out.clear()
    conn.on_writable(1.2)  # the socket takes more: the held rest goes, and is acknowledged
    assert bytes(host.sent) == STREAM[:2000]
    assert wire.out[-1][2] == IRS + 1 + 2000


def test_reassembly_refuses_what_is_past_the_window_or_the_limit() -> None:
    r = Reassembly(limit=2000)
    assert not r.add(100, b"x" * 10, 100, 5000)  # at rcv_nxt: not past a gap
    assert not r.add(150, b"x" * 100, 100, 100)  # ends past the window
    assert r.add(200, b"x" * 1000, 100, 5000)
    assert r.add(200, b"x" * 500, 100, 5000)  # a shorter duplicate: kept as it was
    assert r.add(1200, b"x" * 1000, 100, 5000)
    assert not r.add(2200, b"x" * 1, 100, 5000)  # over the limit
    assert r.bytes == 2000 and r.refused == 3


def test_reassembly_holds_a_bounded_number_of_segments() -> None:
    """A guest sending one-byte segments past a gap cannot make the stack
    hold more objects than it holds bytes for."""
    r = Reassembly(max_segments=4)
    for i in range(10):
        r.add(200 + 2 * i, b"x", 100, 5000)
    assert len(r) == 4 and r.refused == 6
    assert r.add(200, b"xyz", 100, 5000)  # a longer copy of one held: replaces it
    assert len(r) == 4 and r.bytes == 6


@given(
    st.lists(st.tuples(st.integers(0, 9), st.integers(1, 1500)), min_size=1, max_size=30),
    st.integers(0, 2**32 - 1),
)
def test_any_arrival_order_delivers_the_stream_once_in_order(
    arrivals: list[tuple[int, int]], base: int
) -> None:
    """Segments of a stream (any offsets and lengths, overlapping, repeated,
    the sequence numbers wrapping), then the whole stream from the start:
    the bytes delivered are the stream's prefix, each once."""
    r = Reassembly()
    stream = bytes(range(256)) * 64
    rcv_nxt, delivered = base, bytearray()
    for start, size in arrivals:
        off = start * 700 + 1
        r.add((base + off) & 0xFFFFFFFF, stream[off : off + size], rcv_nxt, 1 << 16)
    delivered += stream[:1]
    rcv_nxt = (base + 1) & 0xFFFFFFFF
    while (data := r.take(rcv_nxt)) is not None:
        delivered += data
        rcv_nxt = (rcv_nxt + len(data)) & 0xFFFFFFFF
    assert bytes(delivered) == stream[: len(delivered)]
    assert r.bytes == sum(len(d) for d in r.segments.values())


def test_the_part_of_a_segment_the_socket_refused_is_held_not_dropped() -> None:
    """The window said there was room, the socket took part (its memory is
    not all payload): the rest waits here, acknowledged once taken, and the
    guest does not have to send it (and all behind it) again."""
    host = Host(free=100_000)
    conn, wire = established(host)
    host.free = 400
    seq, data = piece(0)
    deliver(conn, T.Segment(seq, ISS + 1, A, 512, data), 1.0)
    assert bytes(host.sent) == STREAM[:400] and wire.out[-1][2] == IRS + 1 + 400
    seq, data = piece(1)  # sent within the window meanwhile: held past the rest
    deliver(conn, T.Segment(seq, ISS + 1, A, 512, data), 1.1)
    host.free = 10_000
    conn.on_writable(1.2)
    assert bytes(host.sent) == STREAM[:2000]
    assert wire.out[-1][2] == IRS + 1 + 2000
