"""Guest -> host TCP in C (usertcp.h): a TX batch's in-order segments of a
connection go to the host socket with one ``sendmsg`` (``tn_tcp_run_flush``),
and are acknowledged from C, once per batch, with the window Python would
have sent (``tn_tcp_acks_flush``); Python does not run for a steady guest ->
host stream, takes a zero window over, gets the segments of a run the socket
took only in part, and learns what the native ACKs said when it next handles
the connection.  A scripted guest
(``tests/fakes/tcpguest.py``) over real vhost-user rings, a real host socket."""

from __future__ import annotations

import hashlib
import socket
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.fakes.tcpguest import GuestNet, guest_net
from tests.fakes.userguest import GW4, make_config, user_guest
from tests.unit.test_user_tcp_loopback import pattern, read_to_eof, server, stack_of, threads
from tests.waits import until
from trionet.backends.user import tcp as tcp_mod
from trionet.backends.user.tcp_conn import ACK

__all__ = ["server", "threads"]  # fixtures

SIZE = 4 << 20
SIZE_PAST_BUFFERS = 8 << 20  # more than a non-reading peer's socket buffers hold (4 MiB sndbuf)


@pytest.fixture
def python_acks(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Pure ACKs the stack's Python code sends, counted."""
    sent: Counter[str] = Counter()
    segment = tcp_mod.GuestWire.segment

    def counting(self: Any, flags: int, seq: int, ack: int, window: int, *rest: Any) -> None:
        if flags == ACK and not rest[0]:
            sent["pure"] += 1
            if window == 0:
                sent["zero_window"] += 1
        segment(self, flags, seq, ack, window, *rest)

    monkeypatch.setattr(tcp_mod.GuestWire, "segment", counting)
    return sent


def sink(digests: list[bytes], gate: trio.Event | None = None) -> Callable[[Any], Awaitable[None]]:
    """A host server that (once ``gate`` is set) reads to the end and keeps
    the digest of what it read."""

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            if gate is not None:
                await gate.wait()
            digests.append(hashlib.sha256(await read_to_eof(stream)).digest())

    return handle


@asynccontextmanager
async def gated_peer(
    tmp_path: Path, server: Any, threads: bool
) -> AsyncIterator[tuple[GuestNet, int, trio.Event, list[bytes]]]:
    """The scripted guest's network, and a host peer on the port given that
    reads to the end once the event is set (the digests of what it read)."""
    digests: list[bytes] = []
    gate = trio.Event()
    port = await server(sink(digests, gate))
    async with user_guest(tmp_path, make_config(), threads=threads) as g, guest_net(g) as net:
        yield net, port, gate, digests


async def test_a_guest_stream_is_sent_in_runs_and_acknowledged_without_python(
    tmp_path: Path, server: Any, threads: bool, python_acks: Counter[str]
) -> None:
    digests: list[bytes] = []
    port = await server(sink(digests))
    data = pattern(SIZE, 3)
    async with user_guest(tmp_path, make_config(), threads=threads) as g, guest_net(g) as net:
        with trio.fail_after(60):
            conn = await net.connect(str(GW4), port)
            await conn.send_all(b"x")  # the handshake's ACK handled: the native path may take over
            acks_before = python_acks["pure"]
            await conn.send_all(data, fin=True)
            await until(lambda: bool(digests), "the host side to read to the end")
        counters = stack_of(net).tcp.counters()
    assert digests == [hashlib.sha256(b"x" + data).digest()]
    # Python's own pure ACKs are the odd one at the edges (after the FIN) ...
    assert python_acks["pure"] - acks_before <= 2, (python_acks, counters)
    # ... the rest came from C, one per TX batch (the scripted guest sends a
    # window at a time)
    assert counters["native_tx_frames"] > 100
    assert counters["native_acks"] >= 10, counters
    # a batch's segments went out together: far fewer sendmsg calls than
    # segments (a worker thread takes each of this slow guest's frames as it
    # comes, in batches of one: there, only that no segment is sent twice)
    assert counters["native_tx_sends"] <= counters["native_tx_frames"]
    if not threads:
        assert counters["native_tx_frames"] >= 4 * counters["native_tx_sends"], counters


async def test_a_zero_window_is_left_to_python_and_reopens(
    tmp_path: Path, server: Any, threads: bool, python_acks: Counter[str]
) -> None:
    """A host peer that does not read fills its socket: the native path does
    not advertise a closed window itself, Python does (and keeps looking at
    it); once the peer reads, the stream completes intact."""
    data = pattern(SIZE_PAST_BUFFERS, 5)
    async with gated_peer(tmp_path, server, threads) as (net, port, gate, digests):
        stack = stack_of(net)
        with trio.fail_after(60):
            conn = await net.connect(str(GW4), port)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(conn.send_all, data, True)
                await until(lambda: python_acks["zero_window"] > 0, "a zero window to the guest")
                assert stack.tcp.counters()["acks_to_python"] > 0
                [flow] = stack.tcp.flows.values()
                assert flow.conn.native_ack is False  # closed: Python's until it opens
                gate.set()
            await until(lambda: bool(digests), "the host side to read to the end")
        counters = stack.tcp.counters()
    assert digests == [hashlib.sha256(data).digest()]
    assert counters["native_acks"] > 0


async def test_a_run_the_socket_takes_in_part_reaches_python_intact(
    tmp_path: Path, server: Any, threads: bool
) -> None:
    """The window said there was room, then the host socket's buffer shrank:
    one sendmsg of a run is taken only in part.  The segments it did not take
    whole go to Python (which holds what the socket refuses); nothing is lost
    or sent twice."""
    data = pattern(SIZE, 9)
    async with gated_peer(tmp_path, server, threads) as (net, port, gate, digests):
        stack = stack_of(net)
        with trio.fail_after(60):
            conn = await net.connect(str(GW4), port)
            await conn.send_all(b"x")  # the guest now has a window of tens of kilobytes
            [flow] = stack.tcp.flows.values()
            flow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(conn.send_all, data, True)
                await until(
                    lambda: stack.tcp.counters()["native_tx_partial"] > 0,
                    "a run the socket took in part",
                )
                gate.set()
            await until(lambda: bool(digests), "the host side to read to the end")
    assert digests == [hashlib.sha256(b"x" + data).digest()]
