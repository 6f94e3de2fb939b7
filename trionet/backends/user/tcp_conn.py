"""One TCP connection between the guest and a host socket: the state machine.

Sans-IO in the way the ring code is: the connection owns no file descriptor
and no task.  It is handed a ``Host`` (the host socket's few operations) and
a ``Wire`` (segments to the guest) and is driven by three inputs: a segment
from the guest (``on_segment``), the host socket being ready (``on_readable``,
``on_writable``) and time (``on_timer`` at ``next_deadline()``).

- **Handshake**: guest-initiated connections wait in ``CONNECTING`` until the
  host ``connect()`` completed (``connected``), then send the SYN-ACK; inbound
  ones (``-t``) start by sending a SYN (``open``).  The guest's MSS option is
  clamped to the MTU; window scaling is offered and used when both sides
  sent the option; SACK is permitted when the guest's SYN permits it (and
  offered in our own SYN), and then every ACK sent while guest data is held
  past a gap carries SACK blocks of what is held (RFC 2018 §4), and the
  guest's SACK blocks about our data fill a ``Scoreboard``; timestamps are
  neither offered nor used.
- **Host → guest**: data is never copied into a buffer of ours.  It stays in
  the socket's receive queue; the connection only decides which bytes go
  (``Wire.data``: sequence number and length, the payload is peeked from the
  socket at offset ``seq - snd_una`` when the frame is laid into the guest's
  ring); what the guest acknowledges is dropped from the queue
  (``Host.consume``).  Retransmission on timeout (exponential backoff)
  rewinds ``snd_nxt`` to ``snd_una`` and sends again, as three duplicate
  ACKs do without SACK; with SACK they start a recovery (RFC 6675) that
  resends only the holes below the highest byte SACKed, each once, while new
  data goes on, until ``snd_una`` passes what was sent when it began.
  Segments are at most the guest's MSS, within its window, and never more
  than the wire takes.
- **Guest → host**: in-order data goes to the socket; only what it accepted
  is acknowledged, and the window advertised is the socket's free space
  (zero below one MSS while data is queued: no silly windows).
- **Close**: FIN both ways with half-close, RST both ways, an idle timeout,
  keepalives towards a silent guest.

Every transition is in ``tcp_states.TRANSITIONS``; anything else is a bug
that resets the connection.  The connection's variables, and the window and
ACKs sent from them, are its base class ``tcp_tcb.Tcb``.
"""

from __future__ import annotations

from trionet.backends.user import packets as P
from trionet.backends.user.tcp_segment import MASK, Segment, seq_diff, seq_le, seq_lt, syn_options
from trionet.backends.user.tcp_states import (
    GUEST_MAY_SEND,
    SYNCHRONIZED,
    TRANSITIONS,
    WE_MAY_SEND,
    Event,
    State,
    TransitionError,
)
from trionet.backends.user.tcp_tcb import MSS_DEFAULT, Tcb

FIN, SYN, RST, PSH, ACK = P.TCP_FIN, P.TCP_SYN, P.TCP_RST, P.TCP_PSH, P.TCP_ACK

OUR_WSCALE = 8  # window scale we offer: windows up to 16 MiB
RTO_INIT = 1.0  # s, RFC 6298
RTO_MAX = 60.0
MAX_RETRIES = 7  # retransmissions before the connection is reset (about 2 minutes)
DUP_ACKS = 3  # duplicate ACKs that trigger a fast retransmit
KEEPALIVE_INTERVAL = 30.0  # s of guest silence before a keepalive probe
IDLE_TIMEOUT = 7200.0  # s without any activity: reset (passt's INACTIVITY_INTERVAL)
BLOCKED_RETRY = 0.01  # s: the wire was full, try again then
# ---- the connection --------------------------------------------------------------------


