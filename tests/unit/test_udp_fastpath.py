"""The user stack's native UDP fast path (``tn_user_tx`` / ``tn_user_rx``).

The test plays the guest driver (``tests.fakes.userrig``: rings in a memfd, as
in test_virtq) and the host side (a "server" socket bound on loopback; each
flow's socket is connected to it).  Frames are built and checked with scapy.
"""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Packet, Padding, Raw
from scapy.utils import checksum

from tests.fakes.userrig import (
    DATA_VALID,
    GUEST4,
    GUEST6,
    GUEST_MAC,
    HDR,
    NEEDS_CSUM,
    OUR_MAC,
    PEER4,
    PEER6,
    Flow,
    Rig,
    readable,
    template,
    vnet_hdr,
)
from trionet.backends.user.fastpath import FlowExists, UdpFastPath
from trionet.native import lib

SOL_IP, IP_RECVERR = 0, 11
BIG_BUFFER = HDR + 62 + 65527  # holds any datagram: the recvmmsg path


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


def check_reply(frame: bytes, flow: Flow, payload: bytes) -> Packet:
    """The frame is the flow's reply carrying payload, with right checksums."""
    p = Ether(frame)
    assert p.src == OUR_MAC and p.dst == GUEST_MAC
    ipl = IPv6 if flow.v6 else IP
    assert p[ipl].src == flow.peer and p[ipl].dst == flow.guest
    assert (p[UDP].sport, p[UDP].dport) == (flow.pport, flow.gport)
    assert p[UDP].len == 8 + len(payload)
    assert bytes(p[UDP].payload)[: len(payload)] == payload
    if flow.v6:
        assert p[IPv6].plen == 8 + len(payload)
    else:
        assert p[IP].len == 28 + len(payload)
    again = p.copy()
    if not flow.v6:
        del again[IP].chksum
    del again[UDP].chksum
    again = Ether(bytes(again))
    if not flow.v6:
        assert p[IP].chksum == again[IP].chksum
    assert p[UDP].chksum == again[UDP].chksum != 0
    return p


# ---- guest TX -----------------------------------------------------------------


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
@pytest.mark.parametrize("flags", [0, NEEDS_CSUM], ids=["csum", "needs_csum"])
@pytest.mark.parametrize("segments", [1, 3, 0], ids=["one", "three", "bytewise"])
def test_tx_datagram_reaches_the_server(rig: Rig, v6: bool, flags: int, segments: int) -> None:
    flow = rig.flow(v6=v6)
    payload = bytes(range(61))  # odd length: checksum across odd segment boundaries
    udp = {"chksum": 0x4242} if flags else {}  # a partial checksum is not checked
    frame = flow.guest_frame(payload, **udp)
    rig.send(0, frame, flags, segments=segments or len(frame) + HDR)
    assert rig.tx() == 1
    assert flow.received() == [payload]
    assert [u.length for u in rig.txq[0][0].take_used()] == [0]
    assert rig.b.packets == 1 and rig.b.bytes == len(frame) and rig.b.ring_empty
    st_ = rig.fast.state(flow.slot)
    assert (st_.tx_packets, st_.tx_bytes, st_.spoke, st_.pair) == (1, len(payload), 1, 0)
    assert len(rig.slow) == 0


def test_tx_indirect_chain_and_legacy_header(rig: Rig) -> None:
    flow = rig.flow()
    frame = flow.guest_frame(b"indirect")
    rig.txq[0][0].add_tx(vnet_hdr(hdr_len=10) + frame, segments=4, indirect=True)
    assert rig.tx(hdr_len=10) == 1
    assert flow.received() == [b"indirect"]


def test_tx_trims_to_the_udp_length(rig: Rig) -> None:
    flow = rig.flow()
    padded = flow.guest_packet(b"hi") / Padding(b"\0" * 20)  # Ethernet padding
    rig.send(0, bytes(padded))
    short_udp = flow.guest_frame(b"abcdef", len=8 + 3, chksum=0)  # UDP says 3 bytes of 6
    rig.send(0, short_udp)
    assert rig.tx() == 2
    assert flow.received() == [b"hi", b"abc"]


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_tx_bad_udp_checksum_is_dropped(rig: Rig, v6: bool) -> None:
    flow = rig.flow(v6=v6)
    rig.send(0, flow.guest_frame(b"bad", chksum=0x1234))
    assert rig.tx() == 1
    assert flow.received() == []
    assert rig.b.drops_bad_frame == 1 and rig.b.packets == 0
    assert rig.fast.counters()["native_tx_bad_checksum"] == 1
    assert rig.fast.state(flow.slot).tx_packets == 0
    assert [u.length for u in rig.txq[0][0].take_used()] == [0]


