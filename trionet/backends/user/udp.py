"""UDP flows: a connected host socket per flow, datagrams moved natively.

Python sets a flow up and tears it down; the native fast path
(``fastpath.py``) moves every datagram after the first both ways.

- **Guest-initiated**: the guest's first datagram to (A, P) opens a
  non-blocking UDP socket bound to the guest's source port where that port is
  free (any port otherwise), connected to the host-side target of (A, P)
  (``fwd.host_target``: the gateway is the host's loopback, DNS to the
  advertised resolver goes to the upstream), registered with the fast path
  under the key the guest's frames carry and with the headers of its replies.
- **Inbound** (``-u SPEC``): trionet listens on the host ports; the first
  datagram from a new sender opens a socket bound to the same local address
  and port (``SO_REUSEADDR``) and connected to the sender, so the kernel
  hands that sender's next datagrams straight to it; the flow starts on a
  pair chosen by hash over the active pairs and follows the guest's replies.
- **Expiry**: a flow idle for ``udp_timeout`` seconds (``udp_stream_timeout``
  once both sides spoke) is closed; one timer per flow, nothing polls.
- **Errors**: ICMP errors the host receives for a flow (``IP_RECVERR``) are
  translated into ICMP errors to the guest quoting its datagram.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Address, ip_address
from typing import TYPE_CHECKING, Any

import trio

from trionet.backends.user import packets as P
from trionet.backends.user.fwd import Target, Unroutable, guest_view, host_target
from trionet.backends.user.listeners import Listeners, ListenPoint
from trionet.native import lib

if TYPE_CHECKING:
    from trionet.backends.user.stack import UserStack

log = logging.getLogger(__name__)

SOL_IP, SOL_IPV6 = 0, 41
IP_RECVERR, IPV6_RECVERR = 11, 25
SO_EE_ORIGIN_ICMP, SO_EE_ORIGIN_ICMP6 = 2, 3
MSG_ERRQUEUE = 0x2000
ICMP_QUOTE = {4: 548, 6: 1232}  # bytes of the offending packet an ICMP error carries
MAX_DATAGRAM = 65507

Key = tuple[int, P.IPAddress, P.IPAddress, int, int]  # version, gsrc, gdst, gsport, gdport


@dataclass(eq=False)
class UdpFlow:
    key: Key
    sock: socket.socket
    slot: int
    target: str  # the host-side peer, for status
    inbound: bool
    stamp: float  # Trio time of the last activity Python knows of
    seen: int = 0  # the native counters' total when ``stamp`` was taken
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


def udp_socket(family: int) -> socket.socket:
    """A non-blocking UDP socket that reports ICMP errors (IPV6_V6ONLY for IPv6)."""
    sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(SOL_IPV6, IPV6_RECVERR, 1)
    else:
        sock.setsockopt(SOL_IP, IP_RECVERR, 1)
    return sock


class UdpFlows:
    def __init__(self, stack: UserStack) -> None:
        self.stack = stack
        self.fast = stack.fast
        self.flows: dict[Key, UdpFlow] = {}
        self.by_slot: dict[int, UdpFlow] = {}
        self.listeners = Listeners("udp", self._listen_socket, self._listener)
        self.opened = 0
        self.expired = 0
        self.icmp_errors = 0

    # ---- guest-initiated -------------------------------------------------------

    def from_guest(self, pkt: P.Packet, pair: int) -> None:
        """A guest datagram the native path did not take: the first of a flow
        (or one that raced its registration)."""
        key: Key = (pkt.version, pkt.src, pkt.dst, pkt.sport, pkt.dport)
        flow = self.flows.get(key)
        if flow is None:
            try:
                target = host_target(self.stack.cfg, pkt.dst, pkt.dport)
            except Unroutable as exc:
                raise P.Drop(f"udp_{exc.reason}") from None
            flow = self._open(key, target, pkt.sport, pair, pkt.ttl)
        else:
            self.move(flow, pair)
        self.fast.spoke(flow.slot, lib.TN_UFLOW_GUEST_SPOKE)
        try:
            flow.sock.send(pkt.payload)
            self.stack.handled["udp_first_datagram"] += 1
        except BlockingIOError:
            raise P.Drop("udp_socket_full") from None
        except OSError as exc:
            log.debug("udp flow %s: %s", key, exc)
            self._translate_errors(flow)
        flow.stamp = trio.current_time()

    def _open(self, key: Key, target: Target, sport: int, pair: int, ttl: int) -> UdpFlow:
        family = socket.AF_INET if isinstance(target.address, IPv4Address) else socket.AF_INET6
        sock = self._socket(family)
        try:
            # the guest's TTL / hop limit goes on with its datagrams
            if family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
            else:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, ttl)
            self._bind_port(sock, family, sport)
            sock.connect(target.sockaddr)
        except OSError as exc:
            sock.close()
            raise P.Drop(f"udp_connect_{errno.errorcode.get(exc.errno or 0, 'error')}") from None
        _version, gsrc, gdst, gsport, gdport = key
        tmpl = P.udp_template(
            self.stack.guest_dst_mac, self.stack.cfg.our_mac, gdst, gsrc, gdport, gsport
        )
        return self._register(key, sock, tmpl, self.stack.home(pair), str(target), inbound=False)

    def _socket(self, family: int) -> socket.socket:
        try:
            return udp_socket(family)
        except OSError as exc:
            log.warning("user stack: cannot open a UDP socket: %s", exc)
            raise P.Drop("udp_socket_error") from None

    @staticmethod
    def _bind_port(sock: socket.socket, family: int, port: int) -> None:
        """Keep the guest's source port where it is free on the host."""
        any_addr = "0.0.0.0" if family == socket.AF_INET else "::"
        try:
            sock.bind((any_addr, port))
        except OSError:
            sock.bind((any_addr, 0))

    def _register(
        self, key: Key, sock: socket.socket, tmpl: bytes, pair: int, target: str, *, inbound: bool
    ) -> UdpFlow:
        nursery = self.stack.nursery
        if nursery is None:
            sock.close()
            raise P.Drop("udp_not_running")
        version, gsrc, gdst, gsport, gdport = key
        slot = self.fast.add(
            fd=sock.fileno(), v6=version == 6, pair=pair, template=tmpl,
            gsrc=gsrc.packed, gdst=gdst.packed, gsport=gsport, gdport=gdport,
        )  # fmt: skip
        if slot < 0:
            sock.close()
            raise P.Drop("udp_too_many_flows")
        flow = UdpFlow(key, sock, slot, target, inbound, trio.current_time())
        self.flows[key] = flow
        self.by_slot[slot] = flow
        self.opened += 1
        nursery.start_soon(self._expire, flow)
        return flow

    # ---- inbound forwarding ----------------------------------------------------

    async def listen(self, nursery: trio.Nursery) -> None:
        """Bind every ``-u`` port; each listener's new senders become flows."""
        await self.listeners.start(self.stack.cfg, nursery)

    @staticmethod
    def _listen_socket(point: ListenPoint) -> socket.socket:
        sock = udp_socket(point.family)  # its OSError (errno kept) goes to Listeners
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((point.addr, point.port))
        except OSError:
            sock.close()
            raise
        return sock

    async def _listener(self, sock: socket.socket, guest_port: int) -> None:
        while True:
            try:
                data, sender = sock.recvfrom(MAX_DATAGRAM + 1)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            except OSError:
                # an ICMP error for a datagram sent from this port: nothing to tell
                self._drain_errors(sock)
                continue
            try:
                self._inbound(sock, data, sender, guest_port)
            except P.Drop as drop:
                self.stack.drops[drop.reason] += 1

    def _inbound(self, listener: socket.socket, data: bytes, sender: Any, guest_port: int) -> None:
        cfg = self.stack.cfg
        host_addr = ip_address(sender[0].split("%")[0])
        peer = guest_view(cfg, host_addr)
        if peer is None:
            raise P.Drop("udp_inbound_family")
        gaddr = self.stack.guest_address(peer.version)
        if gaddr is None:
            raise P.Drop("udp_inbound_family")
        key: Key = (peer.version, gaddr, peer, guest_port, sender[1])
        flow = self.flows.get(key)
        if flow is None:
            local = listener.getsockname()
            sock = self._socket(listener.family)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(local[:2])
                sock.connect(sender[:2])
            except OSError:
                sock.close()
                raise P.Drop("udp_inbound_socket") from None
            tmpl = P.udp_template(
                self.stack.guest_dst_mac, cfg.our_mac, peer, gaddr, sender[1], guest_port
            )
            pair = self.stack.pair_for_key(key)
            flow = self._register(key, sock, tmpl, pair, f"{host_addr}:{sender[1]}", inbound=True)
        self.fast.spoke(flow.slot, lib.TN_UFLOW_HOST_SPOKE)
        frame = P.udp_frame(
            self.stack.guest_dst_mac, cfg.our_mac, peer, gaddr, sender[1], guest_port, data
        )
        self.stack.handled["udp_inbound_first"] += 1
        self.stack.to_guest(frame, int(self.fast.flow(flow.slot).pair))
        flow.stamp = trio.current_time()

    # ---- flow life ---------------------------------------------------------------

    def move(self, flow: UdpFlow, pair: int) -> None:
        pair = self.stack.home(pair)
        if int(self.fast.flow(flow.slot).pair) != pair:
            self.fast.move(flow.slot, pair)

    def rehome(self) -> int:
        moved = 0
        for flow in self.flows.values():
            if int(self.fast.flow(flow.slot).pair) >= self.stack.active_pairs:
                self.fast.move(flow.slot, self.stack.pair_for_key(flow.key))
                moved += 1
        return moved

    def _last_activity(self, flow: UdpFlow) -> float:
        """Fold what the native path saw into the flow's Trio-time stamp."""
        c = self.fast.flow(flow.slot)
        total = int(c.tx_packets + c.rx_packets)
        if total != flow.seen:
            flow.seen = total
            age = max(0, int(lib.tn_flow_now()) - int(c.last_active))
            flow.stamp = max(flow.stamp, trio.current_time() - age)
        return flow.stamp

    def _timeout(self, flow: UdpFlow) -> float:
        both = lib.TN_UFLOW_GUEST_SPOKE | lib.TN_UFLOW_HOST_SPOKE
        c = self.fast.flow(flow.slot)
        cfg = self.stack.cfg
        return cfg.udp_stream_timeout if c.spoke & both == both else cfg.udp_timeout

    async def _expire(self, flow: UdpFlow) -> None:
        try:
            with flow.scope:
                while True:
                    deadline = self._last_activity(flow) + self._timeout(flow)
                    if trio.current_time() >= deadline:
                        self.expired += 1
                        return
                    await trio.sleep_until(deadline)
        finally:
            self._close(flow)

    def _close(self, flow: UdpFlow) -> None:
        if self.flows.get(flow.key) is flow:
            del self.flows[flow.key]
            del self.by_slot[flow.slot]
            self.fast.remove(flow.slot)
        if flow.sock.fileno() >= 0:
            trio.lowlevel.notify_closing(flow.sock)
            flow.sock.close()

    def close_all(self) -> None:
        for flow in list(self.flows.values()):
            flow.scope.cancel()
            self._close(flow)
        self.listeners.close_all()

    # ---- host ICMP errors → guest ------------------------------------------------

    def errors(self) -> None:
        """Flows the native path marked: translate their queued ICMP errors."""
        for slot in self.fast.attention():
            flow = self.by_slot.get(slot)
            if flow is None:
                continue
            self.fast.flow(slot).err = 0
            self._translate_errors(flow)

    def _translate_errors(self, flow: UdpFlow) -> None:
        for err in self._drain_errors(flow.sock):
            self._icmp_to_guest(flow, *err)

    @staticmethod
    def _drain_errors(sock: socket.socket) -> list[tuple[int, int, bytes]]:
        """(ICMP type, code, payload of the datagram that caused it) for each
        error queued on ``sock``."""
        out = []
        for _ in range(16):
            try:
                data, anc, _flags, _addr = sock.recvmsg(MAX_DATAGRAM, 512, MSG_ERRQUEUE)
            except OSError:
                break
            for level, kind, blob in anc:
                if (level, kind) not in ((SOL_IP, IP_RECVERR), (SOL_IPV6, IPV6_RECVERR)):
                    continue
                if len(blob) < 16:
                    continue
                _errno, origin, icmp_type, code = struct.unpack_from("=IBBB", blob)
                if origin in (SO_EE_ORIGIN_ICMP, SO_EE_ORIGIN_ICMP6):
                    out.append((icmp_type, code, data))
        return out

    def _icmp_to_guest(self, flow: UdpFlow, icmp_type: int, code: int, data: bytes) -> None:
        version, gsrc, gdst, gsport, gdport = flow.key
        cfg = self.stack.cfg
        quoted = P.ip_packet(gsrc, gdst, P.IPPROTO_UDP, P.udp(gsrc, gdst, gsport, gdport, data))
        # both families: type, code, checksum, 4 unused bytes, then the quote
        rest = bytes(4) + quoted[: ICMP_QUOTE[version]]
        frame = P.icmp_frame(
            self.stack.guest_dst_mac, cfg.our_mac, gdst, gsrc, icmp_type, code, rest
        )
        self.icmp_errors += 1
        self.stack.to_guest(frame, int(self.fast.flow(flow.slot).pair))

    # ---- status ----------------------------------------------------------------

    def describe(self) -> list[dict[str, Any]]:
        out = []
        for f in self.flows.values():
            c = self.fast.flow(f.slot)
            out.append(
                {
                    "proto": "udp" if f.key[0] == 4 else "udp6",
                    "guest_port": f.key[3],
                    "remote": f"{f.key[2]}:{f.key[4]}",
                    "host_peer": f.target,
                    "inbound": f.inbound,
                    "pair": int(c.pair),
                    "tx_packets": int(c.tx_packets),
                    "rx_packets": int(c.rx_packets),
                }
            )
        return out

    def counters(self) -> dict[str, int]:
        return {
            "flows": len(self.flows),
            "opened": self.opened,
            "expired": self.expired,
            "icmp_errors_to_guest": self.icmp_errors,
            **self.fast.counters(),
        }