class TcpConn(Tcb):
    """The state machine, over the variables ``Tcb`` holds."""

    # ---- transitions ------------------------------------------------------------

    def _event(self, ev: Event) -> None:
        if ev is Event.RESET:
            self.state = State.CLOSED
            return
        new = TRANSITIONS.get((self.state, ev))
        if new is None:
            raise TransitionError(f"{ev.value} in {self.state.value}")
        self.state = new

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    # ---- opening -----------------------------------------------------------------

    def guest_syn(self, seg: Segment) -> None:
        """The guest's SYN that created the connection (state CONNECTING)."""
        self.irs = seg.seq
        self.rcv_nxt = self.rcv_edge = (seg.seq + 1) & MASK
        self._take_syn_options(seg, offered=seg.wscale is not None)

    def _take_syn_options(self, seg: Segment, *, offered: bool) -> None:
        self.mss = max(64, min(seg.mss if seg.mss else MSS_DEFAULT, self.mss_limit))
        if offered and seg.wscale is not None:
            self.ws_from_guest, self.ws_to_guest = seg.wscale, OUR_WSCALE
        else:
            self.ws_from_guest = self.ws_to_guest = 0
        self.sack = seg.sack_ok  # ours is offered in an inbound SYN, echoed in a SYN-ACK
        self.snd_wnd = self.max_snd_wnd = seg.window  # never scaled in a SYN
        # as the field of a later segment (the native paths scale it): not above the window
        self.window_field = seg.window >> self.ws_from_guest

    def connected(self, now: float) -> None:
        """The host connect() completed: SYN-ACK to the guest."""
        self.now = now
        self._event(Event.CONNECTED)
        self._send_syn(now)

    def open(self, now: float) -> None:
        """Inbound: the host accepted a connection; SYN to the guest."""
        self.now = now
        self.state = State.SYN_SENT
        self._send_syn(now)

    def _send_syn(self, now: float) -> None:
        inbound = self.state is State.SYN_SENT
        wscale = OUR_WSCALE if inbound or self.ws_to_guest else None
        opts = syn_options(self.mss_limit, wscale, inbound or self.sack)
        flags = SYN if inbound else SYN | ACK
        window = min(self._space(), 0xFFFF)
        self.wnd_sent = window
        if not inbound:
            self.rcv_edge = (self.rcv_nxt + window) & MASK
        self.wire.segment(flags, self.iss, self.rcv_nxt if not inbound else 0, window, b"", opts)
        self.snd_nxt = self.snd_max = (self.iss + 1) & MASK
        self.rto_at = now + self._rto()

    # ---- guest segments ------------------------------------------------------------

    def on_segment(self, seg: Segment, now: float) -> None:
        self.now = now
        if self.closed:
            return
        self.last_guest = self.last_activity = self.keepalive_at = now
        if seg.flags & RST:
            self._guest_rst(seg)
            return
        st = self.state
        if st is State.CONNECTING:
            return  # a retransmitted SYN: the SYN-ACK follows the connect
        if st is State.SYN_SENT:
            self._syn_ack(seg, now)
            return
        if seg.flags & SYN:
            if st is State.SYN_RCVD and not seg.flags & ACK and seg.seq == self.irs:
                self._retransmit_syn(now)  # our SYN-ACK was lost
            else:
                self._send_ack()  # RFC 5961 §4: challenge ACK
            return
        if not seg.flags & ACK:
            return
        if st is State.SYN_RCVD:
            if seg.ack != self.snd_nxt:
                self.wire.segment(RST, seg.ack, 0, 0, b"", b"")
                return
            self.snd_una = seg.ack
            self.rto_at = None
            self.retries = 0
            self._event(Event.SYN_ACKED)
        self._ack(seg, now)
        if self.closed:
            return
        if seg.payload or seg.flags & FIN:
            self._data(seg, now)
        elif seq_lt(seg.seq, self.rcv_nxt):
            self._send_ack()  # a keepalive or window probe: answer with our window
        if not self.closed:
            self.push(now)

    def took(
        self, rcv_nxt: int, now: float, acked: int | None = None, field: int = 0, edge: int = 0
    ) -> None:
        """The native TX path sent in-order guest data to the host socket up
        to ``rcv_nxt`` (it takes only plain segments that acknowledge nothing
        new, while ESTABLISHED): acknowledge it, unless the native ACKs did
        (``acked``: up to where, ``field``: their last window field, ``edge``:
        the right edge they advertised)."""
        if acked is not None and self.state is State.ESTABLISHED:
            self.wnd_sent = field << self.ws_to_guest
            if seq_lt(self.rcv_edge, edge):
                self.rcv_edge = edge
        if rcv_nxt == self.rcv_nxt or self.state is not State.ESTABLISHED:
            return
        n = seq_diff(rcv_nxt, self.rcv_nxt)
        if n <= 0:
            return
        self.rcv_nxt = rcv_nxt
        self.bytes_from_guest += n
        self.last_guest = self.last_activity = self.keepalive_at = now
        self.ack_due = acked != rcv_nxt
        if self.reasm:
            self._deliver_held()

    @property
    def native_ack(self) -> bool:
        """The native TX path may acknowledge what it takes: nothing is held
        past a gap, no FIN came, and the window is open (Python's own ACK
        follows a zero window up)."""
        return (
            self.state is State.ESTABLISHED
            and not self.reasm
            and not self.guest_fin
            and not self.ack_due
            and self.wnd_sent > 0
        )

    def ack_taken(self, now: float) -> None:
        """The native paths left the connection to Python: acknowledge what
        ``took`` brought in, now rather than on the flow's timer (one ACK per
        native batch, without a task switch), and send what the native push
        could not (the end of the stream, a full outbox)."""
        self.now = now
        if self.ack_due and not self.closed:
            self._send_ack()
        if not self.closed:
            self.push(now)

    @property
    def native_push(self) -> bool:
        """The native TX path may take the guest's pure ACKs and send more
        of the host's stream: nothing is being sent again (``snd_nxt`` is
        ``snd_max``), no FIN is due, the guest's window is open and ours too
        (or closed for good by the guest's FIN), no probe runs."""
        return (
            self.state in WE_MAY_SEND
            and self.fin_seq is None
            and self.snd_nxt == self.snd_max
            and not self.probe
            and self.recover is None
            and not self.ack_due
            and (self.wnd_sent > 0 or self.guest_fin)
            and self.snd_wnd > 0
        )

    def acked_natively(self, snd_una: int, snd_nxt: int, field: int, now: float) -> None:
        """The native TX path took the guest's ACKs up to ``snd_una`` (the
        last with window field ``field``) and sent the stream up to
        ``snd_nxt`` since Python last had the connection: as ``_ack`` and
        ``push`` would have left it.  The retransmission timer restarts on
        progress, late by at most the time since the ACK (RFC 6298 §5.3)."""
        if self.state not in WE_MAY_SEND:
            return
        progress = seq_lt(self.snd_una, snd_una)
        if progress:
            self.snd_una = snd_una
            self.scoreboard.update((), snd_una, self.snd_max)
            self.retries = 0
            self.dupacks = 0
            self.probe = False
        if seq_lt(self.snd_nxt, snd_nxt):
            self.snd_nxt = snd_nxt
        if seq_lt(self.snd_max, self.snd_nxt):
            self.bytes_to_guest += seq_diff(self.snd_nxt, self.snd_max)
            self.snd_max = self.snd_nxt
        self.window_field = field
        self.snd_wnd = field << self.ws_from_guest
        self.max_snd_wnd = max(self.max_snd_wnd, self.snd_wnd)
        if self.snd_nxt == self.snd_una:
            self.rto_at = None
        elif progress or self.rto_at is None:
            self.rto_at = now + self._rto()
        self.last_guest = self.last_activity = self.keepalive_at = now

    def _guest_rst(self, seg: Segment) -> None:
        """Accepted when in the receive window (RFC 9293 §3.10.7.4); in
        SYN_SENT when it acknowledges our SYN."""
        if self.state is State.SYN_SENT:
            ok = bool(seg.flags & ACK) and seg.ack == self.snd_nxt
        else:
            off = seq_diff(seg.seq, self.rcv_nxt)
            ok = 0 <= off <= max(self.wnd_sent, 1)
        if ok:
            self.reset_reason = "guest_rst"
            self._event(Event.RESET)
            self.host.abort()

    def _syn_ack(self, seg: Segment, now: float) -> None:
        want = SYN | ACK
        if seg.flags & want != want:
            return
        if seg.ack != self.snd_nxt:
            self.wire.segment(RST, seg.ack, 0, 0, b"", b"")
            return
        self.irs = seg.seq
        self.rcv_nxt = self.rcv_edge = (seg.seq + 1) & MASK
        self._take_syn_options(seg, offered=True)
        self.snd_una = seg.ack
        self.rto_at = None
        self.retries = 0
        self._event(Event.SYN_ACKED)
        self._send_ack()
        self.push(now)

    def _ack(self, seg: Segment, now: float) -> None:
        ack = seg.ack
        if seq_lt(self.snd_max, ack):
            self.ack_due = True  # acknowledges what we never sent
            return
        if seq_lt(ack, self.snd_una):
            return  # older than what we know
        sacked = 0
        if self.sack and (seg.sack or self.scoreboard):
            sacked = self.scoreboard.sacked(ack)
            self.scoreboard.update(seg.sack, ack, self.snd_max)
            sacked = self.scoreboard.sacked(ack) - sacked  # newly SACKed bytes
        window = seg.window << self.ws_from_guest
        self.window_field = seg.window
        self.max_snd_wnd = max(self.max_snd_wnd, window)
        if seq_lt(self.snd_una, ack):
            acked = seq_diff(ack, self.snd_una)
            fin_acked = self.fin_seq is not None and ack == ((self.fin_seq + 1) & MASK)
            self.host.consume(acked - fin_acked)
            self.snd_una = ack
            if seq_lt(self.snd_nxt, ack):
                self.snd_nxt = ack
            self.retries = 0
            self.dupacks = 0
            self.probe = False
            self.rto_at = now + self._rto() if self.snd_nxt != self.snd_una else None
            if self.recover is not None:
                if seq_le(self.recover, ack):
                    self.recover = None  # all that was out when it began is in
                    self.scoreboard.clear()
                elif seq_lt(self.rexmit_next, ack):
                    self.rexmit_next = ack
            if fin_acked:
                self._event(Event.FIN_ACKED)
        elif (
            ack == self.snd_una
            and not seg.payload
            and not seg.flags & FIN
            and (window == self.snd_wnd or sacked > 0)
            and self.snd_max != self.snd_una
        ):
            self._dup_ack()
        self.snd_wnd = window
        if window:
            self.probe = False
        elif self.probe:
            # the guest answers our probes: keep probing, never give up on it
            self.retries = min(self.retries, MAX_RETRIES - 1)

    def _dup_ack(self) -> None:
        """A duplicate ACK (RFC 5681 §2; with SACK, one that SACKs more,
        RFC 6675 §2): with SACK blocks, a recovery starts at the third or
        once three segments' worth is SACKed; without, the third rewinds."""
        self.dupacks += 1
        if self.recover is not None:
            return
        if self.scoreboard and (
            self.dupacks >= DUP_ACKS or self.scoreboard.sacked(self.snd_una) >= DUP_ACKS * self.mss
        ):
            self.fast_retransmits += 1
            self.recover = self.snd_max
            self.rexmit_next = self.snd_una
        elif self.dupacks == DUP_ACKS:
            self.fast_retransmits += 1
            self._rewind()

    def _data(self, seg: Segment, now: float) -> None:
        if self.state not in GUEST_MAY_SEND:
            if seg.flags & FIN or seg.payload:
                self._send_ack()  # a retransmission after its FIN: acknowledge again
            return
        offset = seq_diff(self.rcv_nxt, seg.seq)
        if offset < 0:
            # a gap: held for when it fills (its FIN comes again), and a
            # duplicate ACK so the guest retransmits what is missing
            if seg.payload:
                self.reasm.add(
                    seg.seq, seg.payload, self.rcv_nxt, seq_diff(self.rcv_edge, self.rcv_nxt)
                )
            self._send_dup_ack()
            return
        data = seg.payload[offset:] if offset else seg.payload
        if data:
            if not self._to_host(data) or (self.reasm and not self._deliver_held()):
                self._send_ack()
                return  # a FIN comes again with what the socket did not take
        elif seg.payload:
            self._send_ack()  # all of it seen already
        if seg.flags & FIN:
            fin_at = (seg.seq + len(seg.payload)) & MASK
            if fin_at == self.rcv_nxt and not self.guest_fin:
                self.guest_fin = True
                self.rcv_nxt = (self.rcv_nxt + 1) & MASK
                self.host.shutdown_write()
                self._event(Event.GUEST_FIN)
                self._send_ack()
            elif self.guest_fin:
                self._send_ack()

    # ---- host → guest -------------------------------------------------------------

    def _has_more(self) -> bool:
        return self.fin_seq is None or seq_le(self.snd_nxt, self.fin_seq)

    def push(self, now: float) -> None:
        """Send what the host socket holds, within the guest's window, the MSS
        and the wire's room; the FIN once the host said EOF."""
        self.now = now
        room = self.wire.room()
        if self.recover is not None:
            room = self._resend_holes(room)
        if self.state not in WE_MAY_SEND and not (
            self.fin_seq is not None and seq_le(self.snd_nxt, self.fin_seq)
        ):
            return
        window = self.snd_wnd if not self.probe else max(self.snd_wnd, 1)
        sent = False
        while True:
            inflight = seq_diff(self.snd_nxt, self.snd_una)
            if self.fin_seq is not None and self.snd_nxt == self.fin_seq:
                if room <= 0:
                    self.blocked_at = now
                    break
                self._send_fin()
                sent = True
                break
            usable = window - inflight
            if self.fin_seq is not None and seq_lt(self.fin_seq, self.snd_nxt):
                break
            if usable <= 0:
                if not self.snd_wnd and self.rto_at is None:
                    self.rto_at = now + self._rto()  # the persist timer
                break
            if room <= 0:
                self.blocked_at = now
                break
            want = min(usable, room * self.seg)
            if self.fin_seq is not None:
                want = min(want, seq_diff(self.fin_seq, self.snd_nxt))
            have = self.host.available(inflight)
            if have == 0:
                break
            if have < 0:
                self.fin_seq = self.snd_nxt  # end of stream: everything before was sent
                continue
            if want < have and inflight > 0 and want < min(self.mss, self.max_snd_wnd // 2):
                break  # RFC 1122 §4.2.3.4: no small segment while an ACK is due to open more
            room -= self._send_data(min(have, want))
            sent = True
        if sent and self.rto_at is None:
            self.rto_at = now + self._rto()

    def _data_at(self, seq: int, size: int) -> int:
        """``size`` bytes of the stream from ``seq`` in frames of at most
        ``seg`` bytes (they carry our ACK); how many frames."""
        seg = self.seg
        self.wire.data(ACK | PSH, seq, self.rcv_nxt, self._window(), size, seg, self.mss)
        self.ack_due = False
        return -(-size // seg)

    def _send_data(self, size: int) -> int:
        """``size`` bytes from ``snd_nxt``; how many segments."""
        n = self._data_at(self.snd_nxt, size)
        self.snd_nxt = (self.snd_nxt + size) & MASK
        if seq_lt(self.snd_max, self.snd_nxt):
            self.bytes_to_guest += seq_diff(self.snd_nxt, self.snd_max)
            self.snd_max = self.snd_nxt
        return n

    def _resend_holes(self, room: int) -> int:
        """SACK recovery: the holes not yet resent, within the wire's ``room``
        (segments); what room is left."""
        start = self.rexmit_next if seq_lt(self.snd_una, self.rexmit_next) else self.snd_una
        for seq, size in self.scoreboard.holes(start, self.snd_una):
            if room <= 0:
                self.blocked_at = self.now
                break
            size = min(size, room * self.seg)
            room -= self._data_at(seq, size)
            self.rexmit_next = (seq + size) & MASK
            self.sack_resent += size
        return room

    def _send_fin(self) -> None:
        first = self.state in WE_MAY_SEND
        self.wire.segment(FIN | ACK, self.snd_nxt, self.rcv_nxt, self._window(), b"", b"")
        self.snd_nxt = (self.snd_nxt + 1) & MASK
        if seq_lt(self.snd_max, self.snd_nxt):
            self.snd_max = self.snd_nxt
        self.ack_due = False
        if first:
            self._event(Event.FIN_SENT)

    def _rewind(self) -> None:
        """Go back to what the guest acknowledged: the next push re-reads it."""
        self.snd_nxt = self.snd_una
        self.retransmits += 1

    # ---- guest → host, and the host socket's readiness -----------------------------

    def _to_host(self, data: bytes) -> bool:
        """In-order guest data to the host socket.  What it does not take was
        within the window we advertised (the socket's memory is not all
        payload), so it is held rather than sent again by the guest with all
        behind it, and acknowledged once taken.  False when the socket is full."""
        taken = self.host.send(data)
        self.rcv_nxt = (self.rcv_nxt + taken) & MASK
        self.bytes_from_guest += taken
        self.ack_due = True
        if taken < len(data):
            self.reasm.put_back(self.rcv_nxt, data[taken:])
            self.want_write = True
            return False
        return True

    def _deliver_held(self) -> bool:
        """Send the held data the stream has reached to the host socket;
        False when the socket filled up (the rest stays held)."""
        while (data := self.reasm.take(self.rcv_nxt)) is not None:
            if not self._to_host(data):
                return False
        return True

    def on_writable(self, now: float) -> None:
        """The host socket takes data again: tell the guest (window update)."""
        self.now = now
        self.want_write = False
        if self.reasm and self.state in GUEST_MAY_SEND and self._deliver_held():
            self._send_ack()
        if self.state in GUEST_MAY_SEND:
            before = self.wnd_sent
            if self._window() << self.ws_to_guest > before:
                self._send_ack()

    def on_readable(self, now: float) -> None:
        self.last_activity = now
        self.push(now)

    # ---- time ---------------------------------------------------------------------

    def _rto(self) -> float:
        return min(RTO_INIT * (1 << self.retries), RTO_MAX)

    def next_deadline(self) -> float:
        if self.closed:
            return float("-inf")
        if self.ack_due:
            return float("-inf")
        at = self.last_activity + IDLE_TIMEOUT
        if self.state in SYNCHRONIZED:
            at = min(at, self.keepalive_at + KEEPALIVE_INTERVAL)
        if self.rto_at is not None:
            at = min(at, self.rto_at)
        if self.blocked_at is not None:
            at = min(at, self.blocked_at + BLOCKED_RETRY)
        if self.window_retry_at is not None:
            at = min(at, self.window_retry_at)
        return at

    def on_timer(self, now: float) -> None:
        self.now = now
        if self.ack_due:
            self._send_ack()
        if self.blocked_at is not None and now >= self.blocked_at + BLOCKED_RETRY:
            self.blocked_at = None
            self.push(now)
        if self.window_retry_at is not None and now >= self.window_retry_at:
            self.window_retry_at = None
            self.on_writable(now)  # sends the window once it opened, else looks again later
        if self.rto_at is not None and now >= self.rto_at:
            self._timeout(now)
        if self.closed:
            return
        if now >= self.last_activity + IDLE_TIMEOUT:
            self.reset("idle")
            return
        if self.state in SYNCHRONIZED and now >= self.keepalive_at + KEEPALIVE_INTERVAL:
            self.keepalive_at = now
            if self.snd_una == self.snd_max:
                # an old sequence number: a live guest answers with an ACK
                seq = (self.snd_nxt - 1) & MASK
                self.wire.segment(ACK, seq, self.rcv_nxt, self._window(), b"", b"")

    def _timeout(self, now: float) -> None:
        if self.retries >= MAX_RETRIES:
            self.reset("retransmit_timeout")
            return
        self.retries += 1
        self.rto_at = now + self._rto()
        if self.state in (State.SYN_SENT, State.SYN_RCVD):
            self._retransmit_syn(now)
            return
        self.probe = self.snd_wnd == 0  # zero window: probe with one byte
        self.recover = None  # the guest may have dropped what it SACKed (RFC 2018 §8)
        self.scoreboard.clear()
        if self.snd_una != self.snd_max:
            self._rewind()
        self.push(now)
        if self.snd_una == self.snd_max:
            self.rto_at = None  # nothing to send after all
            self.probe = False

    def _retransmit_syn(self, now: float) -> None:
        """Our SYN (inbound) or SYN-ACK again; the running timer stays."""
        self.retransmits += 1
        rto_at = self.rto_at
        self._send_syn(now)
        if rto_at is not None:
            self.rto_at = rto_at

    # ---- resets ---------------------------------------------------------------------

    def reset(self, reason: str, *, abort_host: bool = True) -> None:
        """Reset: RST to the guest, and (``abort_host``) one to the host peer.
        Without ``abort_host``: the host side failed already."""
        if self.closed:
            return
        self.reset_reason = reason
        self.wire.segment(RST | ACK, self.snd_nxt, self.rcv_nxt, 0, b"", b"")
        self._event(Event.RESET)
        if abort_host:
            self.host.abort()
