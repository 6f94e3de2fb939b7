"""Host -> guest TCP in C (usertcp.h): the guest's pure ACKs are taken by
the native TX path, which drops the acknowledged bytes from the host socket
and sends the stream's next segments (``take_ack``, ``push_locked``), so
Python does not run per ACK.  Python still gets the duplicate ACKs (fast
retransmit), the retransmission timer, zero windows and the end of the
stream, and learns what the native path did when it next takes the
connection.  A scripted guest (``tests/fakes/tcpguest.py``) over real
vhost-user rings, a real host socket."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from scapy.layers.inet import TCP
from scapy.packet import Raw

from tests.fakes.tcpguest import MSS, GuestConn, guest_net
from tests.fakes.userguest import GW4, make_config, user_guest
from tests.unit.test_user_tcp_loopback import pattern, server, stack_of, threads
from tests.waits import until
from trionet.backends.user import tcp as tcp_mod
from trionet.backends.user.stack import UserStack

__all__ = ["server", "threads"]  # fixtures

SIZE = 8 << 20
WINDOW = 1024  # 128 KiB: the guest's window, not the socket, paces the stream


@pytest.fixture
def python_data(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Data segments the stack's Python code queues for the guest, counted."""
    sent: Counter[str] = Counter()
    data = tcp_mod.GuestWire.data

    def counting(self: Any, flags: int, seq: int, ack: int, window: int, length: int,
                 seg: int, mss: int) -> None:  # fmt: skip
        sent["segments"] += -(-length // seg)
        data(self, flags, seq, ack, window, length, seg, mss)

    monkeypatch.setattr(tcp_mod.GuestWire, "data", counting)
    return sent


def source(payload: bytes, go: trio.Event) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """A host server that, once ``go`` is set, sends ``payload`` and closes
    (the guest keeps its side open until the end)."""

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            await go.wait()
            await stream.send_all(payload)

    return handle


Lose = Callable[[GuestConn], Callable[[TCP], bool]]


def lose_first(where: Callable[[int, int], bool]) -> Lose:
    """For ``GuestConn.lose``: the first data segment for which ``where``
    (its start and end as offsets into the host stream) holds is lost."""

    def install(conn: GuestConn) -> Callable[[TCP], bool]:
        start, lost = conn.rcv_nxt, []

        def lose(t: TCP) -> bool:
            if lost or Raw not in t:
                return False
            off = (t.seq - start) & 0xFFFFFFFF
            if where(off, off + len(t[Raw].load)):
                lost.append(off)
                return True
            return False

        return lose

    return install


def lose_each(starts: list[int], lost: list[int]) -> Lose:
    """For ``GuestConn.lose``: for each offset into the host stream in
    ``starts``, the first data segment from there on is lost (its length
    appended to ``lost``)."""

    def install(conn: GuestConn) -> Callable[[TCP], bool]:
        begin, todo = conn.rcv_nxt, sorted(starts)

        def lose(t: TCP) -> bool:
            if not todo or Raw not in t or (t.seq - begin) & 0xFFFFFFFF < todo[0]:
                return False
            todo.pop(0)
            lost.append(len(t[Raw].load))
            return True

        return lose

    return install


@asynccontextmanager
async def streaming(
    tmp_path: Path,
    server: Any,
    threads: bool,
    payload: bytes,
    lose: Lose | None = None,
    sack: bool = False,
) -> AsyncIterator[tuple[UserStack, GuestConn]]:
    """A guest connection the host sends ``payload`` to, then its FIN; the
    guest's window is ``WINDOW`` (scaled by the fake's WSCALE) from the
    start."""
    go = trio.Event()
    port = await server(source(payload, go))
    async with user_guest(tmp_path, make_config(), threads=threads) as g, guest_net(g) as net:
        with trio.fail_after(90):
            conn = await net.connect(str(GW4), port, sack=sack)
            conn.window = WINDOW
            if lose is not None:
                conn.lose = lose(conn)
            conn.ack_needed = True
            conn.flush()  # the window, before the stream starts
            go.set()
            yield stack_of(net), conn


async def fetch(
    tmp_path: Path, server: Any, threads: bool, payload: bytes, **guest: Any
) -> tuple[bytes, dict[str, int]]:
    """The host's stream, read to its FIN, and the stack's TCP counters;
    ``guest``: ``streaming``'s ``lose`` and ``sack``."""
    async with streaming(tmp_path, server, threads, payload, **guest) as (stack, conn):
        got = await conn.recv_until_fin()
        assert conn.sack is guest.get("sack", False)
        counters = stack.tcp.counters()
        for name in ("retransmits", "fast_retransmits", "sack_resent"):  # the open connection
            counters[name] = sum(getattr(f.conn, name) for f in stack.tcp.flows.values())
        return got, counters


async def test_a_host_stream_goes_on_from_c_at_each_guest_ack(
    tmp_path: Path, server: Any, threads: bool, python_data: Counter[str]
) -> None:
    payload = pattern(SIZE, 11)
    got, counters = await fetch(tmp_path, server, threads, payload)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    # the guest's ACKs were taken in C, and C sent most of the stream: Python
    # sends when data arrives while the window is open (on the socket's
    # wake-up), and the end of the stream
    assert counters["native_guest_acks"] > 50, counters
    split = f"{counters['native_push_segments']} from C, {python_data['segments']} from Python"
    assert counters["native_push_segments"] > 2 * python_data["segments"], split
    assert counters["retransmits"] == 0


LOSSES = {
    # one segment in the middle: the guest's duplicate ACKs are not taken
    # natively; Python counts them and sends it again (fast retransmit)
    "middle": (lambda off, _end: off >= 1 << 20, "fast_retransmits"),
    # the stream's last segment: no duplicate ACK follows it, so only the
    # retransmission timer, which Python keeps, sends it again
    "tail": (lambda _off, end: end == SIZE, "retransmits"),
}


@pytest.mark.parametrize("loss", LOSSES)
async def test_a_segment_lost_after_native_acks_is_sent_again(
    tmp_path: Path, server: Any, threads: bool, loss: str
) -> None:
    """Every ACK before the loss was taken in C; Python's recovery still works
    from what C did, and C takes over again once the stream caught up."""
    where, counter = LOSSES[loss]
    payload = pattern(SIZE, 12)
    got, counters = await fetch(tmp_path, server, threads, payload, lose=lose_first(where))
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    assert counters[counter] >= 1, counters
    assert counters["native_guest_acks"] > 50, counters


async def test_a_sack_guest_gets_only_its_holes_again(
    tmp_path: Path, server: Any, threads: bool
) -> None:
    """Three segments of one window are lost: the guest holds what follows
    them and SACKs it, and the stack resends exactly the three (RFC 6675),
    not everything after the first; C takes the stream over again after."""
    payload, lost = pattern(SIZE, 13), list[int]()
    starts = [(1 << 20) + k * 5 * MSS for k in range(3)]
    lose = lose_each(starts, lost)
    got, counters = await fetch(tmp_path, server, threads, payload, lose=lose, sack=True)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    assert len(lost) == 3
    assert counters["sack_resent"] == sum(lost), (lost, counters)
    assert counters["retransmits"] == 0 and counters["fast_retransmits"] >= 1, counters
    assert counters["native_guest_acks"] > 50, counters


async def test_a_guest_window_that_closes_is_python_s_until_it_opens(
    tmp_path: Path, server: Any, threads: bool
) -> None:
    """The guest closes its window in the middle of a natively sent stream:
    the zero-window ACK goes to Python (which probes), and so does the ACK
    that opens it again; then C takes the stream over once more."""
    payload = pattern(SIZE, 14)
    async with streaming(tmp_path, server, threads, payload) as (stack, conn):
        while len(conn.rx) < 2 << 20:
            await conn.progress.wait()
        conn.window = 0  # its next ACKs close the window
        [flow] = stack.tcp.flows.values()
        await until(lambda: flow.conn.snd_wnd == 0, "the stack to see the window closed")
        assert flow.conn.native_push is False
        before = stack.tcp.counters()["native_guest_acks"]
        conn.window = WINDOW
        conn.ack_needed = True
        conn.flush()  # a window update
        got = await conn.recv_until_fin()
        after = stack.tcp.counters()["native_guest_acks"]
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    assert after > before + 10, (before, after)


async def test_the_stream_follows_the_pair_of_the_guest_s_acks(
    tmp_path: Path, server: Any, threads: bool
) -> None:
    """The guest moves the connection to its second queue mid-stream: the
    ACKs C takes there carry the pair, and what C sends after them goes to
    that pair's RX ring."""
    payload = pattern(SIZE, 15)
    async with streaming(tmp_path, server, threads, payload) as (stack, conn):
        while len(conn.rx) < 1 << 20:
            await conn.progress.wait()
        before = stack.tcp.counters()["native_guest_acks"]
        conn.pair, conn.follow = 1, False
        conn.rx_pairs.clear()
        got = await conn.recv_until_fin()
        assert stack.tcp.counters()["native_guest_acks"] > before + 10
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    # what was queued on pair 0 before the move still came there: a window's worth
    assert conn.rx_pairs[1] > 10 * conn.rx_pairs[0], conn.rx_pairs


CHUNKS, CHUNK = 40, 3000  # each chunk one segment: below the fake guest's MSS


@pytest.mark.parametrize("case", ["steady", "move", "lost"])
async def test_host_data_arriving_with_nothing_in_flight_goes_on_from_c(
    tmp_path: Path, server: Any, threads: bool, python_data: Counter[str], case: str
) -> None:
    """The host sends a chunk only once the guest has the one before: each
    arrives with nothing in flight, so no guest ACK can start it.  The
    socket's epoll edge does (``tn_tcp_ready``): Python does not queue the
    data (it is told, to arm its retransmission timer, as nothing was in
    flight before).  With ``move`` the guest moves the connection to its
    second pair after a quarter of the chunks: the next arrival is Python's
    (it moves the watch), and the rest go there from C.  With ``lost`` one
    chunk's segment is lost on the way: Python's timer, armed although C sent
    it, sends it again within the first timeout (no ACK would ever come)."""
    move = case == "move"
    payload = pattern(CHUNKS * CHUNK, 16)
    ready: list[GuestConn] = []
    go = trio.Event()

    async def lockstep(stream: trio.SocketStream) -> None:
        async with stream:
            await go.wait()
            conn = ready[0]
            tx1, mark = conn.net.fe.queues[3], 0  # pair 1's TX ring
            for k in range(CHUNKS):
                await stream.send_all(payload[k * CHUNK : (k + 1) * CHUNK])
                have = (k + 1) * CHUNK
                await until(lambda n=have: len(conn.rx) >= n, f"chunk {k} at the guest")
                if move and k == CHUNKS // 4:
                    conn.pair, conn.follow = 1, False
                    conn.rx_pairs.clear()
                    mark = tx1.avail_idx
                if move and k == CHUNKS // 4 + 1:
                    # the guest's ACK of it went on pair 1: the stack takes it before
                    # the next chunk arrives (else that chunk races it to pair 0)
                    await until(
                        lambda m=mark: tx1.avail_idx != m and tx1.used_idx() == tx1.avail_idx,
                        "the guest's ACK on pair 1 taken",
                    )

    port = await server(lockstep)
    async with user_guest(tmp_path, make_config(), threads=threads) as g, guest_net(g) as net:
        with trio.fail_after(60 if case != "lost" else 10):  # a keepalive comes after 30 s
            conn = await net.connect(str(GW4), port)
            conn.window = WINDOW
            if case == "lost":
                conn.lose = lose_first(lambda off, _end: off >= 5 * CHUNK)(conn)
            conn.ack_needed = True
            conn.flush()
            ready.append(conn)
            go.set()
            got = await conn.recv_until_fin()
            stack = stack_of(net)
            counters = stack.tcp.counters()
            open_ = sum(f.conn.retransmits for f in stack.tcp.flows.values())
            counters["retransmits"] = counters.get("retransmits", 0) + open_
    assert got == payload
    assert counters["native_host_ready"] >= CHUNKS // 2, counters
    if case == "lost":  # the retransmission is Python's
        assert counters["retransmits"] >= 1 and python_data["segments"] <= 4, counters
        return
    assert python_data["segments"] <= 3, (python_data, counters)  # Python arms timers only
    if move:  # after the move: every chunk but the first there came from C on pair 1
        assert conn.rx_pairs[1] >= CHUNKS - CHUNKS // 4 - 2 and conn.rx_pairs[0] <= 1, conn.rx_pairs
