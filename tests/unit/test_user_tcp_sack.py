"""The guest's SACK blocks about our data (RFC 2018, RFC 6675): read from its
ACKs, kept in a ``Scoreboard``, and a fast retransmit resends only the holes
below the highest byte SACKed, each once, while ``snd_nxt`` stays where the
stream is.  Sans-IO, with the scripted host socket and wire of
``test_user_tcp_window``; the same over real rings and a real socket is in
``test_user_tcp_native_push``."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from tests.unit.test_user_tcp_window import IRS, ISS, Host, Wire
from trionet.backends.user import packets as P
from trionet.backends.user import tcp_conn as T
from trionet.backends.user.tcp_segment import Scoreboard, parse_segment, seq_diff

MSS = 1000
FIELD = 512  # the guest's window field: 512 << 7 = 64 segments


class Stream(Host):
    """The host socket's receive queue shrinks by what the guest acknowledged."""

    def consume(self, n: int) -> None:
        self.stream -= n


def s(k: int) -> int:
    """The sequence number of our k-th segment."""
    return ISS + 1 + k * MSS


def sender(host: Stream, *, sack: bool = True) -> tuple[T.TcpConn, Wire]:
    """An established connection with a guest of MSS 1000 that permitted
    SACK (or not), 20 segments of the host's stream sent to it."""
    wire = Wire()
    conn = T.TcpConn(host, wire, iss=ISS, mss_limit=65480, now=0.0)
    conn.guest_syn(T.Segment(IRS, 0, T.SYN, 65535, b"", mss=MSS, wscale=7, sack_ok=sack))
    conn.connected(0.0)
    conn.on_segment(T.Segment(IRS + 1, ISS + 1, T.ACK, FIELD, b""), 0.0)
    assert conn.state is T.State.ESTABLISHED and conn.sack is sack
    host.stream = 20 * MSS
    conn.on_readable(1.0)
    assert wire.sent == [(s(k), MSS) for k in range(20)]
    wire.sent.clear()
    return conn, wire


def ack(conn: T.TcpConn, upto: int, *blocks: tuple[int, int], now: float = 1.1) -> None:
    """The guest's ACK of everything below segment ``upto``, SACKing the
    segment ranges ``blocks`` ((first, last + 1) each)."""
    sack = tuple((s(a), s(b)) for a, b in blocks)
    conn.on_segment(T.Segment(IRS + 1, s(upto), T.ACK, FIELD, b"", sack=sack), now)


def test_a_fast_retransmit_resends_only_the_holes() -> None:
    """Segments 3 and 7 are lost: the third duplicate ACK resends 3, the
    first ACK that SACKs past 7 resends 7, and no later one resends either;
    the stream's own sending goes on from where it was."""
    host = Stream()
    conn, wire = sender(host)
    ack(conn, 3)
    ack(conn, 3, (4, 5))
    ack(conn, 3, (4, 6))
    assert wire.sent == [] and conn.recover is None
    ack(conn, 3, (4, 7))  # the third duplicate
    assert wire.sent == [(s(3), MSS)]
    assert conn.recover == s(20) and not conn.native_push  # Python's until it ends
    ack(conn, 3, (8, 9), (4, 7))
    assert wire.sent == [(s(3), MSS), (s(7), MSS)]
    for k in range(10, 21):
        ack(conn, 3, (8, k), (4, 7))
    assert wire.sent == [(s(3), MSS), (s(7), MSS)]  # each hole once
    assert conn.snd_nxt == conn.snd_max == s(20)
    assert (conn.fast_retransmits, conn.retransmits, conn.sack_resent) == (1, 0, 2 * MSS)
    # 3 arrives: a partial ACK, up to the hole already resent
    ack(conn, 7, (8, 20), now=1.2)
    assert wire.sent == [(s(3), MSS), (s(7), MSS)] and conn.recover == s(20)
    # 7 arrives: all that was out when the recovery began is in
    ack(conn, 20, now=1.3)
    assert conn.recover is None and not conn.scoreboard and conn.native_push
    host.stream += 5 * MSS
    conn.on_readable(1.4)
    assert wire.sent[2:] == [(s(k), MSS) for k in range(20, 25)]


def test_enough_sacked_in_one_ack_starts_the_recovery() -> None:
    """RFC 6675 §5: three segments SACKed above a hole make it lost without
    waiting for three duplicate ACKs (the guest may send fewer, larger ones)."""
    host = Stream()
    conn, wire = sender(host)
    ack(conn, 2)
    ack(conn, 2, (3, 6))  # the first duplicate
    assert wire.sent == [(s(2), MSS)] and conn.fast_retransmits == 1


