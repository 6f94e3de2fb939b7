"""TCP through the user backend end to end: a scripted guest's TCP
(``tests/fakes/tcpguest.py``) over real vhost-user rings, real TCP servers on
the host's 127.0.0.1 reached through the gateway 10.0.2.2."""

from __future__ import annotations

import functools
import hashlib
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.fakes.tcpguest import GuestConn, GuestNet, guest_net
from tests.fakes.userguest import GUEST_MAC, GW4, make_config, user_guest
from trionet.backends.user.config import Forward
from trionet.backends.user.stack import UserStack

BULK = 100 << 20  # each way, verified
BULK_THREADS = 16 << 20  # the same path on worker threads, smaller to keep the suite short
CONCURRENT = 500
SHORT_CONNECTIONS = 10_000
Handler = Callable[[trio.SocketStream], Awaitable[None]]


@pytest.fixture(params=[False, True], ids=["trio", "threads"])
def threads(request: pytest.FixtureRequest) -> bool:
    """The pairs served on the Trio thread, and by worker threads."""
    return bool(request.param)


@pytest.fixture
async def server() -> AsyncIterator[Callable[[Handler], Awaitable[int]]]:
    """Starts TCP servers on 127.0.0.1; returns their ports."""
    async with trio.open_nursery() as nursery:

        async def start(handler: Handler) -> int:
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
            )
            return int(listeners[0].socket.getsockname()[1])

        yield start
        nursery.cancel_scope.cancel()


async def read_to_eof(stream: trio.SocketStream) -> bytes:
    out = bytearray()
    while chunk := await stream.receive_some(1 << 20):
        out += chunk
    return bytes(out)


async def echo(stream: trio.SocketStream) -> None:
    """Everything back once the client half-closed, then close."""
    async with stream:
        await stream.send_all(await read_to_eof(stream))


