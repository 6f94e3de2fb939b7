"""TCP translation in the user stack, segment by segment.

The test plays the guest's TCP with scapy-built segments fed straight to a
``UserStack`` (no rings) and reads what the stack puts in its outboxes; the
host side is a real TCP socket on 127.0.0.1 reached through the gateway.
Everything runs under the autojump clock, so retransmission timers and
keepalives take no real time.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
from dataclasses import dataclass
from typing import Any

import pytest
import trio
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from tests.fakes.userguest import GUEST4, GUEST6, GUEST_MAC, GW4, GW6, OUR_MAC, make_config
from trionet.backends.user import tcp_conn as T
from trionet.backends.user.config import Forward
from trionet.backends.user.stack import UserStack

G_MAC, O_MAC = GUEST_MAC.hex(":"), OUR_MAC.hex(":")
ISN = 1_000_000
GPORT = 40000


def seg(
    flags: str, seq: int, ack: int = 0, data: bytes = b"", *, dport: int, sport: int = GPORT,
    window: int = 65535, options: list[Any] | None = None,
) -> bytes:  # fmt: skip
    pkt = (
        Ether(src=G_MAC, dst=O_MAC)
        / IP(src=str(GUEST4), dst=str(GW4))
        / TCP(sport=sport, dport=dport, seq=seq, ack=ack, flags=flags, window=window,
              options=options or [])
    )  # fmt: skip
    if data:
        pkt = pkt / Raw(data)
    return bytes(pkt)


class Wire:
    """The guest's view of one pair's outbox."""

    def __init__(self, stack: UserStack) -> None:
        self.stack = stack

    def send(self, frame: bytes, pair: int = 0) -> None:
        self.stack.guest_frame(frame, pair)

    def pending(self, pair: int = 0) -> list[Ether]:
        box = self.stack.outboxes[pair]
        out = [Ether(f) for f in box.frames]
        box.frames.clear()
        return out

    async def next(self, pair: int = 0) -> Ether:
        """The next frame on ``pair``, waiting (time runs) until there is one."""
        box = self.stack.outboxes[pair]
        while not box.frames:
            box.clear_wake()
            if box.frames:
                break
            await trio.lowlevel.wait_readable(box.wake_fd)
        return Ether(box.frames.popleft())

    async def tcp(self, pair: int = 0) -> TCP:
        """The next TCP segment on ``pair`` (router advertisements skipped)."""
        while True:
            frame = await self.next(pair)
            if TCP in frame:
                segment: TCP = frame[TCP]
                return segment


@dataclass
class Conn:
    """A connection the test guest opened: its sequence numbers and the host end."""

    port: int
    server: trio.socket.SocketType
    seq: int  # the guest's next sequence number
    ack: int  # the next byte the guest expects
    synack: TCP

    def frame(self, flags: str, data: bytes = b"", **kw: Any) -> bytes:
        return seg(flags, self.seq, self.ack, data, dport=self.port, **kw)


async def connect(
    wire: Wire, listener: trio.socket.SocketType, *, mss: int = 1000, wscale: int | None = 7,
    window: int = 65535, sack: bool = True,
) -> Conn:  # fmt: skip
    port = listener.getsockname()[1]
    opts: list[Any] = [("MSS", mss), ("Timestamp", (1, 0))]
    if sack:
        opts.append(("SAckOK", b""))
    if wscale is not None:
        opts.append(("WScale", wscale))
    wire.send(seg("S", ISN, dport=port, window=window, options=opts))
    server, _ = await listener.accept()
    synack = await wire.tcp()
    assert synack.flags == "SA" and synack.ack == ISN + 1
    conn = Conn(port, server, ISN + 1, synack.seq + 1, synack)
    wire.send(conn.frame("A", window=window))
    return conn


async def recv_exactly(sock: trio.socket.SocketType, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = await sock.recv(n - len(out))
        assert chunk, "unexpected EOF"
        out += chunk
    return out


def data(t: TCP) -> bytes:
    """The segment's payload (Ethernet padding is not payload)."""
    return bytes(t[Raw].load) if Raw in t else b""


def whole(t: TCP) -> Ether:
    """The Ethernet frame a dissected segment came in."""
    ip = t.underlayer
    assert ip is not None
    frame = ip.underlayer
    assert isinstance(frame, Ether)
    return frame


def flow_state(stack: UserStack) -> str:
    [flow] = stack.tcp.flows.values()
    return flow.conn.state.value