def test_tx_bad_ipv4_header_checksum_is_dropped_even_with_needs_csum(rig: Rig) -> None:
    flow = rig.flow()
    frame = bytes(flow.guest_packet(b"x", ip={"chksum": 0x1111}))
    rig.send(0, frame, NEEDS_CSUM)
    assert rig.tx() == 1
    assert flow.received() == [] and rig.b.drops_bad_frame == 1


def test_tx_zero_checksum_means_none_only_in_ipv4(rig: Rig) -> None:
    f4, f6 = rig.flow(), rig.flow(v6=True)
    rig.send(0, f4.guest_frame(b"four", chksum=0))
    rig.send(0, f6.guest_frame(b"six", chksum=0))
    assert rig.tx() == 2
    assert f4.received() == [b"four"] and f6.received() == []
    assert rig.b.drops_bad_frame == 1


def test_tx_everything_else_goes_to_python(rig: Rig) -> None:
    flow = rig.flow()
    g = Ether(src=GUEST_MAC, dst=OUR_MAC)
    others = [
        bytes(Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc=GUEST4, pdst=PEER4)),
        bytes(g / IP(src=GUEST4, dst=PEER4) / ICMP() / Raw(b"ping")),
        bytes(g / IP(src=GUEST4, dst=PEER4) / UDP(sport=5000, dport=54) / Raw(b"unknown")),
        bytes(g / IP(src=GUEST4, dst=PEER4, flags="MF") / UDP(sport=5000, dport=53) / b"frag"),
        bytes(g / IP(src=GUEST4, dst=PEER4, ttl=0) / UDP(sport=5000, dport=53) / b"ttl"),
        bytes(
            g / IP(src=GUEST4, dst=PEER4, options=b"\x01\x01\x01\x00") / UDP(sport=5000, dport=53)
        ),
        bytes(g / Dot1Q(vlan=5) / IP(src=GUEST4, dst=PEER4) / UDP(sport=5000, dport=53) / b"v"),
        bytes(g / IP(src=GUEST4, dst=PEER4, len=200) / UDP(sport=5000, dport=53) / b"long"),
    ]
    for i, frame in enumerate(others):
        rig.send(1, frame, flags=i % 2)
    gso = flow.guest_frame(b"gso")  # a GSO frame is Python's to split
    rig.txq[1][0].add_tx(vnet_hdr(gso=3) + gso)
    assert rig.tx(pair=1) == len(others) + 1
    got = rig.slow.drain()
    assert [f.frame for f in got] == [*others, gso]
    assert [f.pair for f in got] == [1] * (len(others) + 1)
    assert [f.flags for f in got] == [i % 2 for i in range(len(others))] + [0]
    assert flow.received() == [] and len(rig.slow) == 0
    assert rig.b.packets == len(others) + 1
    assert rig.fast.counters()["native_tx_to_python"] == len(others) + 1


def test_tx_stops_when_slow_is_full() -> None:
    r = Rig(pairs=1, size=512)
    try:
        arp = bytes(Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc=GUEST4, pdst=PEER4))
        for _ in range(300):
            r.send(0, arp)
        assert r.tx(max_chains=512) == 256
        assert r.slow.full and not r.b.ring_empty
        assert r.txq[0][1].pending() == 44  # the chain that did not fit is still there
        assert len(r.slow.drain()) == 256 and not r.slow.full
        assert r.tx(max_chains=512) == 44
        assert len(r.slow.drain()) == 44 and r.b.ring_empty
        assert len(r.txq[0][0].take_used()) == 300
    finally:
        r.close()


