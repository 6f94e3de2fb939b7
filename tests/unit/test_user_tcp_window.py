"""The window trionet advertises to the guest, with the state machine alone
(``tcp_conn.TcpConn`` over a scripted host socket and wire: no stack, no
sockets, no clock but the times passed in).

The window follows the host socket's free send space, and a window that
closed must reopen without help from the socket: its wake-up (EPOLLOUT) only
comes after a send that found it full, which a small transfer never meets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trionet.backends.user import tcp_conn as T
from trionet.backends.user.tcp_tcb import WINDOW_RETRY

ISS, IRS = 5_000, 9_000
MSS_LIMIT = 65480  # the guest's MTU of 65520


@dataclass
class Host:
    free: int = 1 << 20
    outq: int = 0
    buffer: int = 1 << 21
    sent: bytearray = field(default_factory=bytearray)
    stream: int = 0  # bytes from the host peer waiting in the receive queue

    def available(self, offset: int) -> int:
        return max(0, self.stream - offset)

    def consume(self, n: int) -> None:
        pass

    def send(self, data: bytes) -> int:
        taken = min(len(data), self.free)
        self.sent += data[:taken]
        self.outq += taken
        self.free -= taken
        return taken

    def space(self) -> int:
        return self.free

    def queued(self) -> int:
        return self.outq

    def capacity(self) -> int:
        return self.buffer

    def shutdown_write(self) -> None:
        pass

    def abort(self) -> None:
        pass


@dataclass
class Wire:
    out: list[tuple[int, int, int, int, bytes]] = field(default_factory=list)
    options: list[bytes] = field(default_factory=list)  # of each segment in out
    sent: list[tuple[int, int]] = field(default_factory=list)  # data segments: seq, length

    def room(self) -> int:
        return 64

    def segment(
        self, flags: int, seq: int, ack: int, window: int, payload: bytes, options: bytes
    ) -> None:
        self.out.append((flags, seq, ack, window, payload))
        self.options.append(options)

    def data(
        self, flags: int, seq: int, ack: int, window: int, length: int, seg: int, mss: int
    ) -> None:
        for off in range(0, length, seg):
            self.sent.append((seq + off, min(seg, length - off)))


def established(host: Host, *, sack: bool = False) -> tuple[T.TcpConn, Wire]:
    wire = Wire()
    conn = T.TcpConn(host, wire, iss=ISS, mss_limit=MSS_LIMIT, now=0.0)
    syn = T.Segment(IRS, 0, T.SYN, 65535, b"", mss=MSS_LIMIT, wscale=7, sack_ok=sack)
    conn.guest_syn(syn)
    conn.connected(0.0)
    conn.on_segment(T.Segment(IRS + 1, ISS + 1, T.ACK, 512, b""), 0.0)
    assert conn.state is T.State.ESTABLISHED
    wire.out.clear()
    wire.options.clear()
    return conn, wire


def deliver(conn: T.TcpConn, seg: T.Segment, now: float) -> None:
    """A guest segment, then what is due at once (delayed ACKs), as the
    connection's task runs it."""
    conn.on_segment(seg, now)
    if conn.next_deadline() <= now:
        conn.on_timer(now)


def window_of(conn: T.TcpConn, wire: Wire) -> int:
    flags, _seq, _ack, window, _payload = wire.out[-1]
    assert flags & T.ACK
    return window << conn.ws_to_guest


def test_a_closed_window_reopens_without_a_socket_wakeup() -> None:
    host = Host(free=30_000, outq=100, buffer=100_000)
    conn, wire = established(host)
    deliver(conn, T.Segment(IRS + 1, ISS + 1, T.ACK | T.PSH, 512, b"x" * 100), 1.0)
    assert window_of(conn, wire) == 0  # 30 kB free < min(MSS, buffer / 2) with data queued
    # the host peer took everything: the socket is empty, but no EPOLLOUT comes
    host.free, host.outq = 100_000, 0
    wire.out.clear()
    at = conn.next_deadline()
    assert at <= 1.0 + WINDOW_RETRY
    conn.on_timer(at)
    assert wire.out, "no window update"
    flags, seq, ack, _window, payload = wire.out[-1]
    assert (flags, seq, ack, payload) == (T.ACK, ISS + 1, IRS + 101, b"")
    assert window_of(conn, wire) > 0