# ---- handshake --------------------------------------------------------------------


async def test_syn_ack_offers_mss_wscale_and_sack_but_no_timestamps(
    autojump_clock: trio.abc.Clock, stack: UserStack, listener: trio.socket.SocketType
) -> None:
    wire = Wire(stack)
    conn = await connect(wire, listener, mss=1400, wscale=7)
    opts = dict(conn.synack.options)
    assert opts["MSS"] == 65520 - 40
    assert opts["WScale"] == T.OUR_WSCALE
    assert "SAckOK" in opts and "Timestamp" not in opts
    assert flow_state(stack) == "established"
    [flow] = stack.tcp.flows.values()
    assert flow.conn.mss == 1400 and flow.conn.ws_from_guest == 7
    conn.server.close()


@pytest.mark.parametrize("option", ["WScale", "SAckOK"])
async def test_an_option_the_guest_s_syn_lacks_is_not_offered(
    autojump_clock: trio.abc.Clock, stack: UserStack, listener: trio.socket.SocketType,
    option: str,
) -> None:  # fmt: skip
    wire = Wire(stack)
    if option == "WScale":
        conn = await connect(wire, listener, wscale=None)
    else:
        conn = await connect(wire, listener, sack=False)
    assert option not in dict(conn.synack.options)
    [flow] = stack.tcp.flows.values()
    assert (flow.conn.ws_to_guest, flow.conn.ws_from_guest, flow.conn.sack) == (
        (0, 0, True) if option == "WScale" else (T.OUR_WSCALE, 7, False)
    )
    conn.server.close()


async def test_mss_clamped_to_the_mtu(
    autojump_clock: trio.abc.Clock, listener: trio.socket.SocketType
) -> None:
    st = UserStack(make_config(guest_mac=GUEST_MAC, mtu=1500), 1)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(st.run)
            wire = Wire(st)
            conn = await connect(wire, listener, mss=9000)
            assert dict(conn.synack.options)["MSS"] == 1460
            await conn.server.send(b"z" * 5000)
            sizes: list[int] = []
            while sum(sizes) < 5000:
                sizes.append(len(data(await wire.tcp())))
            assert max(sizes) == 1460
            nursery.cancel_scope.cancel()
    finally:
        st.close()


async def test_connect_refused_resets_the_guest(
    autojump_clock: trio.abc.Clock, stack: UserStack
) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    dead = probe.getsockname()[1]
    probe.close()
    wire = Wire(stack)
    wire.send(seg("S", ISN, dport=dead, options=[("MSS", 1000)]))
    rst = await wire.tcp()
    assert rst.flags == "RA" and rst.ack == ISN + 1
    assert not stack.tcp.flows
    assert stack.tcp.counters()["connect_failed"] == 1


async def test_segment_for_no_connection_gets_a_reset(
    autojump_clock: trio.abc.Clock, stack: UserStack
) -> None:
    wire = Wire(stack)
    wire.send(seg("A", 5, 777, b"stray", dport=9))
    rst = await wire.tcp()
    assert rst.flags == "R" and rst.seq == 777


async def test_malformed_segments_are_dropped_not_raised(
    autojump_clock: trio.abc.Clock, stack: UserStack
) -> None:
    wire = Wire(stack)
    bad_opts = bytes(
        Ether(src=G_MAC, dst=O_MAC) / IP(src=str(GUEST4), dst=str(GW4))
        / TCP(sport=1, dport=2, flags="S", options=[("MSS", 1000)])
    )  # fmt: skip
    # truncate the MSS option's length byte to nonsense: parse must not fail
    frame = bytearray(bad_opts)
    frame[14 + 20 + 21] = 200
    del frame[14 + 20 + 20 + 4 :]
    wire.send(bytes(frame))  # checksum now wrong: counted, never raised
    wire.send(seg("SF", 1, dport=2))
    assert stack.drops["tcp_checksum"] + stack.drops["tcp_header"] >= 1
    assert stack.drops["tcp_flags"] == 1
    assert "internal_error" not in stack.drops


# ---- data ----------------------------------------------------------------------------