def test_tx_many_datagrams_in_one_batch(rig: Rig) -> None:
    a, b = rig.flow(gport=5000), rig.flow(gport=5001)
    sent: dict[int, list[bytes]] = {a.slot: [], b.slot: []}
    for i in range(120):
        flow = a if i % 3 else b  # runs of one socket, broken by the other
        payload = f"datagram {i}".encode() * (i % 7 + 1)
        sent[flow.slot].append(payload)
        # indirect chains of up to 20 segments: more than 1024 iovecs in all
        rig.send(0, flow.guest_frame(payload), segments=1 + i % 20, indirect=True)
    assert rig.tx() == 120
    assert a.received() == sent[a.slot] and b.received() == sent[b.slot]
    assert rig.b.packets == 120 and rig.txq[0][0].used_idx() == 120


def test_tx_on_another_pair_moves_the_flow(rig: Rig) -> None:
    flow = rig.flow(pair=0)
    flow.reply(b"before")
    assert readable(rig.fast.epoll_fd(0)) and not readable(rig.fast.epoll_fd(1))
    rig.send(1, flow.guest_frame(b"hello from pair 1"))
    assert rig.tx(pair=1) == 1
    assert rig.fast.state(flow.slot).pair == 1
    flow.reply(b"after")
    assert not readable(rig.fast.epoll_fd(0)) and readable(rig.fast.epoll_fd(1))
    for q, _ in rig.rxq:
        q.add_rx(2048)
        q.add_rx(2048)
    assert rig.rx(pair=0) == 0 and rig.b.fd_blocked
    assert rig.rx(pair=1) == 2
    frames = rig.rx_frames(pair=1)
    check_reply(frames[0][0][HDR:], flow, b"before")
    check_reply(frames[1][0][HDR:], flow, b"after")


# ---- guest RX -----------------------------------------------------------------


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
@pytest.mark.parametrize("mrg", [True, False], ids=["mrg", "single"])
def test_rx_datagram_becomes_a_checksummed_frame(rig: Rig, v6: bool, mrg: bool) -> None:
    flow = rig.flow(v6=v6)
    rig.rxq[0][0].add_rx(2048, segments=7)  # odd-sized segments
    payload = bytes(range(251)) * 3
    flow.reply(payload)
    assert rig.rx(mrg=mrg) == 1
    [(data, used)] = rig.rx_frames()
    assert data[0] == 0 and int.from_bytes(data[10:12], "little") == 1
    assert used[0].length == HDR + (62 if v6 else 42) + len(payload)
    check_reply(data[HDR:], flow, payload)
    st_ = rig.fast.state(flow.slot)
    assert (st_.rx_packets, st_.rx_bytes, st_.spoke) == (1, len(payload), 2)
    assert rig.b.packets == 1 and rig.b.fd_blocked


def test_rx_ipv4_ids_advance(rig: Rig) -> None:
    flow = rig.flow()
    for _ in range(2):
        rig.rxq[0][0].add_rx(2048)
        flow.reply(b"id")
    assert rig.rx() == 2
    ids = [Ether(d[HDR:])[IP].id for d, _ in rig.rx_frames()]
    assert ids[1] == (ids[0] + 1) & 0xFFFF


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_rx_short_frame_is_padded_and_flagged_data_valid(rig: Rig, v6: bool) -> None:
    flow = rig.flow(v6=v6)
    rig.rxq[0][0].add_rx(2048)
    flow.reply(b"!")
    assert rig.rx(data_valid=True) == 1
    [(data, used)] = rig.rx_frames()
    assert data[0] == DATA_VALID
    frame = data[HDR:]
    want = max(60, (62 if v6 else 42) + 1)
    assert len(frame) == want and used[0].length == HDR + want
    check_reply(frame, flow, b"!")
    assert frame[(62 if v6 else 42) + 1 :] == bytes(want - (62 if v6 else 42) - 1)


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_rx_udp_checksum_zero_is_sent_as_ffff(rig: Rig, v6: bool) -> None:
    flow = rig.flow(v6=v6)
    # the payload word that makes the sum come out as zero
    probe = (
        Ether(src=OUR_MAC, dst=GUEST_MAC)
        / flow.ip(flow.peer, flow.guest)
        / UDP(sport=53, dport=5000)
        / Raw(b"\0\0")
    )
    payload = Ether(bytes(probe))[UDP].chksum.to_bytes(2, "big")
    rig.rxq[0][0].add_rx(2048)
    flow.reply(payload)
    assert rig.rx() == 1
    [(data, _)] = rig.rx_frames()
    assert Ether(data[HDR:])[UDP].chksum == 0xFFFF
    check_reply(data[HDR:], flow, payload)


