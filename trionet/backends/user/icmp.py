"""ICMP and ICMPv6 echo through unprivileged ping sockets.

A guest echo request becomes a flow keyed by (family, guest source,
destination, the guest's identifier): one connected ping socket
(``SOCK_DGRAM``/``IPPROTO_ICMP``), whose identifier the kernel picks; replies
get the guest's identifier back and go to the pair of the guest's last
request.  A flow idle for ``ICMP_TIMEOUT`` seconds is closed.

Ping sockets need the process's group in ``net.ipv4.ping_group_range`` (it
governs IPv6 too).  Where that forbids them, one warning is logged at start,
echo requests to the gateway are answered by trionet itself, and every other
one is dropped and counted (``icmp_no_ping_socket``): never silently lost.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import TYPE_CHECKING, Any

import trio

from trionet.backends.user import packets as P
from trionet.backends.user.fwd import Unroutable, host_target

if TYPE_CHECKING:
    from trionet.backends.user.stack import UserStack

log = logging.getLogger(__name__)

ICMP_TIMEOUT = 60.0
ECHO_REPLY = {4: 0, 6: 129}
ECHO_REQUEST = {4: 8, 6: 128}
MAX_ICMP_FLOWS = 1024

Key = tuple[int, P.IPAddress, P.IPAddress, int]


@dataclass(eq=False)
class IcmpFlow:
    key: Key
    sock: socket.socket
    pair: int
    deadline: float
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    requests: int = 0
    replies: int = 0


class IcmpFlows:
    def __init__(self, stack: UserStack) -> None:
        self.stack = stack
        self.flows: dict[Key, IcmpFlow] = {}
        self.available: bool | None = None  # ping sockets allowed (None: not probed)

    def probe(self) -> None:
        """Can this process open ping sockets?  Warn once when it cannot."""
        if self.available is not None:
            return
        try:
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP).close()
            self.available = True
        except OSError as exc:
            self.available = False
            log.warning(
                "ping sockets are not allowed (%s): net.ipv4.ping_group_range does not include "
                "this process's group; echo requests to the gateway are answered by trionet, "
                "others are dropped and counted as icmp_no_ping_socket",
                exc.strerror,
            )

    def _is_gateway(self, pkt: P.Packet) -> bool:
        cfg = self.stack.cfg
        if pkt.version == 4:
            v4 = cfg.v4
            return v4 is not None and pkt.dst in (v4.gateway, v4.map_host_loopback)
        v6 = cfg.v6
        return v6 is not None and pkt.dst in (v6.gateway, v6.link_local, v6.map_host_loopback)

    def from_guest(self, pkt: P.Packet, pair: int) -> None:
        if len(pkt.l4) < 8:
            raise P.Drop("short_icmp")
        ident, seq = struct.unpack_from("!HH", pkt.l4, 4)
        if not self.available:
            if self._is_gateway(pkt):
                self._reply(pkt, pair, ident, pkt.l4[8:], seq)
                self.stack.handled["icmp_local_echo"] += 1
                return
            raise P.Drop("icmp_no_ping_socket")
        key: Key = (pkt.version, pkt.src, pkt.dst, ident)
        flow = self.flows.get(key) or self._open(key, pkt, pair)
        flow.pair = self.stack.home(pair)
        flow.deadline = trio.current_time() + ICMP_TIMEOUT
        try:
            # the kernel fills in the identifier and the checksum
            flow.sock.send(pkt.l4[:2] + b"\0\0" + pkt.l4[4:])
            flow.requests += 1
            self.stack.handled["icmp_echo"] += 1
        except BlockingIOError:
            raise P.Drop("icmp_socket_full") from None
        except OSError:
            raise P.Drop("icmp_send_error") from None

    def _open(self, key: Key, pkt: P.Packet, pair: int) -> IcmpFlow:
        if len(self.flows) >= MAX_ICMP_FLOWS or self.stack.nursery is None:
            raise P.Drop("icmp_too_many_flows")
        try:
            target = host_target(self.stack.cfg, pkt.dst, 0)
        except Unroutable as exc:
            raise P.Drop(f"icmp_{exc.reason}") from None
        v4 = isinstance(target.address, IPv4Address)
        family = socket.AF_INET if v4 else socket.AF_INET6
        proto = socket.IPPROTO_ICMP if v4 else socket.IPPROTO_ICMPV6
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK, proto)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise P.Drop("icmp_no_ping_socket") from None
            raise P.Drop("icmp_socket_error") from None
        try:
            sock.connect((str(target.address), 0))  # datagram connect: immediate
        except OSError:
            sock.close()
            raise P.Drop("icmp_unreachable") from None
        flow = IcmpFlow(key, sock, self.stack.home(pair), trio.current_time() + ICMP_TIMEOUT)
        self.flows[key] = flow
        self.stack.nursery.start_soon(self._serve, flow)
        return flow

    async def _serve(self, flow: IcmpFlow) -> None:
        """Replies back to the guest until the flow has been idle long enough."""
        version, gsrc, gdst, ident = flow.key
        try:
            with flow.scope:
                while True:
                    try:
                        data = flow.sock.recv(65535)
                    except BlockingIOError:
                        with trio.move_on_at(flow.deadline):
                            await trio.lowlevel.wait_readable(flow.sock)
                        if trio.current_time() >= flow.deadline:
                            return
                        continue
                    if len(data) < 8 or data[0] != ECHO_REPLY[version]:
                        continue
                    (seq,) = struct.unpack_from("!H", data, 6)
                    flow.replies += 1
                    self._send_reply(version, gdst, gsrc, flow.pair, ident, seq, data[8:])
        except OSError as exc:
            log.debug("icmp flow %s: %s", flow.key, exc)
        finally:
            if self.flows.get(flow.key) is flow:
                del self.flows[flow.key]
            _close(flow.sock)

    def _reply(self, pkt: P.Packet, pair: int, ident: int, data: bytes, seq: int) -> None:
        self._send_reply(pkt.version, pkt.dst, pkt.src, pair, ident, seq, data)

    def _send_reply(
        self, version: int, src: P.IPAddress, dst: P.IPAddress, pair: int, ident: int, seq: int,
        data: bytes,
    ) -> None:  # fmt: skip
        rest = struct.pack("!HH", ident, seq) + data
        frame = P.icmp_frame(
            self.stack.guest_dst_mac, self.stack.cfg.our_mac, src, dst, ECHO_REPLY[version], 0, rest
        )
        self.stack.to_guest(frame, pair)

    def rehome(self) -> int:
        moved = 0
        for flow in self.flows.values():
            if flow.pair >= self.stack.active_pairs:
                flow.pair = self.stack.pair_for_key(flow.key)
                moved += 1
        return moved

    def close_all(self) -> None:
        for flow in list(self.flows.values()):
            flow.scope.cancel()
            _close(flow.sock)
        self.flows.clear()

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "proto": "icmp" if f.key[0] == 4 else "icmpv6",
                "guest": str(f.key[1]),
                "remote": str(f.key[2]),
                "id": f.key[3],
                "pair": f.pair,
                "requests": f.requests,
                "replies": f.replies,
            }
            for f in self.flows.values()
        ]


def _close(sock: socket.socket) -> None:
    """Wake any task waiting on the socket, then close it (idempotent)."""
    if sock.fileno() >= 0:
        trio.lowlevel.notify_closing(sock)
        sock.close()