async def test_data_both_ways_and_acks(
    autojump_clock: trio.abc.Clock, stack: UserStack, listener: trio.socket.SocketType
) -> None:
    wire = Wire(stack)
    conn = await connect(wire, listener, mss=1000)
    wire.send(conn.frame("PA", b"hello host"))
    assert await recv_exactly(conn.server, 10) == b"hello host"
    ack = await wire.tcp()
    assert ack.ack == conn.seq + 10 and not data(ack)
    conn.seq += 10
    await conn.server.send(bytes(range(256)) * 10)  # 2560 bytes: 3 segments
    got = b""
    while len(got) < 2560:
        s = await wire.tcp()
        assert s.seq == conn.ack + len(got) and len(data(s)) <= 1000
        got += data(s)
    assert got == bytes(range(256)) * 10
    conn.ack += len(got)
    wire.send(conn.frame("A"))
    await trio.sleep(5)  # everything acknowledged: nothing is retransmitted
    assert not wire.pending()
    [flow] = stack.tcp.flows.values()
    assert flow.conn.snd_una == flow.conn.snd_nxt
    conn.server.close()


async def test_lost_segment_retransmitted_with_backoff(
    autojump_clock: trio.abc.Clock, stack: UserStack, listener: trio.socket.SocketType
) -> None:
    wire = Wire(stack)
    conn = await connect(wire, listener, mss=1000)
    await conn.server.send(b"a" * 1000)
    first = await wire.tcp()
    t0 = trio.current_time()
    again = await wire.tcp()  # never acknowledged: sent again after RTO_INIT
    t1 = trio.current_time()
    assert again.seq == first.seq and data(again) == b"a" * 1000
    assert t1 - t0 == pytest.approx(T.RTO_INIT, abs=0.05)
    third = await wire.tcp()
    assert third.seq == first.seq
    assert trio.current_time() - t1 == pytest.approx(2 * T.RTO_INIT, abs=0.05)
    conn.ack += 1000
    wire.send(conn.frame("A"))
    await trio.sleep(30)
    assert [f for f in wire.pending() if data(f[TCP])] == []
    assert stack.tcp.flows[next(iter(stack.tcp.flows))].conn.retransmits == 2
    conn.server.close()


async def test_gives_up_after_max_retries_with_a_reset(
    autojump_clock: trio.abc.Clock, stack: UserStack, listener: trio.socket.SocketType
) -> None:
    wire = Wire(stack)
    conn = await connect(wire, listener, mss=1000)
    await conn.server.send(b"x")
    while True:
        s = await wire.tcp()
        if "R" in s.flags:
            break
    assert not stack.tcp.flows
    await trio.sleep(0)
    with pytest.raises(ConnectionResetError):
        await conn.server.recv(10)


async def test_three_duplicate_acks_retransmit_at_once(
    autojump_clock: trio.abc.Clock, stack: UserStack, listener: trio.socket.SocketType
) -> None:
    wire = Wire(stack)
    conn = await connect(wire, listener, mss=1000)
    await conn.server.send(b"0" * 1000 + b"1" * 1000 + b"2" * 1000 + b"3" * 1000)
    sent = [await wire.tcp() for _ in range(4)]
    assert [s.seq - conn.ack for s in sent] == [0, 1000, 2000, 3000]
    conn.ack += 1000  # segment 1 lost: every later one makes a duplicate ACK
    t0 = trio.current_time()
    wire.send(conn.frame("A"))  # the ACK of segment 0
    for _ in range(3):
        wire.send(conn.frame("A"))
    again = await wire.tcp()
    assert trio.current_time() == t0  # no timer involved
    assert again.seq == sent[1].seq and data(again) == b"1" * 1000
    [flow] = stack.tcp.flows.values()
    assert flow.conn.fast_retransmits == 1
    conn.server.close()


async def test_guest_reordering_and_duplicates(
    autojump_clock: trio.abc.Clock, stack: UserStack, listener: trio.socket.SocketType
) -> None:
    wire = Wire(stack)
    conn = await connect(wire, listener)
    a, b = b"A" * 100, b"B" * 100
    wire.send(seg("PA", conn.seq + 100, conn.ack, b, dport=conn.port))  # ahead of a gap
    dup = await wire.tcp()
    assert dup.ack == conn.seq  # nothing taken
    wire.send(conn.frame("PA", a))  # fills the gap: what was held past it goes too
    assert (await wire.tcp()).ack == conn.seq + 200
    wire.send(conn.frame("PA", a))  # duplicate: acknowledged again, not delivered twice
    assert (await wire.tcp()).ack == conn.seq + 200
    wire.send(seg("PA", conn.seq + 50, conn.ack, a[:50] + b[:50], dport=conn.port))  # overlap
    wire.send(seg("PA", conn.seq + 100, conn.ack, b, dport=conn.port))
    assert await recv_exactly(conn.server, 200) == a + b
    with trio.move_on_after(1):
        extra = await conn.server.recv(100)
        raise AssertionError(f"delivered twice: {extra!r}")
    conn.server.close()


