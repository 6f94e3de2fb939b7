"""The user-mode stack of one VM: guest frames in, replies and host data out.

``UserStack.guest_frame`` takes one frame the guest transmitted on queue pair
``pair`` (what the native TX path did not handle itself: everything but
datagrams of known UDP flows) and dispatches it: ARP, DHCP, NDP and DHCPv6
are answered here, UDP and ICMP echo become flows backed by host sockets
(``udp.py``, ``icmp.py``).  Everything for the guest is put in the outbox of
the pair it belongs to: the request's pair for stateless answers, the flow's
pair (the pair of the guest's last frame for it) for flow data.

Nothing here raises on guest input: a frame the stack does not take is
dropped and counted by reason (``trionet status`` → ``user.drops``).
"""

from __future__ import annotations

import contextlib
import logging
import zlib
from collections import Counter
from typing import Any

import trio

from trionet.backends.user import packets as P
from trionet.backends.user.arp import handle_arp
from trionet.backends.user.config import UserConfig
from trionet.backends.user.dhcp import DhcpServer
from trionet.backends.user.dhcpv6 import handle_dhcpv6
from trionet.backends.user.fastpath import Outbox, SlowFrames, UdpFastPath
from trionet.backends.user.fwd import guest_address
from trionet.backends.user.icmp import IcmpFlows
from trionet.backends.user.ndp import handle_ndp, unsolicited_ra
from trionet.backends.user.tcp import TcpFlows
from trionet.backends.user.tcp_segment import superseded_acks
from trionet.backends.user.udp import UdpFlows
from trionet.net import features as F

log = logging.getLogger(__name__)

RA_INTERVAL = 600.0  # seconds between unsolicited router advertisements
OUTBOX_LIMIT = 1024  # frames waiting for one pair's RX ring before new ones are dropped
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
ICMP_ECHO_REQUEST = 8
ICMPV6_ECHO_REQUEST = 128
NDP_TYPES = (133, 135)  # router and neighbour solicitation
ICMPV6_QUIET = (130, 131, 132, 134, 136, 137, 143)  # MLD, RA, NA, redirect: nothing to say
DHCP_SERVER_PORT = 67
DHCPV6_SERVER_PORT = 547


