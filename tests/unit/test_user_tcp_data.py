"""TCP data towards the guest as outbox *entries* (``native/usertcp.c``):
the bytes stay in the host socket until the entry is laid, so what happens
between queueing and laying matters.  Same set-up as ``test_user_tcp.py``:
scapy segments into a ``UserStack``, a real socket on 127.0.0.1."""

from __future__ import annotations

import trio
from scapy.layers.inet import TCP
from trionet._native import ffi, lib

from tests.unit.test_user_tcp import Wire, connect, data, seg
from trionet.backends.user.stack import UserStack

PAYLOAD = bytes(range(256)) * 12  # 3072 bytes: four segments of at most 1000


def native_counters() -> dict[str, int]:
    out = ffi.new("struct tn_tcpc_stats *")
    lib.tn_tcpc_stats_get(out)
    return {name: int(getattr(out, name)) for name in ("laid", "stale", "trimmed")}


async def queued(stack: UserStack, n: int, pair: int = 0) -> None:
    """Wait until ``n`` frames or entries wait in the pair's outbox."""
    box = stack.outboxes[pair]
    while len(box) < n:
        box.clear_wake()
        if len(box) >= n:
            break
        await trio.lowlevel.wait_readable(box.wake_fd)


async def test_entries_acknowledged_before_they_are_laid_are_trimmed_or_dropped(
    autojump_clock: trio.abc.Clock, stack: UserStack, listener: trio.socket.SocketType
) -> None:
    wire = Wire(stack)
    conn = await connect(wire, listener, mss=1000)
    before = native_counters()
    await conn.server.send(PAYLOAD)
    await queued(stack, 4)  # four entries; none laid yet
    # the guest acknowledges 1500 bytes it has not been shown (a valid ACK: sent)
    wire.send(seg("A", conn.seq, conn.ack + 1500, dport=conn.port))
    frames = [f[TCP] for f in wire.pending() if TCP in f]
    segments = [(s.seq - conn.ack, data(s)) for s in frames if data(s)]
    # the first entry is gone, the second starts where the ACK ended
    assert segments == [
        (1500, PAYLOAD[1500:2000]),
        (2000, PAYLOAD[2000:3000]),
        (3000, PAYLOAD[3000:]),
    ]
    after = native_counters()
    assert after["stale"] - before["stale"] == 1
    assert after["trimmed"] - before["trimmed"] == 1
    conn.server.close()


async def test_entries_of_a_closed_connection_are_dropped(
    autojump_clock: trio.abc.Clock, stack: UserStack, listener: trio.socket.SocketType
) -> None:
    wire = Wire(stack)
    conn = await connect(wire, listener, mss=1000)
    await conn.server.send(PAYLOAD)
    await queued(stack, 4)
    before = native_counters()
    wire.send(conn.frame("R"))  # the guest resets: the socket is closed at once
    while not stack.tcp.stats["released"]:  # the connection's task let go of the socket
        await trio.sleep(0.01)
    assert not [f for f in wire.pending() if TCP in f and data(f[TCP])]
    assert native_counters()["stale"] - before["stale"] == 4
    conn.server.close()


async def test_kernels_without_so_peek_off_peek_past_a_discard_buffer(
    autojump_clock: trio.abc.Clock, stack: UserStack, listener: trio.socket.SocketType
) -> None:
    stack.tcp.no_peek_off = True
    wire = Wire(stack)
    conn = await connect(wire, listener, mss=1000)
    [flow] = stack.tcp.flows.values()
    assert lib.tn_tcpc_peek_off(flow.host.native) == 0
    blob = bytes(i * 7 & 0xFF for i in range(20_000))
    await conn.server.send(blob)
    got = bytearray()
    while len(got) < len(blob):
        s = await wire.tcp()
        assert s.seq - conn.ack == len(got)
        got += data(s)
        if len(got) % 3000 == 0:  # acknowledge now and then: offsets move
            wire.send(seg("A", conn.seq, conn.ack + len(got), dport=conn.port))
    assert bytes(got) == blob
    conn.server.close()


async def test_a_run_is_cut_to_the_mss_in_order_with_push_on_its_last_segment(
    autojump_clock: trio.abc.Clock, stack: UserStack, listener: trio.socket.SocketType
) -> None:
    """The stack queues what the window allows with one call; the native side
    cuts it into MSS-sized entries, PSH on the last only."""
    wire = Wire(stack)
    conn = await connect(wire, listener, mss=1000)
    await conn.server.send(PAYLOAD)
    await queued(stack, 4)
    frames = [f[TCP] for f in wire.pending() if TCP in f and data(f[TCP])]
    assert [(s.seq - conn.ack, len(data(s))) for s in frames] == [
        (0, 1000),
        (1000, 1000),
        (2000, 1000),
        (3000, 72),
    ]
    assert [str(s.flags) for s in frames] == ["A", "A", "A", "PA"]
    assert b"".join(data(s) for s in frames) == PAYLOAD
    conn.server.close()
