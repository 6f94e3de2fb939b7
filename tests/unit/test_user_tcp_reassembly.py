"""Guest data past a gap (``tcp_segment.Reassembly`` in ``TcpConn``): held
until the gap fills, then delivered and acknowledged in one go; and the
duplicate ACKs that make the guest retransmit the gap keep their window
field, or the guest does not count them (RFC 5681 §2).  Sans-IO, with the
scripted host socket and wire of ``test_user_tcp_window``."""

from __future__ import annotations

import itertools
import struct

from hypothesis import given
from hypothesis import strategies as st

from tests.unit.test_user_tcp_window import IRS, ISS, Host, deliver, established
from trionet.backends.user import tcp_conn as T
from trionet.backends.user.tcp_segment import Reassembly, seq_diff

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


# ---- SACK (RFC 2018) ----------------------------------------------------------------


def sack_blocks(options: bytes) -> list[tuple[int, int]]:
    """The blocks of a SACK option as the stack sends it (NOP, NOP, kind 5)."""
    if not options:
        return []
    assert options[:4] == bytes((1, 1, 5, len(options) - 2)) and len(options) % 4 == 0
    return [struct.unpack_from("!II", options, 4 + 8 * i) for i in range((len(options) - 4) // 8)]


def span(first: int, last: int, size: int = 1000) -> tuple[int, int]:
    """Pieces first..last as one range of sequence numbers."""
    return IRS + 1 + first * size, IRS + 1 + (last + 1) * size


def test_acks_list_what_is_held_when_the_guest_permits_sack() -> None:
    """Pieces 0, 1 and 4 are lost: each duplicate ACK lists the held ranges,
    the one with the segment just received first, so the guest resends only
    the holes; once nothing is held, no SACK option."""
    host = Host()
    conn, wire = established(host, sack=True)
    assert conn.sack
    for i in (2, 3, 5):
        seq, data = piece(i)
        deliver(conn, T.Segment(seq, ISS + 1, A, 512, data), 1.0 + i / 100)
    assert [out[2] for out in wire.out[-3:]] == [IRS + 1] * 3
    assert [sack_blocks(o) for o in wire.options[-3:]] == [
        [span(2, 2)],
        [span(2, 3)],  # contiguous pieces: one block
        [span(5, 5), span(2, 3)],  # the latest first
    ]
    seq, data = piece(0)
    deliver(conn, T.Segment(seq, ISS + 1, A, 512, data), 1.1)
    assert wire.out[-1][2] == IRS + 1 + 1000
    assert sack_blocks(wire.options[-1]) == [span(5, 5), span(2, 3)]
    seq, data = piece(1)  # fills the first hole: 2 and 3 are delivered
    deliver(conn, T.Segment(seq, ISS + 1, A, 512, data), 1.2)
    assert wire.out[-1][2] == IRS + 1 + 4000
    assert sack_blocks(wire.options[-1]) == [span(5, 5)]
    seq, data = piece(4)
    deliver(conn, T.Segment(seq, ISS + 1, A, 512, data), 1.3)
    assert wire.out[-1][2] == IRS + 1 + 6000 and wire.options[-1] == b""
    assert bytes(host.sent) == STREAM[:6000]


def test_no_sack_blocks_unless_the_guest_permitted_sack() -> None:
    host = Host()
    conn, wire = established(host)
    assert not conn.sack
    for i in (1, 3):
        seq, data = piece(i)
        deliver(conn, T.Segment(seq, ISS + 1, A, 512, data), 1.0)
    assert wire.options[-2:] == [b"", b""]


@given(st.lists(st.tuples(st.integers(1, 60), st.integers(1, 300)), min_size=1, max_size=40),
       st.integers(0, 2**32 - 1))  # fmt: skip
def test_sack_blocks_cover_exactly_what_is_held(arrivals: list[tuple[int, int]], base: int) -> None:
    """Any held segments (overlapping, touching, the sequence numbers
    wrapping): the blocks are disjoint, not touching, cover exactly the held
    bytes, and the first holds the segment added last."""
    r = Reassembly()
    for start, size in arrivals:
        r.add((base + start * 100) & 0xFFFFFFFF, b"x" * size, base, 1 << 16)
    blocks = [(seq_diff(a, base), seq_diff(b, base)) for a, b in r.blocks(base)]
    held = {seq_diff(seq, base) + k for seq, data in r.segments.items() for k in range(len(data))}
    covered = {x for a, b in blocks for x in range(a, b)}
    assert covered == held
    ordered = sorted(blocks)
    assert all(b1 < a2 for (_a1, b1), (a2, _b2) in itertools.pairwise(ordered))
    assert r.last is not None
    last = seq_diff(r.last, base)
    assert blocks[0][0] <= last < blocks[0][1]


@given(
    st.lists(st.tuples(st.integers(1, 60), st.integers(1, 300)), min_size=1, max_size=40),
    st.integers(0, 2**32 - 1),
    st.lists(st.integers(0, 3000), max_size=3),
)
def test_blocks_kept_up_to_date_equal_blocks_made_anew(
    arrivals: list[tuple[int, int]], base: int, fills: list[int]
) -> None:
    """The ranges ``add`` keeps merged as segments arrive give the blocks
    that rebuilding them from the held segments gives, asked after every
    arrival, and after data at the front was taken (``rcv_nxt`` moving);
    ``take``, which reads them to answer "nothing reachable" at once, takes
    what a scan of every held segment takes."""
    r = Reassembly()
    rcv_nxt = base
    for k, (start, size) in enumerate(arrivals):
        r.add((base + start * 100) & 0xFFFFFFFF, bytes([k % 251]) * size, rcv_nxt, 1 << 16)
        if fills and k == len(arrivals) // 2:
            rcv_nxt = (base + fills.pop()) & 0xFFFFFFFF
            r.take(rcv_nxt)
        fresh = Reassembly()
        fresh.segments, fresh.last = dict(r.segments), r.last
        assert r.blocks(rcv_nxt) == fresh.blocks(rcv_nxt)
    # and whether anything continues the stream at a point reads them too
    for probe in (rcv_nxt, (base + 150) & 0xFFFFFFFF, (base + 3000) & 0xFFFFFFFF):
        fresh = Reassembly()
        fresh.segments, fresh.bytes = dict(r.segments), r.bytes
        assert r.take(probe) == fresh.take(probe)
        assert r.segments == fresh.segments and r.bytes == fresh.bytes