def pattern(n: int, seed: int = 0) -> bytes:
    block = hashlib.sha256(seed.to_bytes(4, "big")).digest() * 2048
    return (block * (n // len(block) + 1))[:n]


def rss_bytes() -> int:
    """This process's resident memory now (not its peak)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def stack_of(net: GuestNet) -> UserStack:
    session = net.g.service.session
    assert session is not None
    stack = session.stack
    assert isinstance(stack, UserStack)
    return stack


async def settled(stack: UserStack) -> None:
    """Every connection closed and released by its task."""
    with trio.fail_after(20):
        while stack.tcp.flows or stack.tcp.stats["released"] != stack.tcp.stats["opened"]:
            await trio.sleep(0.01)


async def test_megabytes_both_ways_with_half_close(
    tmp_path: Path, server: Any, threads: bool
) -> None:
    size = BULK_THREADS if threads else BULK
    up, down = pattern(size, 1), pattern(size, 2)
    digests: list[bytes] = []
    rates: dict[str, float] = {}

    async def bulk(stream: trio.SocketStream) -> None:
        async with stream:
            got = await read_to_eof(stream)
            digests.append(hashlib.sha256(got).digest())
            await stream.send_all(hashlib.sha256(got).digest() + down)

    port = await server(bulk)
    async with user_guest(tmp_path, make_config(), threads=threads) as g, guest_net(g) as net:
        with trio.fail_after(240):  # a stall fails the test instead of hanging the suite
            conn = await net.connect(str(GW4), port)
            t0 = time.monotonic()
            await conn.send_all(up, fin=True)
            while len(conn.rx) < 32:
                await conn.progress.wait()
            t1 = time.monotonic()
            got = await conn.recv_until_fin()
            t2 = time.monotonic()
        rates["guest_to_host_MBps"] = size / (t1 - t0) / 1e6
        rates["host_to_guest_MBps"] = size / (t2 - t1) / 1e6
        assert got[:32] == hashlib.sha256(up).digest() == digests[0]
        assert hashlib.sha256(got[32:]).digest() == hashlib.sha256(down).digest()
        await settled(stack_of(net))
        stats = stack_of(net).tcp.counters()
    print("throughput", {k: round(v, 1) for k, v in rates.items()}, stats)
    # the guest's data went the native path (plain in-order segments), the
    # host's was laid into the ring from the socket
    assert stats["native_tx_bytes"] > size // 2
    assert stats["data_laid"] > 0


async def test_concurrent_connections(tmp_path: Path, server: Any, threads: bool) -> None:
    port = await server(echo)
    async with user_guest(tmp_path, make_config(), threads=threads) as g, guest_net(g) as net:
        results: dict[int, bytes] = {}

        async def one(i: int) -> None:
            conn = await net.connect(str(GW4), port, pair=i % 2)
            await conn.send_all(pattern(3000, i), fin=True)
            results[i] = await conn.recv_until_fin()

        try:
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    for i in range(CONCURRENT):
                        nursery.start_soon(one, i)
        except trio.TooSlowError:  # say where it stood: which pairs, which states
            st = g.service.status()
            pairs = [{k: p[k] for k in ("index", "tx_packets", "rx_packets", "drops_by_reason")}
                     for p in st["pairs"]]  # fmt: skip
            left = sorted(set(range(CONCURRENT)) - set(results))
            states: dict[str, int] = {}
            for f in stack_of(net).tcp.flows.values():
                states[f.conn.state.name] = states.get(f.conn.state.name, 0) + 1
            on = sorted({i % 2 for i in left})
            raise AssertionError(
                f"{len(left)} connections unfinished after 60 s (on pairs {on}): {pairs}; "
                f"flows by state {states}; tcp {st['user']['tcp']}"
            ) from None
        assert all(results[i] == pattern(3000, i) for i in range(CONCURRENT))
        stack = stack_of(net)
        await settled(stack)
        assert stack.tcp.stats["closed"] == CONCURRENT


async def test_short_connections_leak_no_fds(tmp_path: Path, server: Any) -> None:
    port = await server(echo)
    async with user_guest(tmp_path, make_config()) as g, guest_net(g) as net:
        stack = stack_of(net)

        async def one(i: int) -> None:
            conn = await net.connect(str(GW4), port, pair=i % 2)
            await conn.send_all(b"%d" % i, fin=True)
            assert await conn.recv_until_fin() == b"%d" % i

        async def wave(first: int, n: int) -> None:
            async with trio.open_nursery() as nursery:
                for i in range(first, first + n):
                    nursery.start_soon(one, i)

        await wave(0, 100)  # warm up: lazily created fds exist before counting
        await settled(stack)
        before = len(os.listdir("/proc/self/fd"))
        rss_before = rss_bytes()
        with trio.fail_after(600):
            for first in range(100, SHORT_CONNECTIONS + 100, 100):
                await wave(first, 100)
        await settled(stack)
        assert len(os.listdir("/proc/self/fd")) <= before
        assert stack.tcp.stats["closed"] == SHORT_CONNECTIONS + 100
        # flat: what 10,000 connections left behind is allocator noise, not per-connection state
        assert rss_bytes() - rss_before < 32 << 20, (rss_before, rss_bytes())


async def test_replies_follow_the_pair_of_natively_sent_data(
    tmp_path: Path, server: Any, threads: bool
) -> None:
    port = await server(echo)
    async with user_guest(tmp_path, make_config(), threads=threads) as g, guest_net(g) as net:
        with trio.fail_after(60):
            conn = await net.connect(str(GW4), port, pair=0)
            # acknowledged: trionet handled the handshake's ACK, the native
            # path may take the connection's next segments
            await conn.send_all(b"hello")
            stack = stack_of(net)
            before = stack.tcp.counters()["native_tx_frames"]
            # the guest moves the connection to its second queue, and keeps it
            # there (an ACK queued on pair 0 before the move may still arrive)
            conn.pair, conn.follow = 1, False
            conn.rx_pairs.clear()
            await conn.send_all(pattern(20_000, 7))  # acknowledged: ACKs came back
            assert stack.tcp.counters()["native_tx_frames"] > before
            assert conn.rx_pairs[1] > 0, conn.rx_pairs  # the native ACKs followed
            await conn.send_all(b"", fin=True)
            assert await conn.recv_until_fin() == b"hello" + pattern(20_000, 7)
            # the echo and the ACKs after the move came on pair 1
            assert conn.rx_pairs[1] > conn.rx_pairs[0], conn.rx_pairs


async def test_inbound_forward_to_a_guest_listener(tmp_path: Path) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    host_port = probe.getsockname()[1]
    probe.close()
    cfg = make_config(forwards=(Forward("tcp", None, host_port, host_port, 8080),),
                      guest_mac=GUEST_MAC)  # fmt: skip
    async with user_guest(tmp_path, cfg) as g, guest_net(g) as net:
        accepted = net.listen(8080)
        client = await trio.open_tcp_stream("127.0.0.1", host_port)
        with trio.fail_after(10):
            conn: GuestConn = await accepted.receive()
            await client.send_all(b"hello guest")
            while len(conn.rx) < 11:
                await conn.progress.wait()
            assert bytes(conn.rx) == b"hello guest"
            assert conn.raddr == str(GW4)  # the host's loopback appears as the gateway
            await conn.send_all(b"hello host", fin=True)
            assert await read_to_eof(client) == b"hello host"
            await client.aclose()
            await conn.recv_until_fin()
            await settled(stack_of(net))
