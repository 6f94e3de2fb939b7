"""A guest TCP for tests that move real amounts of data through the rings.

``GuestNet`` sits on a ``UserGuest`` (the scripted front-end) and recycles
ring buffers, so a test can move megabytes: RX buffers are published again
once read, TX frames go into a fixed pool of slots reclaimed from the used
ring.  ``GuestConn`` is a deliberately small TCP on top, frames built and
parsed with scapy: in-order receive (anything else is dropped and at once
re-acknowledged; with ``sack``, held and SACKed instead), go-back-N
retransmission after a second without progress, window scaling, FIN and
RST.  One reader task per pair dispatches segments to connections; ACKs
go out once per batch of received frames.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

import trio
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from tests.fakes.userguest import GUEST4, GUEST_MAC, HDR, OUR_MAC, UserGuest

G_MAC, O_MAC = GUEST_MAC.hex(":"), OUR_MAC.hex(":")
MSS = 4000  # frames of MSS + headers fit one 4096-byte RX buffer
WSCALE = 7
TX_SLOTS, TX_SLOT_SIZE = 64, 8192
RX_EXTRA = 96  # RX buffers added to the 32 the scripted guest stocks
RTO = 1.0
MASK = 0xFFFFFFFF


class GuestNet:
    def __init__(self, guest: UserGuest) -> None:
        self.g = guest
        self.fe = guest.fe
        self.conns: dict[tuple[int, str, int], GuestConn] = {}
        self.listeners: dict[int, trio.MemorySendChannel[GuestConn]] = {}
        self.free: dict[int, list[int]] = {}  # free TX descriptor heads, by pair
        self.slot_gpa: dict[int, dict[int, int]] = {}  # where each head's slot lives
        self.backlog: dict[int, deque[bytes]] = {}
        self.ports = itertools.count(20000)
        self.frames_in = 0
        for p in range(guest.pairs):
            q = self.fe.queues[2 * p + 1]
            heads = [q._free.pop(0) for _ in range(TX_SLOTS)]
            self.slot_gpa[p] = {h: guest.fe.ram.alloc(TX_SLOT_SIZE) for h in heads}
            self.free[p] = heads
            self.backlog[p] = deque()
            guest.stock(p, RX_EXTRA)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for p in range(self.g.pairs):
                nursery.start_soon(self._reader, p)
                nursery.start_soon(self._tx_task, p)

    # ---- TX ---------------------------------------------------------------------

    def send(self, pair: int, frame: bytes) -> None:
        self.backlog[pair].append(frame)
        self._pump(pair)

    def _pump(self, pair: int) -> None:
        q = self.fe.queues[2 * pair + 1]
        free = self.free[pair]
        free.extend(used.head for used in q.take_used())
        put = False
        backlog = self.backlog[pair]
        while backlog and free:
            frame = backlog.popleft()
            head = free.pop()
            gpa = self.slot_gpa[pair][head]
            data = bytes(HDR) + frame
            assert len(data) <= TX_SLOT_SIZE
            self.fe.ram.write(gpa, data)
            q.set_desc(head, gpa, len(data))
            q.publish_head(head)
            put = True
        if put:
            self.fe.kick(2 * pair + 1)

    async def _tx_task(self, pair: int) -> None:
        q = self.fe.queues[2 * pair + 1]
        call = self.fe.calls[2 * pair + 1]
        while True:
            self._pump(pair)  # takes the used entries, lays the backlog
            # ask for an interrupt at the next used entry *after* taking the used
            # ones, then look again: one that landed in between raises none
            q.set_used_event(q.last_used)
            if q.used_idx() != q.last_used:
                continue
            await trio.lowlevel.wait_readable(call)
            with suppress(BlockingIOError):
                os.eventfd_read(call)

    # ---- RX ----------------------------------------------------------------------

    async def _reader(self, pair: int) -> None:
        q = self.fe.queues[2 * pair]
        call = self.fe.calls[2 * pair]
        while True:
            used = q.take_used()
            if not used:
                q.set_used_event(q.last_used)
                used = q.take_used()
            if not used:
                await trio.lowlevel.wait_readable(call)
                with suppress(BlockingIOError):
                    os.eventfd_read(call)
                continue
            touched: set[GuestConn] = set()
            for u in used:
                raw = q.read_rx(u)
                q.publish_head(u.head)
                self.frames_in += 1
                conn = self._dispatch(pair, raw[HDR:])
                if conn is not None:
                    touched.add(conn)
            self.fe.kick(2 * pair)
            for conn in touched:
                conn.flush()
            await trio.lowlevel.checkpoint()

    def _dispatch(self, pair: int, frame: bytes) -> GuestConn | None:
        pkt = Ether(frame)
        if TCP not in pkt or IP not in pkt:
            return None
        t = pkt[TCP]
        key = (t.dport, pkt[IP].src, t.sport)
        conn = self.conns.get(key)
        if conn is None:
            chan = self.listeners.get(t.dport)
            if chan is None or t.flags != "S":
                return None
            conn = GuestConn(self, pair, t.dport, pkt[IP].src, t.sport)
            conn.accept(t)
            chan.send_nowait(conn)
            return conn
        conn.rx_pairs[pair] += 1
        if conn.follow:  # replies go out on the queue the last segment came in on
            conn.pair = pair
        conn.on_segment(t)
        return conn

    # ---- API ----------------------------------------------------------------------

    async def connect(
        self, addr: str, port: int, pair: int = 0, *, sack: bool = False
    ) -> GuestConn:
        conn = GuestConn(self, pair, next(self.ports), addr, port)
        conn.sack = sack
        await conn.connect()
        return conn

    def listen(self, port: int) -> trio.MemoryReceiveChannel[GuestConn]:
        send, recv = trio.open_memory_channel[GuestConn](100)
        self.listeners[port] = send
        return recv


class GuestConn:
    def __init__(self, net: GuestNet, pair: int, lport: int, raddr: str, rport: int) -> None:
        self.net = net
        self.pair = pair
        self.follow = True
        self.rx_pairs: Counter[int] = Counter()  # segments received, by pair
        self.lport, self.raddr, self.rport = lport, raddr, rport
        self.iss = int.from_bytes(os.urandom(4), "big")
        self.snd_una = self.snd_nxt = self.snd_max = self.iss
        self.rcv_nxt = 0
        self.peer_wnd = 0
        self.peer_ws = 0
        self.rx = bytearray()
        self.established = trio.Event()
        self.fin = trio.Event()
        self.reset = False
        self.fin_received = False  # the peer's FIN arrived in order: its data is complete
        self.progress = trio.Event()
        self.ack_needed = False
        self.lose: Callable[[TCP], bool] | None = None  # True: the segment is lost on the way
        self.window = 0xFFFF  # the window field it sends (scaled by WSCALE once established)
        self.sack = False  # SACK-permitted offered (connect), then as the peer answered
        self.held: dict[int, bytes] = {}  # with SACK: data past a gap
        self.last_held = 0
        net.conns[(lport, raddr, rport)] = self

    def _frame(self, flags: str, seq: int, data: bytes = b"", options: Any = None) -> bytes:
        pkt = (
            Ether(src=G_MAC, dst=O_MAC) / IP(src=str(GUEST4), dst=self.raddr)
            / TCP(sport=self.lport, dport=self.rport, seq=seq, ack=self.rcv_nxt, flags=flags,
                  window=self.window, options=options or [])
        )  # fmt: skip
        if data:
            pkt = pkt / Raw(data)
        return bytes(pkt)

    def _send(self, flags: str, seq: int, data: bytes = b"", options: Any = None) -> None:
        self.net.send(self.pair, self._frame(flags, seq, data, options))

    def _wake(self) -> None:
        self.progress.set()
        self.progress = trio.Event()

    # ---- opening ----------------------------------------------------------------

    async def connect(self) -> None:
        opts: list[tuple[str, Any]] = [("MSS", MSS), ("WScale", WSCALE)]
        if self.sack:
            opts.append(("SAckOK", b""))
        while not self.established.is_set():
            self._send("S", self.iss, options=opts)
            with trio.move_on_after(RTO):
                await self.established.wait()
        if self.reset:
            raise ConnectionRefusedError(f"{self.raddr}:{self.rport}")

    def accept(self, syn: TCP) -> None:
        self.rcv_nxt = (syn.seq + 1) & MASK
        self._options(syn)
        self._send("SA", self.iss, options=[("MSS", MSS), ("WScale", WSCALE)])
        self.snd_nxt = self.snd_max = (self.iss + 1) & MASK

    def _options(self, syn: TCP) -> None:
        opts = dict(syn.options)
        self.peer_ws = opts.get("WScale", 0) if "WScale" in opts else 0
        self.peer_wnd = syn.window

    # ---- segments ---------------------------------------------------------------

    def on_segment(self, t: TCP) -> None:
        if self.lose is not None and self.lose(t):
            return
        flags = t.flags
        if "R" in flags:
            self.reset = True
            self.established.set()
            self.fin.set()
            self._wake()
            return
        if "S" in flags and "A" in flags and self.established.is_set():
            self.ack_needed = True  # a retransmitted SYN-ACK: our ACK was late
            return
        if "S" in flags and "A" in flags:
            self.rcv_nxt = (t.seq + 1) & MASK
            self._options(t)
            self.sack = self.sack and "SAckOK" in dict(t.options)
            self.snd_una = self.snd_nxt = self.snd_max = t.ack
            self.established.set()
            self.ack_needed = True
            return
        if "A" in flags:
            # up to the highest sequence number sent: after a go-back, snd_nxt is
            # behind what the peer may acknowledge
            if 0 < (t.ack - self.snd_una) & MASK <= (self.snd_max - self.snd_una) & MASK:
                self.snd_una = t.ack
                if (self.snd_nxt - self.snd_una) & MASK > 0x7FFFFFFF:
                    self.snd_nxt = self.snd_una
                self._wake()
            if not self.established.is_set() and t.ack == self.snd_nxt:
                self.established.set()
            self.peer_wnd = t.window << self.peer_ws
            self._wake()
        data = bytes(t[Raw].load) if Raw in t else b""
        if data:
            if t.seq == self.rcv_nxt:
                self.rx += data
                self.rcv_nxt = (self.rcv_nxt + len(data)) & MASK
                self._take_held()
                self.ack_needed = True
            else:  # out of order: a duplicate ACK at once (RFC 5681 §4.2)
                if self.sack and 0 < (t.seq - self.rcv_nxt) & MASK < 0x80000000:
                    self.held[t.seq] = data
                    self.last_held = t.seq
                self._send("A", self.snd_nxt, options=self._sack_blocks())
        if "F" in flags and (t.seq + len(data)) & MASK == self.rcv_nxt:
            self.rcv_nxt = (self.rcv_nxt + 1) & MASK
            self.fin_received = True
            self.fin.set()
            self.ack_needed = True
        elif "F" in flags:
            self.ack_needed = True

    def _take_held(self) -> None:
        """Held data the stream reached: received."""
        while True:
            reached = [q for q in self.held if (self.rcv_nxt - q) & MASK < 0x80000000]
            if not reached:
                return
            for q in reached:
                tail = self.held.pop(q)[(self.rcv_nxt - q) & MASK :]
                self.rx += tail
                self.rcv_nxt = (self.rcv_nxt + len(tail)) & MASK

    def _sack_blocks(self) -> Any:
        """A SACK option of what is held: the block with the latest segment
        first, then the others from the highest down, at most three."""
        spans: list[list[int]] = []  # offsets from rcv_nxt
        for off, size in sorted(((q - self.rcv_nxt) & MASK, len(d)) for q, d in self.held.items()):
            if spans and off <= spans[-1][1]:
                spans[-1][1] = max(spans[-1][1], off + size)
            else:
                spans.append([off, off + size])
        last = (self.last_held - self.rcv_nxt) & MASK
        if not spans:
            return None
        first = [b for b in spans if b[0] <= last < b[1]]
        blocks = first + [b for b in reversed(spans) if b not in first]
        edges = tuple((self.rcv_nxt + e) & MASK for b in blocks[:3] for e in b)
        return [("NOP", None), ("NOP", None), ("SAck", edges)]

    def flush(self) -> None:
        if self.ack_needed:
            self.ack_needed = False
            self._send("A", self.snd_nxt, options=self._sack_blocks())

    # ---- data ---------------------------------------------------------------------

    async def send_all(self, data: bytes, fin: bool = False) -> None:
        """Send ``data`` (then a FIN) and wait until all of it is acknowledged."""
        base = self.snd_una
        end = len(data) + (1 if fin else 0)
        while True:
            done = (self.snd_una - base) & MASK
            if done >= end or self.reset:
                break
            sent = (self.snd_nxt - base) & MASK
            while sent < len(data) and sent - done < max(self.peer_wnd, 1):
                n = min(MSS, len(data) - sent, max(self.peer_wnd - (sent - done), 1))
                self._send("PA", (base + sent) & MASK, data[sent : sent + n])
                sent += n
                self.snd_nxt = (base + sent) & MASK
            if fin and sent == len(data):
                self._send("FA", (base + sent) & MASK)
                self.snd_nxt = (base + sent + 1) & MASK
            if (self.snd_nxt - self.snd_max) & MASK < 0x80000000:
                self.snd_max = self.snd_nxt
            progress = self.progress
            with trio.move_on_after(RTO) as timer:
                await progress.wait()
            if timer.cancelled_caught:
                self.snd_nxt = self.snd_una  # go back: send again from what was acknowledged
        # a reset after everything was acknowledged loses nothing (a late segment of
        # ours, retransmitted before the last ACK was read, met a closed connection)
        if self.reset and (self.snd_una - base) & MASK < end:
            raise ConnectionResetError

    async def recv_until_fin(self) -> bytes:
        await self.fin.wait()
        if self.reset and not self.fin_received:
            raise ConnectionResetError
        return bytes(self.rx)


@asynccontextmanager
async def guest_net(guest: UserGuest) -> AsyncIterator[GuestNet]:
    net = GuestNet(guest)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(net.run)
        yield net
        nursery.cancel_scope.cancel()