def test_a_timeout_in_a_recovery_goes_back_to_the_first_byte_not_acknowledged() -> None:
    """The resent hole was lost too: the timer sends everything from
    ``snd_una`` again, and forgets what was SACKed (the guest may have
    dropped it, RFC 2018 §8)."""
    host = Stream()
    conn, wire = sender(host)
    ack(conn, 3)
    for k in (5, 6, 7):
        ack(conn, 3, (4, k))
    assert wire.sent == [(s(3), MSS)]
    wire.sent.clear()
    at = conn.next_deadline()
    conn.on_timer(at)
    assert conn.recover is None and not conn.scoreboard and conn.retransmits == 1
    assert wire.sent[0] == (s(3), MSS) and sum(n for _, n in wire.sent) == 17 * MSS


def test_what_is_not_believed_of_the_guest_s_blocks() -> None:
    """A D-SACK block (at or below the cumulative ACK, RFC 2883) and a block
    past what was sent change nothing; a block reaching below ``snd_una`` is
    cut there."""
    host = Stream()
    conn, _wire = sender(host)
    ack(conn, 5, (1, 2), (25, 26))
    assert not conn.scoreboard
    ack(conn, 5, (18, 22))  # past snd_max: all of it disbelieved
    assert not conn.scoreboard
    ack(conn, 6, (4, 9))
    assert conn.scoreboard.ranges == [(s(6), s(9))]
    ack(conn, 8)  # a cumulative ACK drops what it covers
    assert conn.scoreboard.ranges == [(s(8), s(9))]


def test_without_sack_permitted_blocks_are_ignored_and_the_third_duplicate_goes_back() -> None:
    host = Stream()
    conn, wire = sender(host, sack=False)
    ack(conn, 3)
    for k in (5, 6, 7):
        ack(conn, 3, (4, k))
    assert not conn.scoreboard and conn.recover is None and conn.retransmits == 1
    assert wire.sent == [(s(k), MSS) for k in range(3, 20)]


def test_a_full_wire_resends_the_rest_of_the_holes_later() -> None:
    host = Stream()
    conn, wire = sender(host)
    room = 1
    wire.room = lambda: room  # type: ignore[method-assign]
    ack(conn, 0, (1, 2), (3, 4), (5, 20))  # a duplicate SACKing 16 segments
    assert wire.sent == [(s(0), MSS)] and conn.blocked_at is not None
    room = 64
    conn.on_timer(conn.next_deadline())
    assert wire.sent == [(s(0), MSS), (s(2), MSS), (s(4), MSS)]


# ---- the option, and the scoreboard on its own -----------------------------------------


def frame(options: list[tuple[str, object]]) -> bytes:
    return bytes(
        Ether() / IP(src="10.0.2.15", dst="10.0.2.2")
        / TCP(sport=40000, dport=80, seq=IRS, ack=ISS, flags="A", options=options)
    )  # fmt: skip


def test_sack_blocks_are_read_from_an_ack() -> None:
    seg = parse_segment(P.parse(frame([("NOP", None), ("NOP", None), ("SAck", (10, 20, 30, 40))])))
    assert seg.sack == ((10, 20), (30, 40))
    assert parse_segment(P.parse(frame([]))).sack == ()
    # a SACK option of a length no block count gives: ignored
    bad = bytearray(frame([("NOP", None), ("NOP", None), ("SAck", (10, 20))]))
    bad[54 + 3] = 9
    assert parse_segment(P.parse(bytes(bad), csum_trusted=True)).sack == ()


@given(
    st.lists(st.tuples(st.integers(-20, 120), st.integers(1, 40)), max_size=30),
    st.integers(0, 2**32 - 1),
    st.integers(0, 60),
)
def test_the_scoreboard_and_its_holes_partition_the_flight(
    blocks: list[tuple[int, int]], base: int, advance: int
) -> None:
    """Any blocks (overlapping, touching, out of range, the sequence numbers
    wrapping), then a cumulative ACK: the ranges stay sorted, disjoint, not
    touching and within (snd_una, snd_max]; the holes and the ranges together
    are exactly what lies from snd_una to the highest byte SACKed."""
    una, top = base, (base + 100) & 0xFFFFFFFF
    board = Scoreboard()
    for start, size in blocks:
        board.update((((base + start) & 0xFFFFFFFF, (base + start + size) & 0xFFFFFFFF),), una, top)
    una = (base + advance) & 0xFFFFFFFF
    board.update((), una, top)
    spans = [(seq_diff(a, una), seq_diff(b, una)) for a, b in board.ranges]
    assert all(0 <= a < b <= seq_diff(top, una) for a, b in spans)
    assert all(b1 < a2 for (_a1, b1), (a2, _b2) in itertools.pairwise(spans))
    holes = [(seq_diff(q, una), seq_diff(q, una) + n) for q, n in board.holes(una, una)]
    covered = sorted(spans + holes)
    assert all(b1 == a2 for (_a1, b1), (a2, _b2) in itertools.pairwise(covered))
    if covered:
        assert covered[0][0] == 0 and covered[-1][1] == spans[-1][1]
    expect = {
        x
        for start, size in blocks
        for x in range(max(start, 0), start + size)
        if 0 < start + size <= 100 and x >= advance
    }
    assert {x + advance for a, b in spans for x in range(a, b)} == expect
