"""The guest driver for the user stack's native fast path (``tn_user_tx`` /
``tn_user_rx``), shared by the tests that play it themselves.

``Rig`` lays TX and RX rings for its queue pairs in guest RAM in a memfd (as
in test_virtq) and runs a ``UdpFastPath`` over them; ``Flow`` is a UDP flow
registered with it, its host side a socket bound on loopback.  Frames are
built with scapy.
"""

from __future__ import annotations

import os
import select
import socket
import struct
from dataclasses import dataclass
from typing import Any

from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from tests.fakes.driver import DriverQueue, GuestRam, Used
from trionet.backends.user.fastpath import SlowFrames, UdpFastPath
from trionet.memory import GuestMemory, RegionSpec
from trionet.native import ffi
from trionet.net import features as F
from trionet.virtq.vring import RingAddresses, Vring

FEATURES = F.mask(F.VERSION_1, F.RING_INDIRECT_DESC, F.RING_EVENT_IDX, F.MRG_RXBUF)
HDR = 12
NEEDS_CSUM, DATA_VALID = 1, 2
GUEST_MAC, OUR_MAC = "52:54:00:12:34:56", "9a:55:9a:55:9a:55"
GUEST4, PEER4 = "10.0.2.15", "10.0.2.2"
GUEST6, PEER6 = "fd00::15", "fd00::2"


def vnet_hdr(flags: int = 0, gso: int = 0, hdr_len: int = HDR) -> bytes:
    return struct.pack("<BBHHHHH", flags, gso, 0, 0, 0, 0, 0)[:hdr_len]


@dataclass
class Flow:
    slot: int
    v6: bool
    server: socket.socket  # the host-side peer
    sock: socket.socket  # the flow's connected socket, registered with the table
    gport: int
    pport: int

    @property
    def guest(self) -> str:
        return GUEST6 if self.v6 else GUEST4

    @property
    def peer(self) -> str:
        return PEER6 if self.v6 else PEER4

    def ip(self, src: str, dst: str, **kw: Any) -> Packet:
        return IPv6(src=src, dst=dst, **kw) if self.v6 else IP(src=src, dst=dst, **kw)

    def guest_packet(self, payload: bytes, ip: dict[str, Any] | None = None, **udp: Any) -> Packet:
        return (
            Ether(src=GUEST_MAC, dst=OUR_MAC)
            / self.ip(self.guest, self.peer, **(ip or {}))
            / UDP(sport=self.gport, dport=self.pport, **udp)
            / Raw(payload)
        )

    def guest_frame(self, payload: bytes, **udp: Any) -> bytes:
        return bytes(self.guest_packet(payload, **udp))

    def reply(self, payload: bytes) -> None:
        self.server.sendto(payload, self.sock.getsockname())

    def received(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.server.recv(70000, socket.MSG_DONTWAIT))
            except BlockingIOError:
                return out


def template(v6: bool, peer: str, guest: str, pport: int, gport: int) -> bytes:
    ip: Packet
    if v6:
        ip = IPv6(src=peer, dst=guest, plen=0, hlim=64)
    else:
        ip = IP(src=peer, dst=guest, flags="DF", ttl=64, id=0, len=0, chksum=0)
    eth = Ether(src=OUR_MAC, dst=GUEST_MAC)
    return bytes(eth / ip / UDP(sport=pport, dport=gport, len=0, chksum=0))


class Rig:
    def __init__(self, pairs: int = 2, size: int = 256, ram: int = 16 << 20) -> None:
        self.ram = GuestRam(ram)
        self.mem = GuestMemory()
        self.mem.set_table(
            [RegionSpec(self.ram.base, self.ram.size, self.ram.uva, 0)], [os.dup(self.ram.fd)]
        )
        self.txq = [self._ring(2 * p + 1, size) for p in range(pairs)]
        self.rxq = [self._ring(2 * p, size) for p in range(pairs)]
        self.fast = UdpFastPath()
        self.slow = SlowFrames()
        self.scratch = ffi.new("struct tn_scratch *")
        self.b = ffi.new("struct tn_batch *")
        self.socks: list[socket.socket] = []

    def _ring(self, index: int, size: int) -> tuple[DriverQueue, Vring]:
        q = DriverQueue(self.ram, size)
        vr = Vring(index)
        vr.set_num(size)
        u = self.ram.uva - self.ram.base
        vr.set_addresses(RingAddresses(q.desc + u, q.avail + u, q.used + u))
        vr.started = True
        vr.attach(self.mem, FEATURES)
        return q, vr

    def flow(
        self, v6: bool = False, pair: int = 0, gport: int = 5000, peer_sock: Any = None
    ) -> Flow:
        family, loop = (socket.AF_INET6, "::1") if v6 else (socket.AF_INET, "127.0.0.1")
        server = peer_sock or socket.socket(family, socket.SOCK_DGRAM)
        if peer_sock is None:
            server.bind((loop, 0))
            self.socks.append(server)
        sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        self.socks.append(sock)
        sock.connect(server.getsockname()[:2])
        pport = 53
        guest, peer = (GUEST6, PEER6) if v6 else (GUEST4, PEER4)
        ga, pa = (socket.inet_pton(family, a) for a in (guest, peer))
        slot = self.fast.add(
            fd=sock.fileno(), v6=v6, pair=pair, template=template(v6, peer, guest, pport, gport),
            gsrc=ga, gdst=pa, gsport=gport, gdport=pport,
        )  # fmt: skip
        assert slot >= 0
        return Flow(slot, v6, server, sock, gport, pport)

    def send(
        self, pair: int, frame: bytes, flags: int = 0, segments: int = 1, gso: int = 0, **kw: Any
    ) -> None:
        self.txq[pair][0].add_tx(vnet_hdr(flags, gso) + frame, segments=segments, **kw)

    def tx(self, pair: int = 0, max_chains: int = 256, hdr_len: int = HDR) -> int:
        vr = self.txq[pair][1]
        rc = self.fast.tx(
            vr.vq, self.mem.table, hdr_len=hdr_len, pair=pair, slow=self.slow, batch=self.b,
            max_chains=max_chains,
        )  # fmt: skip
        return vr.check(rc)

    def rx(
        self, pair: int = 0, mrg: bool = True, data_valid: bool = False, hdr_len: int = HDR
    ) -> int:
        vr = self.rxq[pair][1]
        rc = self.fast.rx(
            vr.vq, self.mem.table, mrg=mrg, hdr_len=hdr_len, data_valid=data_valid, pair=pair,
            scratch=self.scratch, batch=self.b,
        )  # fmt: skip
        return vr.check(rc)

    def rx_frames(self, pair: int = 0) -> list[tuple[bytes, list[Used]]]:
        """Frames in the RX used ring (virtio-net header included), grouped by
        num_buffers."""
        q = self.rxq[pair][0]
        used = q.take_used()
        out = []
        while used:
            first = q.read_rx(used[0])
            n = int.from_bytes(first[10:12], "little")
            assert n >= 1
            group, used = used[:n], used[n:]
            out.append((b"".join(q.read_rx(u) for u in group), group))
        return out

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.fast.close()
        self.mem.clear()
        self.ram.close()


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])
