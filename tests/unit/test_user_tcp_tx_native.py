"""The guest's TCP data to the host in C (``tn_user_tx`` → ``tn_tcp_tx_join``
→ ``tn_tcp_run_flush``), for IPv4 and IPv6: a TX batch's in-order segments
of a connection Python handed over go to its socket with one ``sendmsg``.
``tn_tcp_tx_join`` parses the header bytes ``tn_user_tx`` copied out of the
chain, so that copy must reach an IPv6 frame's TCP header.

The test plays the guest driver (tests/fakes/userrig.py: rings in a memfd)
and the host peer (a socket on loopback); frames are built with scapy.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from tests.fakes.tcpnative import loopback_pair, new_tcpc
from tests.fakes.userrig import GUEST4, GUEST6, GUEST_MAC, OUR_MAC, PEER4, PEER6, Rig
from trionet.backends.user.fastpath import Outbox
from trionet.native import ffi, lib

GPORT, PPORT = 40000, 80
RCV_NXT, SND_UNA, WINDOW = 5000, 9000, 1000  # the guest's next byte, ours, its window field


def segment(v6: bool, seq: int, payload: bytes) -> bytes:
    ip = IPv6(src=GUEST6, dst=PEER6) if v6 else IP(src=GUEST4, dst=PEER4)
    tcp = TCP(sport=GPORT, dport=PPORT, seq=seq, ack=SND_UNA, flags="PA", window=WINDOW)
    return bytes(Ether(src=GUEST_MAC, dst=OUR_MAC) / ip / tcp / Raw(payload))


@contextmanager
def handed_over(v6: bool) -> Iterator[tuple[Rig, Any, socket.socket]]:
    """A connection Python handed to C (data allowed): the rig, its table and
    the host's end of the connection."""
    rig = Rig(pairs=1)
    table = lib.tn_ttable_new()
    box = Outbox(256)
    lib.tn_ttable_set_out(table, 0, box.cdata)
    rig.fast.table.tcp = table
    host, ours = loopback_pair(v6)
    guest, peer = (GUEST6, PEER6) if v6 else (GUEST4, PEER4)
    native = new_tcpc(ours, (GUEST_MAC, OUR_MAC), (peer, guest), (PPORT, GPORT), SND_UNA)
    try:
        ga, pa = (ipaddress.ip_address(a).packed for a in (guest, peer))
        assert lib.tn_ttable_add(table, native, v6, ga, pa, GPORT, PPORT) == 0
        st = ffi.new("struct tn_tcpc_state *")
        st.rcv_nxt, st.snd_una, st.snd_nxt, st.rcv_edge = RCV_NXT, SND_UNA, SND_UNA, RCV_NXT + 65535
        st.mss, st.max_snd_wnd, st.window_field, st.our_field = 1400, 65535, WINDOW, 65535
        st.data, st.ack, st.push, st.pair = 1, 0, 0, 0
        lib.tn_tcpc_resume(native, st)
        yield rig, table, host
    finally:
        lib.tn_ttable_del(table, native)
        lib.tn_tcpc_close(native)
        ours.close()
        host.close()
        rig.fast.table.tcp = ffi.NULL
        rig.close()
        box.close()
        lib.tn_ttable_free(table)


def received(host: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        got += host.recv(65536)
    return got


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_a_batch_of_guest_segments_goes_out_with_one_sendmsg(v6: bool) -> None:
    with handed_over(v6) as (rig, table, host):
        payloads = [bytes([65 + i]) * 1000 for i in range(5)]
        for i, p in enumerate(payloads):
            rig.send(0, segment(v6, RCV_NXT + 1000 * i, p))
        assert rig.tx() == 5
        assert lib.tn_ttable_fast_frames(table) == 5  # every one in C, none to Python
        assert lib.tn_ttable_fast_sends(table) == 1
        assert received(host, 5000) == b"".join(payloads)


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_a_guests_gso_frames_go_the_same_way(v6: bool) -> None:
    """A TSO guest (HOST_TSO4/6) sends segments of many MSS at once, their
    checksums partial: C takes them as any segment, whole."""
    with handed_over(v6) as (rig, table, host):
        payloads = [bytes([97 + i]) * 30_000 for i in range(2)]
        gso = 4 if v6 else 1  # VIRTIO_NET_HDR_GSO_TCPV6 / TCPV4
        for i, p in enumerate(payloads):
            frame = segment(v6, RCV_NXT + 30_000 * i, p)
            rig.send(0, frame, flags=1, gso=gso, segments=8)  # NEEDS_CSUM
        assert rig.tx() == 2
        assert lib.tn_ttable_fast_frames(table) == 2
        assert lib.tn_ttable_fast_sends(table) == 1
        assert received(host, 60_000) == b"".join(payloads)