def test_rx_mergeable_buffers_carry_a_large_datagram(rig: Rig) -> None:
    flow = rig.flow()
    for _ in range(8):
        rig.rxq[0][0].add_rx(256)
    payload = os.urandom(1000)  # 12 + 42 + 1000 = 1054 bytes: five 256-byte buffers
    flow.reply(payload)
    assert rig.rx(mrg=True) == 1
    [(data, used)] = rig.rx_frames()
    assert int.from_bytes(data[10:12], "little") == 5
    assert [u.length for u in used] == [256] * 4 + [1054 - 1024]
    check_reply(data[HDR:], flow, payload)
    assert rig.rxq[0][1].pending() == 3  # the rest stay available


def test_rx_full_ring_leaves_the_datagram_in_the_socket(rig: Rig) -> None:
    flow = rig.flow()
    flow.reply(b"wait for me " * 50)  # 600 bytes
    assert rig.rx() == 0 and rig.b.ring_full
    rig.rxq[0][0].add_rx(256)  # not enough room yet (mergeable)
    assert rig.rx() == 0 and rig.b.ring_full
    assert rig.rxq[0][1].pending() == 1 and rig.rxq[0][0].used_idx() == 0
    assert flow.sock.recv(1000, socket.MSG_PEEK) == b"wait for me " * 50
    rig.rxq[0][0].add_rx(256)
    rig.rxq[0][0].add_rx(256)
    assert rig.rx() == 1
    [(data, used)] = rig.rx_frames()
    assert len(used) == 3
    check_reply(data[HDR:], flow, b"wait for me " * 50)


def test_rx_datagram_larger_than_a_single_buffer_is_dropped(rig: Rig) -> None:
    flow = rig.flow()
    rig.rxq[0][0].add_rx(512)
    flow.reply(bytes(1000))
    flow.reply(b"fits")
    assert rig.rx(mrg=False) == 1
    assert rig.b.drops_bad_frame == 1 and rig.fast.counters()["native_rx_dropped"] == 1
    [(data, _)] = rig.rx_frames()
    check_reply(data[HDR:], flow, b"fits")


@pytest.mark.parametrize("big", [False, True], ids=["small_buffers", "recvmmsg"])
def test_rx_many_datagrams_in_one_batch(big: bool) -> None:
    r = Rig(pairs=1, size=128, ram=64 << 20)
    try:
        a, b = r.flow(gport=5000), r.flow(gport=5001, v6=False)
        for _ in range(100):
            r.rxq[0][0].add_rx(BIG_BUFFER if big else 1536)
        sent = {a.slot: [f"a{i}".encode() * 30 for i in range(40)]}
        sent[b.slot] = [f"b{i}".encode() * 3 for i in range(40)]
        for i in range(40):
            a.reply(sent[a.slot][i])
            b.reply(sent[b.slot][i])
        assert r.rx(mrg=not big) == 80
        assert r.b.packets == 80 and r.b.fd_blocked and not r.b.ring_full
        got: dict[int, list[bytes]] = {a.slot: [], b.slot: []}
        for data, used in r.rx_frames():
            assert len(used) == 1
            p = Ether(data[HDR:])
            flow = a if p[UDP].dport == a.gport else b
            payload = bytes(p[UDP].payload)[: p[UDP].len - 8]
            check_reply(data[HDR:], flow, payload)
            got[flow.slot].append(payload)
        assert got == sent
        assert r.rxq[0][1].pending() == 20
    finally:
        r.close()


def test_rx_datagram_larger_than_the_whole_ring_is_dropped() -> None:
    r = Rig(pairs=1, size=16)
    try:
        flow = r.flow()
        for _ in range(16):
            r.rxq[0][0].add_rx(256)
        flow.reply(bytes(5000))  # 16 mergeable buffers of 256 bytes can never hold it
        flow.reply(b"next")
        assert r.rx() == 1
        assert r.b.drops_no_buffer == 1 and r.fast.counters()["native_rx_dropped"] == 1
        [(data, _)] = r.rx_frames()
        check_reply(data[HDR:], flow, b"next")
    finally:
        r.close()


