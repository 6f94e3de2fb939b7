"""A pair's RX batch (``tn_user_rx``) takes UDP datagrams and TCP host-data
edges from one epoll set.  A UDP flow is level-triggered: a datagram left
behind when the batch stops (the RX ring full, or the batch's frame limit
reached) is reported again.  A TCP connection's socket is edge-triggered
(``tn_utable_tcp_watch``): an event the batch took but did not hand to
``tn_tcp_ready`` is never reported again, and the stream would stall.

The test plays the guest driver (tests/fakes/userrig.py: rings in a memfd)
and the host: a UDP flow with more datagrams waiting than the batch takes,
then host data on a watched TCP connection, so the UDP event comes first in
the same epoll round.
"""

from __future__ import annotations

import select
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.fakes.tcpnative import loopback_pair, new_tcpc
from tests.fakes.userrig import GUEST4, GUEST_MAC, OUR_MAC, PEER4, Rig
from trionet.backends.user.fastpath import Outbox
from trionet.native import ffi, lib

UNA = 1000  # the host stream's first unacknowledged byte, as the guest sees it
DATA = b"host data " * 100  # one segment below the MSS


@dataclass
class Conn:
    """A watched TCP connection: ``host`` the peer on loopback, ``ours`` the
    stack's socket behind ``native``."""

    host: socket.socket
    ours: socket.socket
    native: Any


@dataclass
class Mixed:
    rig: Rig
    table: Any  # struct tn_ttable *
    box: Outbox  # pair 0's outbox, where tn_tcp_ready queues segments
    conn: Conn

    def host_ready(self) -> int:
        return int(lib.tn_ttable_host_ready(self.table))


def _connection(rig: Rig) -> Conn:
    host, ours = loopback_pair()
    native = new_tcpc(ours, (GUEST_MAC, OUR_MAC), (PEER4, GUEST4), (80, 40000), UNA)
    st = ffi.new("struct tn_tcpc_state *")
    st.rcv_nxt, st.snd_una, st.snd_nxt, st.rcv_edge = 5000, UNA, UNA, 5000 + 65535
    st.mss, st.max_snd_wnd, st.window_field, st.our_field = 1460, 65535, 65535, 65535
    st.data, st.ack, st.push, st.pair, st.timer = 1, 1, 1, 0, 1
    lib.tn_tcpc_resume(native, st)  # C may push the host's data (Python's timer is on)
    return Conn(host, ours, native)


@pytest.fixture
def mixed() -> Iterator[Mixed]:
    rig = Rig()
    table = lib.tn_ttable_new()
    box = Outbox(256)  # above the room C keeps for Python's frames
    lib.tn_ttable_set_out(table, 0, box.cdata)
    rig.fast.table.tcp = table
    conn = _connection(rig)
    try:
        yield Mixed(rig, table, box, conn)
    finally:
        lib.tn_utable_tcp_unwatch(rig.fast.table, conn.native)
        lib.tn_tcpc_close(conn.native)
        conn.ours.close()
        conn.host.close()
        rig.fast.table.tcp = ffi.NULL
        rig.close()
        box.close()
        lib.tn_ttable_free(table)


@pytest.mark.parametrize("stop", ["ring_full", "frame_limit"])
def test_a_tcp_edge_in_a_batch_that_stops_early_is_handled(mixed: Mixed, stop: str) -> None:
    rig, conn = mixed.rig, mixed.conn
    flow = rig.flow()
    for i in range(6):
        flow.reply(b"datagram %d" % i)
    assert select.select([flow.sock], [], [], 5)[0]
    assert lib.tn_utable_tcp_watch(rig.fast.table, conn.native, 0) == 0
    conn.host.sendall(DATA)
    assert select.select([conn.ours], [], [], 5)[0]
    if stop == "ring_full":  # two buffers for six datagrams
        rig.rxq[0][0].add_rx(256)
        rig.rxq[0][0].add_rx(256)
        assert rig.rx() == 2
    else:  # room for all, but a batch of two
        for _ in range(8):
            rig.rxq[0][0].add_rx(256)
        vr = rig.rxq[0][1]
        rc = rig.fast.rx(
            vr.vq, rig.mem.table, mrg=True, hdr_len=12, data_valid=False, pair=0,
            scratch=rig.scratch, batch=rig.b, max_datagrams=2,
        )  # fmt: skip
        assert vr.check(rc) == 2
    # the edge was taken in that round: the host's data is queued for the guest
    assert mixed.host_ready() == 1
    assert len(mixed.box) == 1
    assert lib.tn_ttable_take(mixed.table, ffi.new("struct tn_tcpc *[]", 4), 4) == 0
    # the UDP flow's rest is reported again, and nothing reports the edge twice
    for _ in range(8):
        rig.rxq[0][0].add_rx(256)
    assert rig.rx() == 4
    assert mixed.host_ready() == 1