class UserStack:
    def __init__(self, cfg: UserConfig, max_pairs: int) -> None:
        self.cfg = cfg
        self.max_pairs = max_pairs
        self.guest_mac: bytes | None = cfg.guest_mac
        self.guest_tso = {4: False, 6: False}
        self.seen: dict[int, P.IPAddress] = {}  # the guest's own address in use, by IP version
        self.outboxes = [Outbox(OUTBOX_LIMIT) for _ in range(max_pairs)]
        self.active_pairs = 1
        # pairs whose RX ring a task or worker serves (tn_user_rx runs): only
        # there does C take TCP host data as it arrives (TcpFlows._resume)
        self.rx_served = [0] * max_pairs
        self.drops: Counter[str] = Counter()
        self.handled: Counter[str] = Counter()
        self.dhcp = DhcpServer(cfg)
        self.fast = UdpFastPath()
        self.udp = UdpFlows(self)
        self.icmp = IcmpFlows(self)
        self.tcp = TcpFlows(self)
        self._announced = False
        self._slow: list[SlowFrames | None] = [None] * max_pairs
        self.nursery: trio.Nursery | None = None

    # ---- lifecycle -------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the host side for one VMM session: inbound forwards listen,
        flows live in this nursery; all of them are closed when it ends."""
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                self.icmp.probe()
                await self.udp.listen(nursery)
                await self.tcp.listen(nursery)
                if self.cfg.v6 is not None:
                    nursery.start_soon(self._advertise)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self.nursery = None
            self.udp.close_all()
            self.icmp.close_all()
            self.tcp.close_all()
            for box in self.outboxes:
                box.clear()

    async def _advertise(self) -> None:
        """Unsolicited router advertisements, so the guest's IPv6 default route
        never expires (RFC 4861 §6.2.4: every MaxRtrAdvInterval at most)."""
        while True:
            await trio.sleep(RA_INTERVAL)
            if self.guest_mac is not None:
                self.to_guest(unsolicited_ra(self.cfg), 0)

    def close(self) -> None:
        """Process exit: release the native table and the outboxes' fds."""
        self.tcp.close()
        self.fast.close()
        for box in self.outboxes:
            box.close()

    # ---- guest → stack ---------------------------------------------------------

    def slow_frames(self, pair: int) -> SlowFrames:
        """The pair's buffer of frames its native TX batches hand to Python."""
        slow = self._slow[pair]
        if slow is None:
            slow = self._slow[pair] = SlowFrames()
        return slow

    def take_slow(self, slow: SlowFrames) -> None:
        """After a native TX batch: acknowledge the TCP data it sent, and
        dispatch the frames it handed over (emptying ``slow``).  What this
        puts in the outboxes wakes their consumers once, at the end."""
        with contextlib.ExitStack() as deferred:
            for box in self.outboxes:
                deferred.enter_context(box.wake_deferred())
            self.tcp.take_fast()
            frames = slow.drain()
            skip = superseded_acks([f.frame for f in frames]) if len(frames) > 1 else ()
            if skip:
                self.tcp.stats["acks_coalesced"] += len(skip)
            for i, f in enumerate(frames):
                if i not in skip:
                    self.guest_frame(f.frame, f.pair, f.flags)

    def guest_frame(self, frame: bytes, pair: int, flags: int = 0) -> None:
        """One frame the guest sent on ``pair`` (no virtio-net header)."""
        try:
            pkt = P.parse(frame, csum_trusted=bool(flags & VIRTIO_NET_HDR_F_NEEDS_CSUM))
            self._dispatch(pkt, pair)
        except P.Drop as drop:
            self.drops[drop.reason] += 1
        except Exception:  # a bug must not take the VM's network down
            log.exception("user stack: frame on pair %d", pair)
            self.drops["internal_error"] += 1

    def _dispatch(self, pkt: P.Packet, pair: int) -> None:
        if self.guest_mac != pkt.eth_src and not pkt.eth_src[0] & 1:
            self.guest_mac = pkt.eth_src
            if not self._announced and self.cfg.v6 is not None:
                self._announced = True
                self.to_guest(unsolicited_ra(self.cfg), pair)
        if pkt.version and not (pkt.src.is_unspecified or pkt.src.is_link_local):
            self.seen[pkt.version] = pkt.src
        guest_mac = self.guest_mac or P.BROADCAST
        reply: bytes | None = None
        if pkt.version == 0:
            self.handled["arp"] += 1
            reply = handle_arp(self.cfg, guest_mac, pkt)
        elif pkt.proto == P.IPPROTO_UDP and pkt.version == 4 and pkt.dport == DHCP_SERVER_PORT:
            self.handled["dhcp"] += 1
            reply = self.dhcp.handle(pkt)
        elif pkt.proto == P.IPPROTO_UDP and pkt.version == 6 and pkt.dport == DHCPV6_SERVER_PORT:
            self.handled["dhcpv6"] += 1
            reply = handle_dhcpv6(self.cfg, guest_mac, pkt)
        elif pkt.proto == P.IPPROTO_ICMPV6 and pkt.sport in NDP_TYPES:
            self.handled["ndp"] += 1
            reply = handle_ndp(self.cfg, guest_mac, pkt)
        elif pkt.proto == P.IPPROTO_ICMPV6 and pkt.sport in ICMPV6_QUIET:
            self.handled["icmpv6_quiet"] += 1
        elif pkt.proto == P.IPPROTO_UDP:
            self.udp.from_guest(pkt, pair)
        elif pkt.proto in (P.IPPROTO_ICMP, P.IPPROTO_ICMPV6):
            if pkt.sport not in (ICMP_ECHO_REQUEST, ICMPV6_ECHO_REQUEST):
                raise P.Drop("icmp_type")
            self.icmp.from_guest(pkt, pair)
        elif pkt.proto == P.IPPROTO_TCP:
            self.tcp.from_guest(pkt, pair)
        if reply is not None:
            self.to_guest(reply, pair)

    # ---- stack → guest ---------------------------------------------------------

    def to_guest(self, frame: bytes, pair: int) -> None:
        if not self.outboxes[self.home(pair)].put(frame):
            self.drops["rx_outbox_full"] += 1

    def home(self, pair: int) -> int:
        """``pair`` if it carries traffic, else pair 0 (frames are never queued
        where no RX task runs)."""
        return pair if pair < self.active_pairs else 0

    def pair_for_key(self, key: object) -> int:
        """A host-initiated flow's first pair: spread by hash over the active pairs."""
        return zlib.crc32(repr(key).encode()) % self.active_pairs

    def set_features(self, features: int) -> None:
        """The driver's features: whether new TCP connections may send it GSO
        frames, per IP version (its GUEST_TSO4 / GUEST_TSO6)."""
        self.guest_tso = {
            4: F.has(features, F.GUEST_TSO4),
            6: F.has(features, F.GUEST_TSO6),
        }

    def set_active_pairs(self, n: int) -> None:
        """Pairs >= n stop carrying traffic: their flows move to an active pair
        (by hash, never reset) and frames waiting for them are moved too."""
        self.active_pairs = max(1, min(n, self.max_pairs))
        moved = self.udp.rehome() + self.icmp.rehome() + self.tcp.rehome()
        for p in range(self.active_pairs, self.max_pairs):
            self.outboxes[p].move_to(self.outboxes[0])  # what does not fit counts as dropped
        if moved:
            log.info("user stack: %d flows re-homed onto %d pairs", moved, self.active_pairs)

    def guest_address(self, version: int) -> P.IPAddress | None:
        """The guest's address: the one it uses, else the one it was given."""
        if version in self.seen:
            return self.seen[version]
        return guest_address(self.cfg, version)

    @property
    def guest_dst_mac(self) -> bytes:
        return self.guest_mac or P.BROADCAST

    # ---- status ----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        flows = self.udp.describe() + self.icmp.describe() + self.tcp.describe()
        by_proto = Counter(f["proto"] for f in flows)
        return {
            "guest_mac": self.guest_mac.hex(":") if self.guest_mac else None,
            "flows_by_protocol": dict(by_proto),
            "flows": flows[:256],
            "handled": dict(self.handled),
            "drops": sum(self.drops.values()),
            "drops_by_reason": dict(self.drops),
            "outbox_dropped": [box.dropped for box in self.outboxes],
            "ping_sockets": self.icmp.available,
            "udp": self.udp.counters(),
            "tcp": self.tcp.counters(),
            "forwards": self.forwards_status(),
        }

    def forwards_status(self) -> dict[str, Any]:
        """Inbound forwards' host sockets: how many listen, and which do not
        (yet: they are retried) with their errors; ``unsupported``: those the
        host cannot have at all (no IPv6), not retried."""
        groups = (self.udp.listeners, self.tcp.listeners)
        points = [p for g in groups for p in g.points]
        failing = [p.as_dict() for p in points if not p.listening and not p.unsupported]
        return {
            "listening": sum(p.listening for p in points),
            "not_listening": {g.proto: g.not_listening() for g in groups},
            "unsupported": sum(g.unsupported() for g in groups),
            "failing": failing[:64],
        }