async def test_zero_window_from_the_guest_then_update(
    autojump_clock: trio.abc.Clock, stack: UserStack, listener: trio.socket.SocketType
) -> None:
    wire = Wire(stack)
    conn = await connect(wire, listener, mss=1000)
    wire.send(conn.frame("A", window=0))
    await conn.server.send(b"w" * 3000)
    probe = await wire.tcp()  # nothing until the persist timer: one byte
    assert len(data(probe)) == 1 and probe.seq == conn.ack
    wire.send(conn.frame("A", window=0))  # not taken
    probe2 = await wire.tcp()
    assert probe2.seq == conn.ack and len(data(probe2)) == 1
    wire.send(conn.frame("A", window=100))  # window update: 100 << 7 bytes
    got = b""
    while len(got) < 3000:
        s = await wire.tcp()
        got = got[: s.seq - conn.ack] + data(s)
    assert got == b"w" * 3000
    conn.server.close()


async def test_zero_window_to_the_guest_then_update(
    autojump_clock: trio.abc.Clock, stack: UserStack, listener: trio.socket.SocketType
) -> None:
    wire = Wire(stack)
    conn = await connect(wire, listener, mss=60000)
    conn.server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 17)
    chunk = b"q" * 60000
    window = None
    for _ in range(400):  # the host end does not read: its buffers fill
        wire.send(conn.frame("PA", chunk))
        acks = [await wire.tcp()] + [f[TCP] for f in wire.pending()]
        conn.seq = max(a.ack for a in acks)
        window = acks[-1].window
        if window == 0:
            break
    assert window == 0
    taken = conn.seq - ISN - 1
    await recv_exactly(conn.server, taken)  # the host reads everything
    update = await wire.tcp()
    assert update.window > 0 and update.ack == conn.seq
    conn.server.close()


# ---- close ----------------------------------------------------------------------------


async def test_guest_fin_half_close_then_host_fin(
    autojump_clock: trio.abc.Clock, stack: UserStack, listener: trio.socket.SocketType
) -> None:
    wire = Wire(stack)
    conn = await connect(wire, listener)
    wire.send(conn.frame("FA", b"bye"))
    conn.seq += 4
    assert await recv_exactly(conn.server, 3) == b"bye"
    assert await conn.server.recv(10) == b""  # the host sees EOF
    assert (await wire.tcp()).ack == conn.seq
    assert flow_state(stack) == "close_wait"
    await conn.server.send(b"still here")  # the other half still works
    more = await wire.tcp()
    assert data(more) == b"still here"
    conn.ack += 10
    wire.send(conn.frame("A"))
    conn.server.close()
    fin = await wire.tcp()
    assert "F" in fin.flags and fin.seq == conn.ack
    assert flow_state(stack) == "last_ack"
    conn.ack += 1
    wire.send(conn.frame("A"))
    await trio.sleep(0.1)
    assert not stack.tcp.flows
    assert stack.tcp.counters()["closed"] == 1


async def test_host_fin_first_then_guest_fin(
    autojump_clock: trio.abc.Clock, stack: UserStack, listener: trio.socket.SocketType
) -> None:
    wire = Wire(stack)
    conn = await connect(wire, listener)
    await conn.server.send(b"last words")
    conn.server.shutdown(socket.SHUT_WR)
    got = b""
    while True:
        s = await wire.tcp()
        got += data(s)
        if "F" in s.flags:
            break
    assert got == b"last words"
    conn.ack += 11
    wire.send(conn.frame("A"))
    await trio.sleep(0.1)
    assert flow_state(stack) == "fin_wait_2"
    wire.send(conn.frame("PA", b"reply"))  # half-close: the guest still sends
    assert await recv_exactly(conn.server, 5) == b"reply"
    conn.seq += 5
    wire.send(conn.frame("FA"))
    assert await conn.server.recv(10) == b""
    await trio.sleep(0.1)
    assert not stack.tcp.flows
    conn.server.close()


