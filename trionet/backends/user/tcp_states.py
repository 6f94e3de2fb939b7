"""The TCP connection's states, the table of transitions between them, and
what a connection is given to work on: the host socket (``Host``) and the
way to the guest (``Wire``).  The connection itself is ``tcp_conn.TcpConn``."""

from __future__ import annotations

import enum
from typing import Protocol

# ---- states --------------------------------------------------------------------------


class State(enum.Enum):
    CONNECTING = "connecting"  # guest SYN seen, host connect() in progress
    SYN_RCVD = "syn_rcvd"  # SYN-ACK sent to the guest
    SYN_SENT = "syn_sent"  # inbound: SYN sent to the guest
    ESTABLISHED = "established"
    CLOSE_WAIT = "close_wait"  # the guest sent FIN; host data still flows
    FIN_WAIT_1 = "fin_wait_1"  # our FIN sent (host EOF), not acknowledged
    FIN_WAIT_2 = "fin_wait_2"  # our FIN acknowledged; guest data still flows
    CLOSING = "closing"  # both FINs, ours not acknowledged
    LAST_ACK = "last_ack"  # guest FIN first, then ours, not acknowledged
    CLOSED = "closed"


class Event(enum.Enum):
    CONNECTED = "connected"  # host connect() done, SYN-ACK sent
    SYN_ACKED = "syn_acked"  # the guest acknowledged our SYN
    GUEST_FIN = "guest_fin"
    FIN_SENT = "fin_sent"  # host EOF, FIN sent to the guest
    FIN_ACKED = "fin_acked"
    RESET = "reset"  # either side, or a timeout


S, E = State, Event
# Everything that moves the state lives here.  RESET leads to CLOSED from anywhere.
TRANSITIONS: dict[tuple[State, Event], State] = {
    (S.CONNECTING, E.CONNECTED): S.SYN_RCVD,
    (S.SYN_RCVD, E.SYN_ACKED): S.ESTABLISHED,
    (S.SYN_SENT, E.SYN_ACKED): S.ESTABLISHED,
    (S.ESTABLISHED, E.GUEST_FIN): S.CLOSE_WAIT,
    (S.ESTABLISHED, E.FIN_SENT): S.FIN_WAIT_1,
    (S.CLOSE_WAIT, E.FIN_SENT): S.LAST_ACK,
    (S.FIN_WAIT_1, E.GUEST_FIN): S.CLOSING,
    (S.FIN_WAIT_1, E.FIN_ACKED): S.FIN_WAIT_2,
    (S.FIN_WAIT_2, E.GUEST_FIN): S.CLOSED,
    (S.CLOSING, E.FIN_ACKED): S.CLOSED,
    (S.LAST_ACK, E.FIN_ACKED): S.CLOSED,
}
SYNCHRONIZED = frozenset(
    {S.ESTABLISHED, S.CLOSE_WAIT, S.FIN_WAIT_1, S.FIN_WAIT_2, S.CLOSING, S.LAST_ACK}
)
GUEST_MAY_SEND = frozenset({S.ESTABLISHED, S.FIN_WAIT_1, S.FIN_WAIT_2})
WE_MAY_SEND = frozenset({S.ESTABLISHED, S.CLOSE_WAIT})


class TransitionError(Exception):
    """An event the state machine has no transition for (a bug)."""


# ---- what the connection is given -----------------------------------------------------


class Host(Protocol):
    """The host socket, as the connection uses it.  Methods may raise
    ``OSError`` (the host peer reset the connection)."""

    def available(self, offset: int) -> int:
        """Bytes in the receive queue beyond ``offset``; 0 when none is there
        yet, -1 when none is and the peer closed (end of stream)."""

    def consume(self, n: int) -> None:
        """Drop ``n`` bytes from the head of the receive queue."""

    def send(self, data: bytes) -> int:
        """Queue ``data``; how many bytes were taken (0 when full)."""

    def space(self) -> int:
        """Bytes a send would take now."""

    def queued(self) -> int:
        """Bytes waiting in the send queue (as of the last ``space``)."""

    def capacity(self) -> int:
        """Bytes the send queue holds when empty (as of the last ``space``)."""

    def shutdown_write(self) -> None: ...

    def abort(self) -> None:
        """Close with a reset towards the host peer."""


class Wire(Protocol):
    """Segments towards the guest."""

    def room(self) -> int:
        """Segments the guest side takes now."""

    def segment(
        self, flags: int, seq: int, ack: int, window: int, payload: bytes, options: bytes
    ) -> None: ...

    def data(
        self, flags: int, seq: int, ack: int, window: int, length: int, seg: int, mss: int
    ) -> None:
        """Frames of at most ``seg`` bytes carrying ``length`` bytes of the
        host stream from ``seq`` (taken from the host socket's receive queue,
        at ``seq - snd_una``); ``flags`` on the last, without PSH on the others.
        A frame longer than ``mss`` goes as one GSO frame of ``mss``-byte
        segments."""