def test_a_closed_window_is_looked_at_again_until_it_opens() -> None:
    host = Host(free=1_000, outq=50_000, buffer=100_000)
    conn, wire = established(host)
    deliver(conn, T.Segment(IRS + 1, ISS + 1, T.ACK | T.PSH, 512, b"y" * 10), 1.0)
    assert window_of(conn, wire) == 0
    now = 1.0
    for _ in range(5):  # still full: no update, but the next look is armed
        wire.out.clear()
        now = conn.next_deadline()
        assert now <= 1.0 + 10 * WINDOW_RETRY
        conn.on_timer(now)
        assert not wire.out
    host.free, host.outq = 80_000, 0
    now = conn.next_deadline()
    conn.on_timer(now)
    assert window_of(conn, wire) == 80_000 >> conn.ws_to_guest << conn.ws_to_guest


def test_small_send_buffer_does_not_close_the_window_under_a_large_mss() -> None:
    # RFC 1122 §4.2.3.3: hold back below min(MSS, buffer / 2), not below one MSS
    host = Host(free=40_000, outq=1_000, buffer=60_000)
    conn, wire = established(host)
    deliver(conn, T.Segment(IRS + 1, ISS + 1, T.ACK | T.PSH, 512, b"z" * 10), 1.0)
    assert window_of(conn, wire) == 40_000 >> conn.ws_to_guest << conn.ws_to_guest


def test_keepalive_and_window_probes_get_an_ack() -> None:
    host = Host(free=0, outq=10, buffer=100_000)
    conn, wire = established(host)
    deliver(conn, T.Segment(IRS, ISS + 1, T.ACK, 512, b""), 2.0)  # seq one below rcv_nxt
    assert wire.out, "the probe went unanswered"
    flags, seq, ack, _window, _payload = wire.out[-1]
    assert (flags, seq, ack) == (T.ACK, ISS + 1, IRS + 1)


def test_no_small_segments_into_a_window_an_ack_will_open() -> None:
    # RFC 1122 §4.2.3.4: the sender waits rather than fill a sliver of window
    host = Host()
    conn, wire = established(host)  # the guest offers 512 << 7 = 65536 bytes
    host.stream = 200_000
    conn.on_readable(1.0)
    assert sum(n for _, n in wire.sent) == 65536  # the whole window
    wire.sent.clear()
    # the guest acknowledges 1000 bytes: 1000 bytes of window open, 64536 in flight
    conn.on_segment(T.Segment(IRS + 1, ISS + 1 + 1000, T.ACK, 512, b""), 1.1)
    assert not wire.sent
    # it acknowledges everything: a whole window again
    conn.on_segment(T.Segment(IRS + 1, ISS + 1 + 65536, T.ACK, 512, b""), 1.2)
    assert sum(n for _, n in wire.sent) == 65536


def test_an_inbound_connection_starts_with_the_syn_ack_s_window_as_a_field() -> None:
    """The native paths see the guest's window as its last window field,
    scaled: after a SYN-ACK (whose window is never scaled) that field must
    already hold it (scaled down), or C sees a closed window where Python
    sees an open one, and host data C takes as it arrives goes nowhere."""
    host = Host()
    wire = Wire()
    conn = T.TcpConn(host, wire, iss=ISS, mss_limit=MSS_LIMIT, now=0.0)
    conn.open(0.0)
    synack = T.Segment(IRS, ISS + 1, T.SYN | T.ACK, 65535, b"", mss=1460, wscale=7)
    conn.on_segment(synack, 0.1)
    assert conn.state is T.State.ESTABLISHED
    assert conn.window_field == 65535 >> 7 and conn.window_field << conn.ws_from_guest <= 65535
    assert conn.native_push