async def test_guest_rst_resets_the_host(
    autojump_clock: trio.abc.Clock, stack: UserStack, listener: trio.socket.SocketType
) -> None:
    wire = Wire(stack)
    conn = await connect(wire, listener)
    wire.send(conn.frame("R"))
    await trio.sleep(0.1)
    assert not stack.tcp.flows
    with pytest.raises(ConnectionResetError):
        await conn.server.recv(10)


async def test_host_rst_resets_the_guest(
    autojump_clock: trio.abc.Clock, stack: UserStack, listener: trio.socket.SocketType
) -> None:
    wire = Wire(stack)
    conn = await connect(wire, listener)
    conn.server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.server.close()
    rst = await wire.tcp()
    assert "R" in rst.flags and rst.seq == conn.ack
    await trio.sleep(0.1)
    assert not stack.tcp.flows


# ---- timers ------------------------------------------------------------------------------


async def test_keepalive_then_idle_reset(
    autojump_clock: trio.abc.Clock, stack: UserStack, listener: trio.socket.SocketType
) -> None:
    wire = Wire(stack)
    conn = await connect(wire, listener)
    t0 = trio.current_time()
    probe = await wire.tcp()
    assert trio.current_time() - t0 == pytest.approx(T.KEEPALIVE_INTERVAL, abs=0.1)
    assert probe.seq == conn.ack - 1 and not data(probe)
    wire.send(conn.frame("A"))  # the guest answers: still alive
    t0 = trio.current_time()
    while True:
        s = await wire.tcp()
        if "R" in s.flags:
            break
    assert trio.current_time() - t0 == pytest.approx(T.IDLE_TIMEOUT, abs=1)
    assert not stack.tcp.flows
    conn.server.close()


async def test_rehome_moves_connections_without_reset(
    autojump_clock: trio.abc.Clock, stack: UserStack, listener: trio.socket.SocketType
) -> None:
    stack.set_active_pairs(2)
    wire = Wire(stack)
    conn = await connect(wire, listener)
    wire.send(conn.frame("PA", b"x"), pair=1)
    conn.seq += 1
    assert (await wire.tcp(pair=1)).ack == conn.seq
    stack.set_active_pairs(1)
    await conn.server.send(b"after")
    s = await wire.tcp(pair=0)
    assert data(s) == b"after"
    assert flow_state(stack) == "established"
    conn.server.close()


async def test_random_segments_never_raise(
    autojump_clock: trio.abc.Clock, stack: UserStack, listener: trio.socket.SocketType
) -> None:
    """Segments with any flags, numbers, options and lengths into a live
    connection (and to no connection): dropped, answered or reset, never a
    Python exception."""
    rng = random.Random(1234)
    wire = Wire(stack)
    conn = await connect(wire, listener)
    flag_sets = ["S", "SA", "A", "PA", "FA", "R", "RA", "F", "", "SF", "SR", "U", "FPU", "E"]
    for i in range(600):
        near = rng.choice([conn.seq, conn.ack, 0, rng.getrandbits(32)])
        seq = (near + rng.randint(-70000, 70000)) & 0xFFFFFFFF
        ack = (
            rng.choice([conn.ack, conn.seq, rng.getrandbits(32)]) + rng.randint(-5, 5)
        ) & 0xFFFFFFFF
        opts: list[Any] = rng.choice(
            [[], [("MSS", rng.randint(0, 65535))], [("WScale", rng.randint(0, 255))],
             [("NOP", None), ("EOL", None)], [("SAckOK", b""), ("Timestamp", (5, 6))]]
        )  # fmt: skip
        frame = seg(
            rng.choice(flag_sets), seq, ack, rng.randbytes(rng.choice([0, 1, 100, 1500])),
            dport=rng.choice([conn.port, conn.port, 9]), sport=rng.choice([GPORT, GPORT + 1]),
            window=rng.randint(0, 65535), options=opts,
        )  # fmt: skip
        wire.send(frame, pair=rng.randint(0, 1))
        if i % 50 == 0:
            await trio.sleep(rng.choice([0, 0.5, 3]))
            with contextlib.suppress(OSError):  # a random RST may have ended it
                await conn.server.send(b"host data")
    await trio.sleep(10)
    wire.pending(0)
    wire.pending(1)
    assert "internal_error" not in stack.drops
    assert "internal_error" not in stack.tcp.stats
    conn.server.close()