def test_rx_legacy_header_without_num_buffers(rig: Rig) -> None:
    flow = rig.flow()
    rig.rxq[0][0].add_rx(2048)
    flow.reply(b"legacy")
    assert rig.rx(mrg=False, hdr_len=10) == 1
    [u] = rig.rxq[0][0].take_used()
    data = rig.rxq[0][0].read_rx(u)
    check_reply(data[10:], flow, b"legacy")


def test_socket_error_asks_for_attention(rig: Rig) -> None:
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    flow = rig.flow(peer_sock=closed)
    closed.close()  # nobody listens there any more: ICMP port unreachable
    flow.sock.setsockopt(SOL_IP, IP_RECVERR, 1)
    rig.send(0, flow.guest_frame(b"anyone?"))
    assert rig.tx() == 1
    epfd = rig.fast.epoll_fd(0)
    assert select.select([epfd], [], [], 2)[0]
    rig.rxq[0][0].add_rx(2048)
    assert rig.rx() == 0
    assert rig.fast.attention() == [flow.slot] and rig.fast.state(flow.slot).err
    assert rig.fast.attention() == []
    assert rig.fast.counters()["native_socket_errors"] == 1
    # Python's part: read the error queue, clear err
    flow.sock.recvmsg(100, 512, socket.MSG_ERRQUEUE)
    rig.fast.flow(flow.slot).err = 0
    assert not readable(epfd)


# ---- the table ------------------------------------------------------------------


def test_table_add_find_remove(rig: Rig) -> None:
    flow = rig.flow()
    g, p = socket.inet_aton(GUEST4), socket.inet_aton(PEER4)
    assert rig.fast.find(False, g, p, 5000, 53) == flow.slot
    assert rig.fast.find(False, p, g, 53, 5000) is None
    assert rig.fast.find(True, g.ljust(16, b"\0"), p.ljust(16, b"\0"), 5000, 53) is None
    tmpl = template(False, PEER4, GUEST4, 53, 5000)
    fd = flow.sock.fileno()
    with pytest.raises(FlowExists):
        rig.fast.add(fd=fd, v6=False, pair=0, template=tmpl, gsrc=g, gdst=p, gsport=5000, gdport=53)
    with pytest.raises(ValueError):  # an IPv4 template for an IPv6 flow
        rig.fast.add(fd=fd, v6=True, pair=0, template=tmpl, gsrc=g, gdst=p, gsport=5000, gdport=53)
    assert len(rig.fast) == 1
    rig.fast.remove(flow.slot)
    assert rig.fast.find(False, g, p, 5000, 53) is None and len(rig.fast) == 0
    rig.send(0, flow.guest_frame(b"now unknown"))
    assert rig.tx() == 1 and len(rig.slow.drain()) == 1 and flow.received() == []
    flow.reply(b"nobody listens")
    assert not readable(rig.fast.epoll_fd(0))


def test_table_fills_and_survives_churn(rig: Rig) -> None:
    base = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    rig.socks.append(base)
    fds: list[int] = []
    g, p = socket.inet_aton(GUEST4), socket.inet_aton(PEER4)
    tmpl = template(False, PEER4, GUEST4, 53, 5000)

    def add(port: int) -> int:
        fd = os.dup(base.fileno())
        fds.append(fd)
        return rig.fast.add(
            fd=fd, v6=False, pair=port % 2, template=tmpl, gsrc=g, gdst=p, gsport=port, gdport=53
        )

    try:
        slots = {port: add(port) for port in range(1, 4097)}
        assert sorted(slots.values()) == list(range(4096))
        assert add(5000) == -1
        live = dict(slots)
        for k, port in enumerate(sorted(slots, key=lambda x: (x * 7919) % 4099)):
            rig.fast.remove(live.pop(port))
            if k % 256 == 0 or len(live) < 20:
                assert all(rig.fast.find(False, g, p, q, 53) == s for q, s in live.items())
                assert rig.fast.find(False, g, p, port, 53) is None
        assert len(rig.fast) == 0
        assert add(9) >= 0
    finally:
        for fd in fds:
            os.close(fd)


