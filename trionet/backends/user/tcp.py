"""TCP flows: each guest connection translated to a host socket.

The glue between the state machine (``tcp_conn.py``) and the host: sockets,
one Trio task per connection, frames to the guest's queue pairs.

- **Guest-initiated**: the guest's SYN to (A, P) opens a non-blocking socket
  (``TCP_MAXSEG`` from the guest's MSS, keepalive, no Nagle: the guest does
  its own) connecting to ``fwd.host_target``; the SYN-ACK goes to the guest
  only once the connect completed, an RST when it failed.
- **Inbound** (``-t SPEC``): trionet listens on the host ports; an accepted
  connection sends a SYN to the guest from the peer's guest-side address
  (``fwd.guest_view``), starting on a pair chosen by hash.
- **Per connection**: one task waits on an edge-triggered epoll set holding
  the socket (a level-triggered wait would spin: data the guest has not
  acknowledged stays queued), with a cancel-scope deadline for the
  connection's next timer; guest segments are handled inline by the TX path
  and move that deadline.  Frames go to the pair of the guest's last
  segment; ``rehome`` moves connections off disabled pairs without a reset.
- **Frames** are built from a per-connection header template (``Template``):
  addresses, ports and the pseudo-header sum are computed once.
- **Native paths** (``native/usertcp_tx.c``, ``native/usertcp_push.c``):
  between two of Python's steps the TX path may send the guest's in-order
  data, acknowledge it, take the guest's pure ACKs and send the stream on;
  each step starts by pausing the native part and taking over what it did
  (``tn_tcpc_pause``, ``native/usertcp_table.c``), and ends by handing the
  state back with what it may do (``_resume``).
- A closed connection's socket, epoll set and table entry are released by its
  task; nothing stays behind.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import select
import socket
import struct
from collections import Counter
from dataclasses import dataclass, field
from ipaddress import IPv4Address, ip_address
from typing import TYPE_CHECKING, Any

import trio

from trionet._native import ffi, lib
from trionet.backends.user import packets as P
from trionet.backends.user.fwd import Unroutable, guest_view, host_target
from trionet.backends.user.listeners import Listeners, ListenPoint
from trionet.backends.user.tcp_conn import ACK, RST, SYN, TcpConn
from trionet.backends.user.tcp_segment import Segment, parse_segment
from trionet.backends.user.tcp_states import State

if TYPE_CHECKING:
    from trionet.backends.user.stack import UserStack

log = logging.getLogger(__name__)

MAX_TCP_FLOWS = 8192  # two fds each: the socket and its epoll set
FAST_TAKE = 1024  # connections the native TX path took data for, taken at once
OUTBOX_RESERVE = int(lib.TN_TCP_OUTBOX_RESERVE)  # outbox slots left for other traffic
MAX_BURST = int(lib.TN_TCP_PUSH_BURST)  # segments one push puts in an outbox
LISTEN_BACKLOG = 128
ACCEPT_BACKOFF = 0.1  # s after a failed accept(): the listener stays readable
EP_DATA = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
EP_CONNECT = select.EPOLLOUT | select.EPOLLET

Key = tuple[int, P.IPAddress, P.IPAddress, int, int]  # version, gsrc, gdst, gsport, gdport


class Template:
    """Ethernet + IP + TCP headers of one connection's frames to the guest:
    lengths, sequence numbers and checksums filled in per segment."""

    __slots__ = ("addrs", "eth", "ip_sum", "ports", "pseudo", "v4")

    def __init__(
        self, dst_mac: bytes, src_mac: bytes, src: P.IPAddress, dst: P.IPAddress, sport: int,
        dport: int,
    ) -> None:  # fmt: skip
        self.v4 = src.version == 4
        self.addrs = src.packed + dst.packed
        self.eth = dst_mac + src_mac + struct.pack("!H", P.ETH_P_IP if self.v4 else P.ETH_P_IPV6)
        self.ip_sum = P.sum16(
            struct.pack("!BBHHHBBH", 0x45, 0, 0, 0, 0x4000, 64, P.IPPROTO_TCP, 0) + self.addrs
        )
        self.pseudo = P.sum16(self.addrs + struct.pack("!xB", P.IPPROTO_TCP))
        self.ports = struct.pack("!HH", sport, dport)

    def header(self) -> bytes:
        """The Ethernet, IP and TCP headers of a data segment, for the native
        side to fill in (``usertcp.h``)."""
        tcph = self.ports + struct.pack("!IIBBHHH", 0, 0, 5 << 4, 0, 0, 0, 0)
        if self.v4:
            iph = struct.pack("!BBHHHBBH", 0x45, 0, 0, 0, 0x4000, 64, P.IPPROTO_TCP, 0)
        else:
            iph = struct.pack("!IHBB", 6 << 28, 0, P.IPPROTO_TCP, 64)
        return self.eth + iph + self.addrs + tcph

    def frame(
        self, flags: int, seq: int, ack: int, window: int, payload: bytes, options: bytes
    ) -> bytes:
        hlen = 20 + len(options)
        head = self.ports + struct.pack("!IIBBHI", seq, ack, hlen << 2, flags, window, 0) + options
        l4len = hlen + len(payload)
        total = P.add16(P.add16(self.pseudo, l4len), P.add16(P.sum16(head), P.sum16(payload)))
        tcph = head[:16] + struct.pack("!H", ~total & 0xFFFF) + head[18:]
        if self.v4:
            ip_csum = ~P.add16(self.ip_sum, 20 + l4len) & 0xFFFF
            iph = (
                struct.pack("!BBHHHBBH", 0x45, 0, 20 + l4len, 0, 0x4000, 64, P.IPPROTO_TCP, ip_csum)
                + self.addrs
            )
        else:
            iph = struct.pack("!IHBB", 6 << 28, l4len, P.IPPROTO_TCP, 64) + self.addrs
        frame = self.eth + iph + tcph + payload
        if len(frame) < P.ETH_ZLEN:
            frame += bytes(P.ETH_ZLEN - len(frame))
        return frame


class HostSocket:
    """A connection's host socket as ``tcp_states.Host``.  Its receive queue
    is shared with the native side (``struct tn_tcpc``), which peeks the
    guest's data from it: how much is there, and dropping what the guest
    acknowledged, go through the native part too.  Free send space from
    ``SO_MEMINFO`` and ``SIOCOUTQ``, measured natively (``tn_tcpc_space``, the
    same measure the native ACKs use)."""

    def __init__(self, sock: socket.socket, native: Any) -> None:
        self.sock = sock
        self.native = native  # struct tn_tcpc *, released by close_native
        self.outq = 0
        self.sndbuf = 0
        self.aborted = False
        self._space_out = (ffi.new("uint32_t *"), ffi.new("uint32_t *"))

    def available(self, offset: int) -> int:
        n = int(lib.tn_tcpc_avail(self.native, offset))
        if n < -1:
            raise OSError(-n, os.strerror(-n))
        return n

    def consume(self, n: int) -> None:
        rc = int(lib.tn_tcpc_consume(self.native, n))
        if rc < 0:
            raise OSError(-rc, os.strerror(-rc))

    def close_native(self) -> None:
        """No native use of the socket after this (before it is closed)."""
        if self.native != ffi.NULL:
            lib.tn_tcpc_close(self.native)
            self.native = ffi.NULL

    def send(self, data: bytes) -> int:
        try:
            return self.sock.send(data, socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return 0

    def space(self) -> int:
        if self.native == ffi.NULL:
            return 0
        outq, sndbuf = self._space_out
        n = int(lib.tn_tcpc_space(self.native, outq, sndbuf))
        if n < 0:
            raise OSError(-n, os.strerror(-n))
        self.outq, self.sndbuf = int(outq[0]), int(sndbuf[0])
        return n

    def queued(self) -> int:
        return self.outq

    def capacity(self) -> int:
        return self.sndbuf // 2  # the share of the buffer's memory that is payload, roughly

    def shutdown_write(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise

    def abort(self) -> None:
        if not self.aborted and self.sock.fileno() >= 0:
            self.aborted = True
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class GuestWire:
    """A connection's way to the guest: frames into the outbox of its pair;
    data segments as entries the native side fills from the socket."""

    def __init__(self, stack: UserStack, template: Template, pair: int, native: Any) -> None:
        self.stack = stack
        self.template = template
        self.pair = pair
        self.native = native
        self.rsts = 0

    def room(self) -> int:
        box = self.stack.outboxes[self.stack.home(self.pair)]
        return max(0, min(MAX_BURST, box.limit - len(box.frames) - OUTBOX_RESERVE))

    def segment(
        self, flags: int, seq: int, ack: int, window: int, payload: bytes, options: bytes
    ) -> None:
        if flags & RST:
            self.rsts += 1
        frame = self.template.frame(flags, seq, ack, window, payload, options)
        self.stack.to_guest(frame, self.pair)

    def data(
        self, flags: int, seq: int, ack: int, window: int, length: int, seg: int, mss: int
    ) -> None:
        box = self.stack.outboxes[self.stack.home(self.pair)]
        queued = box.put_tcp(self.native, seq, ack, window, flags, length, seg, mss)
        missing = -(-length // seg) - queued
        if missing:
            self.stack.drops["rx_outbox_full"] += missing


@dataclass(eq=False)
class TcpFlow:
    key: Key
    sock: socket.socket
    host: HostSocket
    wire: GuestWire
    conn: TcpConn
    target: str  # the host-side peer, for status
    inbound: bool
    ep: select.epoll
    mask: int = 0
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    timer: trio.CancelScope | None = None
    released: bool = False


class TcpFlows:
    def __init__(self, stack: UserStack) -> None:
        self.stack = stack
        self.flows: dict[Key, TcpFlow] = {}
        self.listeners = Listeners("tcp", self._listen_socket, self._accept)
        self.stats: Counter[str] = Counter()
        self.no_peek_off = False  # tests: the path of kernels without SO_PEEK_OFF for TCP
        # connections the native TX path may send guest data for (usertcp.h)
        self.table = lib.tn_ttable_new()
        if self.table == ffi.NULL:
            raise MemoryError("tcp connection table")
        self.utable = stack.fast.table  # whose epoll sets watch the sockets for C
        stack.fast.table.tcp = self.table
        for pair, box in enumerate(stack.outboxes):  # where native ACKs go
            lib.tn_ttable_set_out(self.table, pair, box.cdata)
        self.by_native: dict[int, TcpFlow] = {}
        self.fast_took = ffi.new("struct tn_tcpc *[]", FAST_TAKE)
        self.sync = ffi.new("struct tn_tcpc_sync *")
        self.state = ffi.new("struct tn_tcpc_state *")

    # ---- guest segments ----------------------------------------------------------

    def from_guest(self, pkt: P.Packet, pair: int) -> None:
        seg = parse_segment(pkt)
        key: Key = (pkt.version, pkt.src, pkt.dst, pkt.sport, pkt.dport)
        flow = self.flows.get(key)
        if flow is None:
            if seg.flags & (SYN | ACK | RST) == SYN:
                self._open(key, seg, pair)
            elif not seg.flags & RST:
                self._rst_unknown(pkt, seg, pair)
            return
        flow.wire.pair = self.stack.home(pair)
        self._guard(flow, lambda now: flow.conn.on_segment(seg, now))

    def take_fast(self) -> None:
        """Connections the native paths listed for Python: the TX path sent
        guest data for them (they owe the guest an ACK; ``_guard`` brings
        ``rcv_nxt`` up to date), or host data arrived that C left to Python
        (``tn_tcp_ready``: the end of the stream, a full outbox, a moved pair,
        a retransmission timer to arm)."""
        while n := int(lib.tn_ttable_take(self.table, self.fast_took, FAST_TAKE)):
            for i in range(n):
                flow = self.by_native.get(_addr(self.fast_took[i]))
                if flow is not None:
                    self._guard(flow, flow.conn.ack_taken)
            if n < FAST_TAKE:
                break

    def _rst_unknown(self, pkt: P.Packet, seg: Segment, pair: int) -> None:
        """RFC 9293 §3.10.7.1: a segment for no connection gets a reset."""
        if seg.flags & ACK:
            seq, ack, flags = seg.ack, 0, RST
        else:
            seq, ack, flags = 0, (seg.seq + seg.seg_len) & 0xFFFFFFFF, RST | ACK
        frame = P.tcp_frame(
            self.stack.guest_dst_mac, self.stack.cfg.our_mac, pkt.dst, pkt.src, pkt.dport,
            pkt.sport, seq, ack, flags, 0,
        )  # fmt: skip
        self.stats["rst_no_connection"] += 1
        self.stack.to_guest(frame, pair)

    def _open(self, key: Key, seg: Segment, pair: int) -> None:
        gdst, gdport = key[2], key[4]
        if len(self.flows) >= MAX_TCP_FLOWS or self.stack.nursery is None:
            raise P.Drop("tcp_too_many_flows")
        try:
            target = host_target(self.stack.cfg, gdst, gdport)
        except Unroutable as exc:
            raise P.Drop(f"tcp_{exc.reason}") from None
        family = socket.AF_INET if isinstance(target.address, IPv4Address) else socket.AF_INET6
        sock = self._socket(family)
        flow = self._flow(key, sock, str(target), pair, inbound=False)
        flow.conn.guest_syn(seg)
        self.stats["opened"] += 1
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, flow.conn.mss)

        def start(now: float) -> None:
            try:
                sock.connect(target.sockaddr)
            except BlockingIOError:
                self._watch(flow, EP_CONNECT)
                return
            except OSError as exc:
                self._connect_failed(flow, exc.errno or 0)
                return
            flow.conn.connected(now)

        self._guard(flow, start)
        self.stack.nursery.start_soon(self._serve, flow)

    def _socket(self, family: int) -> socket.socket:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as exc:
            log.warning("user stack: cannot open a TCP socket: %s", exc)
            raise P.Drop("tcp_socket_error") from None
        self._tune(sock)
        return sock

    @staticmethod
    def _tune(sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _flow(
        self, key: Key, sock: socket.socket, target: str, pair: int, *, inbound: bool
    ) -> TcpFlow:
        version, gsrc, gdst, gsport, gdport = key
        try:
            ep = select.epoll(1)
        except OSError:
            sock.close()
            raise P.Drop("tcp_no_fds") from None
        cfg = self.stack.cfg
        tmpl = Template(self.stack.guest_dst_mac, cfg.our_mac, gdst, gsrc, gdport, gsport)
        iss = int.from_bytes(os.urandom(4), "big")
        header = tmpl.header()
        native = lib.tn_tcpc_new(sock.fileno(), header, len(header), (iss + 1) & 0xFFFFFFFF,
                                 int(self.no_peek_off))  # fmt: skip
        if native == ffi.NULL:
            ep.close()
            sock.close()
            raise P.Drop("tcp_no_memory")
        addr_len = 4 if version == 4 else 16
        rc = lib.tn_ttable_add(self.table, native, int(version == 6), gsrc.packed[:addr_len],
                               gdst.packed[:addr_len], gsport, gdport)  # fmt: skip
        if rc < 0:
            lib.tn_tcpc_close(native)
            ep.close()
            sock.close()
            raise P.Drop("tcp_table_full")
        wire = GuestWire(self.stack, tmpl, self.stack.home(pair), native)
        host = HostSocket(sock, native)
        mss_limit = min(cfg.mtu - (40 if version == 4 else 60), 0xFFFF)
        conn = TcpConn(host, wire, iss=iss, mss_limit=mss_limit, now=trio.current_time())
        conn.gso = self.stack.guest_tso[version]
        flow = TcpFlow(key, sock, host, wire, conn, target, inbound, ep)
        self.flows[key] = flow
        self.by_native[_addr(native)] = flow
        return flow

    def _connect_failed(self, flow: TcpFlow, err: int) -> None:
        self.stats["connect_failed"] += 1
        self.stats[f"connect_{errno.errorcode.get(err, 'error')}"] += 1
        flow.conn.reset("connect_failed", abort_host=False)

    # ---- the connection's task -----------------------------------------------------

    def _watch(self, flow: TcpFlow, mask: int) -> None:
        if flow.mask == mask or flow.sock.fileno() < 0:
            return
        if flow.mask:
            flow.ep.modify(flow.sock.fileno(), mask)
        else:
            flow.ep.register(flow.sock.fileno(), mask)
        flow.mask = mask

    async def _serve(self, flow: TcpFlow) -> None:
        conn = flow.conn
        try:
            with flow.scope:
                while not conn.closed:
                    with trio.CancelScope(deadline=conn.next_deadline()) as timer:
                        flow.timer = timer
                        await trio.lowlevel.wait_readable(flow.ep.fileno())
                    flow.timer = None
                    events = 0
                    for _fd, ev in flow.ep.poll(0):
                        events |= ev
                    if events:
                        self._guard(flow, functools.partial(self._host_events, flow, events))
                    if not conn.closed and trio.current_time() >= conn.next_deadline():
                        self._guard(flow, conn.on_timer)
        finally:
            self._release(flow)

    def _host_events(self, flow: TcpFlow, events: int, now: float) -> None:
        """What the epoll set reported for the socket."""
        conn = flow.conn
        if conn.state is State.CONNECTING:
            err = flow.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._connect_failed(flow, err)
            elif events & (select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR):
                conn.connected(now)
                self._watch(flow, EP_DATA)
            return
        if events & select.EPOLLERR:
            err = flow.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
        if events & select.EPOLLOUT:
            conn.on_writable(now)
        if events & (select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP):
            conn.on_readable(now)

    def _guard(self, flow: TcpFlow, step: Any) -> None:
        """Run one step of the connection; a host socket error resets it
        towards the guest.  Then follow up: the epoll mask, the timer, the
        table entry of a closed connection."""
        conn = flow.conn
        now = trio.current_time()
        native = flow.host.native
        try:
            if native != ffi.NULL:  # what the native TX path sent, and acknowledged
                sync = self.sync
                lib.tn_tcpc_pause(native, sync)
                if sync.took:  # replies follow the pair of the guest's last segment
                    flow.wire.pair = self.stack.home(int(sync.pair))
                acked = int(sync.acked) if sync.acks else None
                conn.took(sync.rcv_nxt, now, acked, sync.window, sync.rcv_edge)
                if sync.moved:  # the guest's ACKs, and the data sent after them
                    conn.acked_natively(sync.snd_una, sync.snd_nxt, sync.guest_window, now)
            step(now)
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, "error")
            self.stats[f"host_{name}"] += 1
            conn.reset(f"host_{name}", abort_host=False)
        except Exception:  # a bug: this connection goes, the stack stays
            log.exception("tcp flow %s in %s", flow.key, conn.state.value)
            self.stats["internal_error"] += 1
            with contextlib.suppress(Exception):
                conn.reset("internal_error")
            conn.state = State.CLOSED
        if conn.closed:
            if self.flows.get(flow.key) is flow:
                del self.flows[flow.key]
            if flow.timer is not None:
                flow.timer.deadline = float("-inf")
            return
        native_data = native != ffi.NULL and self._resume(flow, native)
        if conn.state is not State.CONNECTING:
            data = EP_DATA & ~select.EPOLLIN if native_data else EP_DATA
            self._watch(flow, data | (select.EPOLLOUT if conn.want_write else 0))
        if flow.timer is not None:
            flow.timer.deadline = conn.next_deadline()

    def _resume(self, flow: TcpFlow, native: Any) -> bool:
        """Hand the connection back to the native paths (``tn_tcpc_resume``).
        True when C also takes the host's data as it arrives: the push is
        allowed, the connection's pair has its RX ring served (the task or
        worker that runs ``tn_user_rx``) and the socket is in that pair's
        epoll set (``tn_utable_tcp_watch``, which re-arms it: what arrived
        while Python held the connection is looked at at once); Python then
        does not wake for it."""
        conn = flow.conn
        st = self.state
        st.rcv_nxt, st.snd_una, st.snd_nxt = conn.rcv_nxt, conn.snd_una, conn.snd_nxt
        st.rcv_edge, st.mss, st.max_snd_wnd = conn.rcv_edge, conn.mss, conn.max_snd_wnd
        st.seg = conn.seg
        st.window_field, st.our_field = conn.window_field, conn.wnd_sent >> conn.ws_to_guest
        st.ws_to, st.ws_from = conn.ws_to_guest, conn.ws_from_guest
        st.data = conn.state is State.ESTABLISHED
        st.ack, st.push = conn.native_ack, conn.native_push
        st.pair, st.timer = flow.wire.pair, conn.rto_at is not None
        lib.tn_tcpc_resume(native, st)
        return (
            bool(st.push)
            and self.stack.rx_served[st.pair] > 0
            and lib.tn_utable_tcp_watch(self.utable, native, st.pair) == 0
        )

    def _release(self, flow: TcpFlow) -> None:
        if flow.released:
            return
        flow.released = True
        if self.flows.get(flow.key) is flow:
            del self.flows[flow.key]
        conn = flow.conn
        if not conn.closed:
            with contextlib.suppress(OSError):
                conn.reset("shutdown")  # the stack stops: both peers are told
        self.stats["released"] += 1
        self.stats[f"reset_{conn.reset_reason}" if conn.reset_reason else "closed"] += 1
        for name in (
            "retransmits",
            "fast_retransmits",
            "sack_resent",
            "bytes_to_guest",
            "bytes_from_guest",
        ):
            self.stats[name] += getattr(conn, name)
        self.stats["rst_to_guest"] += flow.wire.rsts
        flow.wire.rsts = 0
        self.stats["held_past_gap"] += conn.reasm.queued
        self.stats["held_refused"] += conn.reasm.refused
        conn.reasm.clear()
        if flow.ep.fileno() >= 0:
            trio.lowlevel.notify_closing(flow.ep.fileno())
            flow.ep.close()
        if flow.host.native != ffi.NULL:
            lib.tn_utable_tcp_unwatch(self.utable, flow.host.native)  # before the fd closes
            lib.tn_ttable_del(self.table, flow.host.native)
            self.by_native.pop(_addr(flow.host.native), None)
        flow.host.close_native()
        if flow.sock.fileno() >= 0:
            flow.sock.close()

    # ---- inbound forwarding ----------------------------------------------------------

    async def listen(self, nursery: trio.Nursery) -> None:
        """Listen on every ``-t`` port; accepted connections become flows."""
        await self.listeners.start(self.stack.cfg, nursery)

    @staticmethod
    def _listen_socket(point: ListenPoint) -> socket.socket:
        sock = socket.socket(point.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if point.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((point.addr, point.port))
            sock.listen(LISTEN_BACKLOG)
        except OSError:
            sock.close()
            raise
        return sock

    async def _accept(self, listener: socket.socket, guest_port: int) -> None:
        while True:
            try:
                sock, peer = listener.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(listener)
                continue
            except OSError as exc:  # ECONNABORTED, or out of fds (EMFILE): back off
                log.debug("tcp accept: %s", exc)
                self.stats["accept_errors"] += 1
                await trio.sleep(ACCEPT_BACKOFF)
                continue
            try:
                self._inbound(sock, peer, guest_port)
            except P.Drop as drop:
                sock.close()
                self.stack.drops[drop.reason] += 1

    def _inbound(self, sock: socket.socket, peer: Any, guest_port: int) -> None:
        sock.setblocking(False)
        host_addr = ip_address(peer[0].split("%")[0])
        gpeer = guest_view(self.stack.cfg, host_addr)
        if gpeer is None:
            raise P.Drop("tcp_inbound_family")
        gaddr = self.stack.guest_address(gpeer.version)
        if gaddr is None:
            raise P.Drop("tcp_inbound_family")
        key: Key = (gpeer.version, gaddr, gpeer, guest_port, peer[1])
        if key in self.flows or len(self.flows) >= MAX_TCP_FLOWS or self.stack.nursery is None:
            raise P.Drop("tcp_inbound_busy")
        self._tune(sock)
        flow = self._flow(key, sock, f"{host_addr}:{peer[1]}", self.stack.pair_for_key(key),
                          inbound=True)  # fmt: skip
        self.stats["opened"] += 1
        self.stats["inbound"] += 1
        flow.conn.open(trio.current_time())
        self._watch(flow, EP_DATA)
        self.stack.nursery.start_soon(self._serve, flow)

    # ---- pairs, shutdown, status ---------------------------------------------------

    def rehome(self) -> int:
        moved = 0
        for flow in self.flows.values():
            if flow.wire.pair >= self.stack.active_pairs:
                flow.wire.pair = self.stack.pair_for_key(flow.key)
                moved += 1
                if flow.host.native != ffi.NULL and not flow.mask & select.EPOLLIN:
                    # C took its host data: from the new pair's epoll set now,
                    # and Python watches it too until its next step (is that
                    # pair's RX served yet?)
                    lib.tn_utable_tcp_watch(self.utable, flow.host.native, flow.wire.pair)
                    self._watch(flow, flow.mask | select.EPOLLIN)
        return moved

    def close_all(self) -> None:
        for flow in list(self.flows.values()):
            flow.scope.cancel()
            self._release(flow)
        self.flows.clear()
        self.listeners.close_all()

    def close(self) -> None:
        """Process exit (every connection released): free the native table."""
        if self.table != ffi.NULL:
            self.stack.fast.table.tcp = ffi.NULL
            lib.tn_ttable_free(self.table)
            self.table = ffi.NULL

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "proto": "tcp" if f.key[0] == 4 else "tcp6",
                "guest_port": f.key[3],
                "remote": f"{f.key[2]}:{f.key[4]}",
                "host_peer": f.target,
                "inbound": f.inbound,
                "state": f.conn.state.value,
                "pair": f.wire.pair,
                "bytes_to_guest": f.conn.bytes_to_guest,
                "bytes_from_guest": f.conn.bytes_from_guest,
                "retransmits": f.conn.retransmits,
                "in_flight": (f.conn.snd_nxt - f.conn.snd_una) & 0xFFFFFFFF,
                "guest_window": f.conn.snd_wnd,
                "window_to_guest": f.conn.wnd_sent,
                "held_past_gap": f.conn.reasm.bytes,
            }
            for f in self.flows.values()
        ]

    def counters(self) -> dict[str, int]:
        native = ffi.new("struct tn_tcpc_stats *")
        lib.tn_tcpc_stats_get(native)
        data = {
            f"data_{name}": int(getattr(native, name))
            for name in ("laid", "peeks", "stale", "trimmed", "short_peeks", "peek_errors")
        }
        data["native_tx_frames"] = int(lib.tn_ttable_fast_frames(self.table))
        data["native_tx_bytes"] = int(lib.tn_ttable_fast_bytes(self.table))
        data["native_tx_sends"] = int(lib.tn_ttable_fast_sends(self.table))
        data["native_tx_partial"] = int(lib.tn_ttable_fast_partial(self.table))
        data["native_acks"] = int(lib.tn_ttable_native_acks(self.table))
        data["acks_to_python"] = int(lib.tn_ttable_acks_to_python(self.table))
        data["native_guest_acks"] = int(lib.tn_ttable_guest_acks(self.table))
        data["native_push_segments"] = int(lib.tn_ttable_push_segments(self.table))
        data["native_host_ready"] = int(lib.tn_ttable_host_ready(self.table))
        return {"connections": len(self.flows), **self.stats, **data}


def _addr(native: Any) -> int:
    return int(ffi.cast("uintptr_t", native))
