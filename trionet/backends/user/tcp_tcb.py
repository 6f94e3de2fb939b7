"""The variables of one TCP connection (its transmission control block,
RFC 9293 §3.3.1) and the window and ACKs we send the guest from them.

``Tcb`` is the base of ``tcp_conn.TcpConn``: it holds the sequence numbers
both ways, the negotiated options, the timers and the counters, and computes
the window advertised for the guest's data (the host socket's free space,
scaled, with silly window avoidance) and the ACKs that carry it.  What moves
the connection (segments, host readiness, time) is ``TcpConn``'s.
"""

from __future__ import annotations

from trionet.backends.user import packets as P
from trionet.backends.user.tcp_segment import MASK, Reassembly, Scoreboard, sack_option, seq_lt
from trionet.backends.user.tcp_states import Host, State, Wire

MSS_DEFAULT = 536  # RFC 9293 §3.7.1, when the SYN carries no MSS option
SEG_MAX = 65476  # a GSO frame's payload at most (TN_TCP_SEG_MAX in native/usertcp.h)
WINDOW_RETRY = 0.02  # s: a zero window we advertised is looked at again this often


class Tcb:
    """A connection's variables, and the window and ACKs sent from them."""

    @property
    def seg(self) -> int:
        """Payload per frame to the guest: one MSS, or as many as a GSO frame
        holds (``TN_TCP_SEG_MAX``) when the guest takes TSO."""
        return self.mss * max(1, SEG_MAX // self.mss) if self.gso else self.mss

    def __init__(self, host: Host, wire: Wire, *, iss: int, mss_limit: int, now: float) -> None:
        self.host = host
        self.wire = wire
        self.state = State.CONNECTING
        self.mss_limit = mss_limit  # the MTU's MSS for this family
        self.mss = min(MSS_DEFAULT, mss_limit)  # largest segment to the guest
        self.gso = False  # the guest takes GSO frames for this connection (its TSO)
        # towards the guest
        self.iss = iss
        self.snd_una = self.snd_nxt = self.snd_max = iss
        self.snd_wnd = 1  # bytes, scaled
        self.window_field = 0  # the window field of the guest's last segment, as sent
        self.max_snd_wnd = 0  # the largest window the guest offered (sender SWS avoidance)
        self.ws_from_guest = 0
        self.fin_seq: int | None = None  # sequence number of our FIN once the host said EOF
        self.scoreboard = Scoreboard()  # what the guest SACKed above snd_una
        self.recover: int | None = None  # SACK recovery: snd_max when it began
        self.rexmit_next = iss  # SACK recovery: the holes below this were resent
        # from the guest
        self.irs = 0
        self.rcv_nxt = 0
        self.ws_to_guest = 0
        self.sack = False  # SACK-permitted both ways: our ACKs carry SACK blocks
        self.wnd_sent = 0  # window last advertised, bytes
        self.rcv_edge = 0  # the furthest right edge advertised (rcv_nxt + window)
        self.guest_fin = False
        self.reasm = Reassembly()  # guest data past a gap
        # timers and flags
        self.retries = 0
        self.rto_at: float | None = None
        self.dupacks = 0
        self.ack_due = False
        self.want_write = False  # waiting for the host socket to take more
        self.window_retry_at: float | None = None  # our window is zero: look again then
        self.now = now  # the time of the input being handled
        self.blocked_at: float | None = None  # the wire was full: try again then
        self.probe = False  # the guest's window is zero: probe with one byte
        self.last_guest = self.last_activity = self.keepalive_at = now
        self.reset_reason: str | None = None
        # counters
        self.bytes_to_guest = 0
        self.bytes_from_guest = 0
        self.retransmits = 0
        self.fast_retransmits = 0
        self.sack_resent = 0  # bytes resent from SACK holes

    # ---- window and ACKs ------------------------------------------------------------

    def _space(self) -> int:
        return 0 if self.guest_fin else max(0, self.host.space())

    def _window(self) -> int:
        """The window field to send: the socket's free space, scaled; zero
        while data is queued and less than min(MSS, half the send buffer) is
        free (RFC 1122 §4.2.3.3, silly window avoidance).  A zero window is
        looked at again every ``WINDOW_RETRY``: the socket's own wake-up
        (EPOLLOUT) only comes after a send that found it full."""
        space = min(self._space(), 0xFFFF << self.ws_to_guest)
        if space < min(self.mss, self.host.capacity() // 2) and self.host.queued():
            space = 0
        field = space >> self.ws_to_guest
        self.wnd_sent = field << self.ws_to_guest
        edge = (self.rcv_nxt + self.wnd_sent) & MASK
        if seq_lt(self.rcv_edge, edge):
            self.rcv_edge = edge  # the right edge never moves back for what the guest sends
        if not field and not self.guest_fin:
            self.want_write = True
            if self.window_retry_at is None:
                self.window_retry_at = self.now + WINDOW_RETRY
        elif field:
            self.window_retry_at = None
        return field

    def _sack(self) -> bytes:
        """SACK blocks of the data held past a gap, when SACK is on."""
        if not self.sack or not self.reasm:
            return b""
        blocks = self.reasm.blocks(self.rcv_nxt)
        return sack_option(blocks) if blocks else b""

    def _send_ack(self) -> None:
        self.wire.segment(P.TCP_ACK, self.snd_nxt, self.rcv_nxt, self._window(), b"", self._sack())
        self.ack_due = False

    def _send_dup_ack(self) -> None:
        """A duplicate ACK: the window field of the last ACK, unchanged, or the
        guest does not count it as a duplicate (RFC 5681 §2) and waits for its
        retransmission timer instead of retransmitting at the third."""
        field = self.wnd_sent >> self.ws_to_guest
        self.wire.segment(P.TCP_ACK, self.snd_nxt, self.rcv_nxt, field, b"", self._sack())