async def test_ipv6_connection_with_correct_checksums(
    autojump_clock: trio.abc.Clock, stack: UserStack
) -> None:
    listener6 = trio.socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    await listener6.bind(("::1", 0))
    listener6.listen(4)
    port = listener6.getsockname()[1]
    wire = Wire(stack)

    def seg6(flags: str, seq: int, ack: int = 0, payload: bytes = b"", **kw: Any) -> bytes:
        pkt = (
            Ether(src=G_MAC, dst=O_MAC) / IPv6(src=str(GUEST6), dst=str(GW6))
            / TCP(sport=GPORT, dport=port, seq=seq, ack=ack, flags=flags, **kw)
        )  # fmt: skip
        return bytes(pkt / Raw(payload) if payload else pkt)

    wire.send(seg6("S", ISN, options=[("MSS", 1200), ("WScale", 2)]))
    server, _ = await listener6.accept()
    synack = await wire.tcp()
    assert synack.flags == "SA" and dict(synack.options)["MSS"] == 65520 - 60
    ack = synack.seq + 1
    wire.send(seg6("A", ISN + 1, ack))
    await server.send(b"six" * 1000)
    got = b""
    while len(got) < 3000:
        s = await wire.tcp()
        assert len(data(s)) <= 1200
        frame = whole(s)  # the whole Ether frame
        assert frame[IPv6].src == str(GW6) and frame[IPv6].dst == str(GUEST6)
        sent = frame[TCP].chksum
        del frame[TCP].chksum
        assert Ether(bytes(frame))[TCP].chksum == sent
        got += data(s)
    assert got == b"six" * 1000
    server.close()
    listener6.close()


async def test_ipv4_checksums(
    autojump_clock: trio.abc.Clock, stack: UserStack, listener: trio.socket.SocketType
) -> None:
    wire = Wire(stack)
    conn = await connect(wire, listener)
    for size in (1, 999, 1000):
        await conn.server.send(b"c" * size)
        s = await wire.tcp()
        frame = whole(s)
        got_ip, got_tcp = frame[IP].chksum, frame[TCP].chksum
        del frame[IP].chksum, frame[TCP].chksum
        again = Ether(bytes(frame))
        assert (got_ip, got_tcp) == (again[IP].chksum, again[TCP].chksum)
        conn.ack += size
        wire.send(conn.frame("A"))
    conn.server.close()


async def test_inbound_syn_retransmitted_then_established(
    autojump_clock: trio.abc.Clock,
) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    host_port = probe.getsockname()[1]
    probe.close()
    fwd = Forward("tcp", None, host_port, host_port, 8080)
    st = UserStack(make_config(guest_mac=GUEST_MAC, forwards=(fwd,)), 1)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(st.run)
            wire = Wire(st)
            client = await trio.open_tcp_stream("127.0.0.1", host_port)
            syn = await wire.tcp()
            t0 = trio.current_time()
            assert syn.flags == "S" and syn.dport == 8080
            assert dict(syn.options)["WScale"] == T.OUR_WSCALE
            again = await wire.tcp()  # the guest said nothing: sent again
            assert again.flags == "S" and again.seq == syn.seq
            assert trio.current_time() - t0 == pytest.approx(T.RTO_INIT, abs=0.05)
            frame = whole(again)
            assert frame[IP].src == str(GW4) and frame[IP].dst == str(GUEST4)

            def guest(flags: str, seq: int, payload: bytes = b"", **kw: Any) -> bytes:
                pkt = (
                    Ether(src=G_MAC, dst=O_MAC) / IP(src=str(GUEST4), dst=str(GW4))
                    / TCP(sport=8080, dport=syn.sport, seq=seq, flags=flags, **kw)
                )  # fmt: skip
                return bytes(pkt / Raw(payload) if payload else pkt)

            wire.send(guest("SA", 5000, ack=syn.seq + 1, options=[("MSS", 1400)]))
            assert (await wire.tcp()).ack == 5001
            await client.send_all(b"to guest")
            s = await wire.tcp()
            assert data(s) == b"to guest"
            wire.send(guest("PA", 5001, b"to host", ack=s.seq + 8))
            assert await client.receive_some(100) == b"to host"
            [flow] = st.tcp.describe()
            assert flow["inbound"] and flow["state"] == "established"
            assert flow["guest_port"] == 8080
            await client.aclose()
            nursery.cancel_scope.cancel()
    finally:
        st.close()