# ---- hostile frames ---------------------------------------------------------------


@contextmanager
def small_rig() -> Iterator[Rig]:
    r = Rig(pairs=1, size=64, ram=1 << 20)
    try:
        yield r
    finally:
        r.close()


def _far_ipv4(n: int) -> str:
    return f"192.168.{n >> 8}.{n & 0xFF}"


@st.composite
def hostile_frame(draw: st.DrawFn) -> bytes:
    """Junk, or UDP frames none of whose key fields match a registered flow,
    with up to three bytes changed (a key differs in four fields)."""
    hdr = vnet_hdr(draw(st.integers(0, 255)), draw(st.sampled_from([0, 0, 0, 1, 3, 4, 0x80])))
    if draw(st.booleans()):
        return draw(st.binary(max_size=160))
    v6 = draw(st.booleans())
    src, dst = draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 0xFFFF))
    ip: Packet
    if v6:
        ip = IPv6(src=f"fd99::{src:x}", dst=f"fd98::{dst:x}")
    else:
        ip = IP(src=_far_ipv4(src), dst=_far_ipv4(dst))
    udp = UDP(sport=draw(st.integers(6000, 0xFFFF)), dport=draw(st.integers(0, 52)))
    frame = bytearray(
        hdr
        + bytes(Ether(src=GUEST_MAC, dst=OUR_MAC) / ip / udp / Raw(draw(st.binary(max_size=80))))
    )
    for pos, val in draw(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=3)):
        if pos < len(frame):
            frame[pos] = val
    cut = draw(st.integers(0, len(frame)))
    return bytes(frame[: cut if draw(st.booleans()) else len(frame)])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(hostile_frame(), min_size=1, max_size=8), segments=st.integers(1, 5))
def test_hostile_frames_never_reach_a_socket(frames: list[bytes], segments: int) -> None:
    with small_rig() as r:
        flows = [r.flow(), r.flow(v6=True)]
        for frame in frames:
            r.txq[0][0].add_tx(frame, segments=segments)
        assert r.tx() == len(frames)
        assert [u.length for u in r.txq[0][0].take_used()] == [0] * len(frames)
        assert all(f.received() == [] for f in flows)
        assert all(r.fast.state(f.slot).tx_packets == 0 for f in flows)
        handed = [f.frame for f in r.slow.drain()]
        assert handed == [f[HDR:] for f in frames if len(f) >= HDR + 14]
        assert r.b.packets == len(handed)
        assert r.b.packets + r.b.drops_bad_frame == len(frames)


def _be16(b: bytes) -> int:
    return int.from_bytes(b, "big")


Key = tuple[int, bytes, bytes, int, int]  # ethertype, source, destination, ports


def model_tx(chain: bytes, keys: dict[Key, int]) -> tuple[str, bytes, int]:
    """What the fast path must do with one TX chain (the rules of userio.h):
    ("bad", b"", -1), ("slow", frame, -1), ("drop", b"", slot) or
    ("send", payload, slot)."""
    if len(chain) < HDR + 14:
        return "bad", b"", -1
    f = chain[HDR:]
    etype = _be16(f[12:14])
    if chain[1] != 0 or etype not in (0x0800, 0x86DD):
        return "slow", f, -1
    if etype == 0x0800:
        ip, l4 = f[14:34], 34
        if len(f) < 42 or ip[0] != 0x45 or ip[8] == 0 or ip[9] != 17:
            return "slow", f, -1
        total = _be16(ip[2:4])
        if _be16(ip[6:8]) & 0x3FFF or total < 28 or 14 + total > len(f):
            return "slow", f, -1
        room, src, dst = total - 20, ip[12:16], ip[16:20]
        pseudo = src + dst + b"\0\x11"
    else:
        ip, l4 = f[14:54], 54
        if len(f) < 62 or ip[0] >> 4 != 6 or ip[6] != 17 or ip[7] == 0:
            return "slow", f, -1
        room = _be16(ip[4:6])
        if room < 8 or 54 + room > len(f):
            return "slow", f, -1
        src, dst = ip[8:24], ip[24:40]
        pseudo = src + dst + b"\0\0\0\x11"
    udp = f[l4 : l4 + 8]
    ulen = _be16(udp[4:6])
    if ulen < 8 or ulen > room:
        return "slow", f, -1
    slot = keys.get((etype, src, dst, _be16(udp[0:2]), _be16(udp[2:4])))
    if slot is None:
        return "slow", f, -1
    if etype == 0x0800 and checksum(ip) != 0:
        return "drop", b"", slot
    if not chain[0] & NEEDS_CSUM:
        if _be16(udp[6:8]) == 0:
            if etype == 0x86DD:
                return "drop", b"", slot
        elif checksum(pseudo + ulen.to_bytes(2, "big") + f[l4 : l4 + ulen]) != 0:
            return "drop", b"", slot
    return "send", f[l4 + 8 : l4 + ulen], slot


@st.composite
def flow_frame(draw: st.DrawFn, v6: bool) -> bytes:
    """A frame of a registered flow (v4: 10.0.2.15:5000 -> 10.0.2.2:53), now
    and then with a wrong field, then up to three bytes changed anywhere."""
    flags = draw(st.sampled_from([0, 0, NEEDS_CSUM, DATA_VALID]))
    payload = draw(st.binary(max_size=64))
    udp: dict[str, Any] = {}
    ip: dict[str, Any] = {}
    if draw(st.integers(0, 3)) == 0:
        udp["chksum"] = draw(st.integers(0, 0xFFFF))
    if draw(st.integers(0, 3)) == 0:
        udp["len"] = draw(st.integers(0, 8 + len(payload) + 4))
    if draw(st.integers(0, 5)) == 0:
        ip["hlim" if v6 else "ttl"] = 0
    if not v6 and draw(st.integers(0, 5)) == 0:
        ip["flags"] = "MF"
    flow = Flow(0, v6, socket.socket(), socket.socket(), 5000, 53)  # only builds frames
    try:
        pkt = flow.guest_packet(payload, ip=ip, **udp)
    finally:
        flow.server.close()
        flow.sock.close()
    frame = bytearray(vnet_hdr(flags) + bytes(pkt))
    for pos, val in draw(st.lists(st.tuples(st.integers(0, 120), st.integers(0, 255)), max_size=3)):
        if pos < len(frame):
            frame[pos] = val
    return bytes(frame)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    frames=st.lists(st.one_of(flow_frame(False), flow_frame(True)), min_size=1, max_size=8),
    segments=st.integers(1, 6),
)
def test_tx_frames_of_registered_flows_follow_the_rules(frames: list[bytes], segments: int) -> None:
    with small_rig() as r:
        flows = {f.slot: f for f in (r.flow(), r.flow(v6=True))}
        keys: dict[Key, int] = {
            (0x0800, socket.inet_aton(GUEST4), socket.inet_aton(PEER4), 5000, 53): 0,
            (0x86DD, socket.inet_pton(socket.AF_INET6, GUEST6),
             socket.inet_pton(socket.AF_INET6, PEER6), 5000, 53): 1,
        }  # fmt: skip
        assert sorted(flows) == [0, 1]
        for frame in frames:
            r.txq[0][0].add_tx(frame, segments=segments)
        assert r.tx() == len(frames)
        want = [model_tx(frame, keys) for frame in frames]
        for slot, flow in flows.items():
            assert flow.received() == [d for k, d, s in want if k == "send" and s == slot]
        assert [f.frame for f in r.slow.drain()] == [d for k, d, _ in want if k == "slow"]
        dropped = sum(k in ("bad", "drop") for k, _, _ in want)
        assert r.b.drops_bad_frame == dropped
        assert r.b.packets == len(frames) - dropped
        assert r.fast.counters()["native_tx_bad_checksum"] == sum(k == "drop" for k, _, _ in want)


def test_unknown_pair_is_refused() -> None:
    fast = UdpFastPath()
    try:
        with pytest.raises(ValueError):
            fast.epoll_fd(16)
        assert lib.TN_UFLOW_PAIRS == 16
    finally:
        fast.close()
