"""Host data laid into the guest's RX ring a run at a time
(``tn_tcp_entries_lay``): the outbox's entries that continue one another on
one connection get their buffers first, then one ``MSG_PEEK`` fills all of
their payloads, then each gets its headers.

The test plays the guest driver (tests/fakes/userrig.py: rings in a memfd)
and the host peer (a socket on loopback).  Entries are queued directly
(``tn_uout_put_tcp``), as the stack or the native push queue them, and
drained with ``tn_uout_drain``; frames are checked with scapy.
"""

from __future__ import annotations

import fcntl
import select
import socket
import struct
import termios
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from tests.fakes.tcpnative import loopback_pair, new_tcpc
from tests.fakes.userrig import GUEST4, GUEST6, GUEST_MAC, HDR, OUR_MAC, PEER4, PEER6, Rig
from trionet.backends.user.fastpath import Outbox
from trionet.native import ffi, lib

UNA = 7000  # the sequence number of the stream's first byte
ACK, WINDOW = 123456, 512
STREAM = bytes((i * 31 + i // 256) & 0xFF for i in range(40_000))


def complete_checksum(segment: bytes) -> int:
    """What a driver stores for a NEEDS_CSUM frame: the complement of the
    ones'-complement sum of the segment (its checksum field holding the
    pseudo-header's sum)."""
    data = segment + b"\0" * (len(segment) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def counters() -> dict[str, int]:
    out = ffi.new("struct tn_tcpc_stats *")
    lib.tn_tcpc_stats_get(out)
    names = ("laid", "peeks", "stale", "trimmed", "short_peeks", "peek_errors")
    return {n: int(getattr(out, n)) for n in names}


@dataclass
class Lay:
    rig: Rig
    box: Outbox
    host: socket.socket  # the peer on loopback
    ours: socket.socket  # the stack's socket behind native
    native: Any  # struct tn_tcpc *
    v6: bool
    gso_headers: list[bytes] = field(default_factory=list)  # each frame's first 10 bytes

    def send(self, data: bytes) -> None:
        """The peer's data, all of it in our socket's receive queue."""
        self.host.sendall(data)
        while True:
            assert select.select([self.ours], [], [], 5)[0]
            buf = bytearray(4)
            fcntl.ioctl(self.ours.fileno(), termios.FIONREAD, buf)
            if struct.unpack("i", buf)[0] >= len(data):
                return

    def queue(self, offset: int, length: int, mss: int, seg: int = 0) -> int:
        """Entries for stream bytes [offset, offset + length), cut to ``seg``
        (default the MSS; longer: GSO frames of MSS-byte segments)."""
        return int(
            lib.tn_uout_put_tcp(self.box.cdata, self.native, UNA + offset, ACK, WINDOW, 0x18,
                                length, seg or mss, mss)
        )  # fmt: skip

    def drain(self, max_frames: int = 256, mrg: bool = True, rx_flags: int = 0) -> int:
        vr = self.rig.rxq[0][1]
        rc = lib.tn_uout_drain(self.box.cdata, vr.vq, self.rig.mem.table, mrg, HDR, rx_flags,
                               max_frames, self.rig.scratch, self.rig.b)  # fmt: skip
        return int(vr.check(rc))

    def segments(self) -> list[tuple[int, bytes, int]]:
        """(stream offset, payload, buffers used) of each frame laid, in ring
        order, its checksums checked (a GSO frame's partial one completed as
        its driver would)."""
        out = []
        for frame, group in self.rig.rx_frames():
            assert int.from_bytes(frame[10:12], "little") == len(group)
            self.gso_headers.append(frame[:10])
            pkt = Ether(frame[HDR:])
            ip = pkt[IPv6] if self.v6 else pkt[IP]
            tcp = pkt[TCP]
            plen = (ip.plen - 20) if self.v6 else (ip.len - 40)
            payload = bytes(tcp.payload)[:plen]
            assert (tcp.ack, tcp.window) == (ACK, WINDOW)
            again = Ether(bytes(pkt))
            del again[TCP].chksum
            if not self.v6:
                del again[IP].chksum
                assert Ether(bytes(again))[IP].chksum == ip.chksum
            want = Ether(bytes(again))[TCP].chksum
            if frame[0] & 1:  # NEEDS_CSUM: the sum from csum_start, stored at csum_offset
                start, offset = struct.unpack_from("<HH", frame, 6)
                assert (start, offset) == (14 + (40 if self.v6 else 20), 16)
                assert complete_checksum(frame[HDR + start :]) == want
            else:
                assert tcp.chksum == want
            out.append(((tcp.seq - UNA) & 0xFFFFFFFF, payload, len(group)))
        return out


@contextmanager
def lay_rig(v6: bool = False) -> Iterator[Lay]:
    rig = Rig(pairs=1)
    box = Outbox(512)
    host, ours = loopback_pair(v6)
    addrs = (PEER6, GUEST6) if v6 else (PEER4, GUEST4)
    native = new_tcpc(ours, (GUEST_MAC, OUR_MAC), addrs, (80, 40000), UNA)
    try:
        yield Lay(rig, box, host, ours, native, v6)
    finally:
        box.close()  # drops what is still queued (each entry holds a reference)
        lib.tn_tcpc_close(native)
        ours.close()
        host.close()
        rig.close()


def test_a_run_of_entries_is_laid_with_one_peek() -> None:
    with lay_rig() as t:
        t.send(STREAM[:20_000])
        assert t.queue(0, 20_000, 1460) == 14
        for _ in range(16):
            t.rig.rxq[0][0].add_rx(2048)
        before = counters()
        assert t.drain() == 14
        after = counters()
        assert after["peeks"] - before["peeks"] == 1
        assert after["laid"] - before["laid"] == 14
        segs = t.segments()
        assert [(off, len(p)) for off, p, _ in segs] == [
            (i * 1460, min(1460, 20_000 - i * 1460)) for i in range(14)
        ]
        assert b"".join(p for _, p, _ in segs) == STREAM[:20_000]
        assert len(t.box) == 0


def test_frames_over_several_merged_buffers_each() -> None:
    with lay_rig(v6=True) as t:
        t.send(STREAM[:6000])
        assert t.queue(0, 6000, 1400) == 5
        for _ in range(20):
            t.rig.rxq[0][0].add_rx(500)  # a frame of 12 + 74 + 1400 bytes takes three
        before = counters()
        assert t.drain() == 5
        assert counters()["peeks"] - before["peeks"] == 1
        segs = t.segments()
        assert [n for _, _, n in segs] == [3, 3, 3, 3, 1]
        assert b"".join(p for _, p, _ in segs) == STREAM[:6000]
        # the buffers the last frame did not need are the guest's still
        assert t.rig.rxq[0][1].vq.last_avail == 13


def test_a_ring_with_room_for_some_takes_those_the_rest_waits() -> None:
    with lay_rig() as t:
        t.send(STREAM[:10_000])
        assert t.queue(0, 10_000, 1000) == 10
        for _ in range(4):
            t.rig.rxq[0][0].add_rx(2048)
        assert t.drain() == 4
        assert t.rig.b.ring_full == 1
        assert len(t.box) == 6
        for _ in range(6):
            t.rig.rxq[0][0].add_rx(2048)
        assert t.drain() == 6
        segs = t.segments()
        assert [off for off, _, _ in segs] == list(range(0, 10_000, 1000))
        assert b"".join(p for _, p, _ in segs) == STREAM[:10_000]


def test_a_peek_that_comes_short_sends_what_is_there() -> None:
    """Entries for more than the socket holds (a peer's reset took the rest,
    say): what is there is sent, the entries past it are dropped."""
    with lay_rig() as t:
        t.send(STREAM[:2500])
        assert t.queue(0, 5000, 1000) == 5
        for _ in range(8):
            t.rig.rxq[0][0].add_rx(2048)
        before = counters()
        assert t.drain() == 3
        after = counters()
        assert after["short_peeks"] - before["short_peeks"] == 1
        assert after["peek_errors"] - before["peek_errors"] == 2
        segs = t.segments()
        assert [(off, len(p)) for off, p, _ in segs] == [(0, 1000), (1000, 1000), (2000, 500)]
        assert len(t.box) == 0
        assert t.rig.rxq[0][1].vq.last_avail == 3  # unused buffers went back


def test_a_head_acknowledged_meanwhile_is_trimmed_and_the_rest_follows() -> None:
    with lay_rig() as t:
        t.send(STREAM[:8000])
        assert t.queue(0, 8000, 1000) == 8
        assert lib.tn_tcpc_consume(t.native, 2300) == 2300  # the guest acknowledged 2300
        for _ in range(10):
            t.rig.rxq[0][0].add_rx(2048)
        before = counters()
        assert t.drain() == 6
        after = counters()
        assert (after["stale"] - before["stale"], after["trimmed"] - before["trimmed"]) == (2, 1)
        segs = t.segments()
        assert [(off, len(p)) for off, p, _ in segs][:2] == [(2300, 700), (3000, 1000)]
        assert b"".join(p for _, p, _ in segs) == STREAM[2300:8000]


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    mss = draw(st.integers(100, 1460))
    total = draw(st.integers(1, min(24_000, 100 * mss)))  # at most 100 entries
    mrg = draw(st.booleans())
    # without MRG_RXBUF a frame takes one chain: drivers post buffers that hold any
    sizes = [128, 600, 1500, 2048, 4096] if mrg else [2048, 4096]
    return {
        "v6": draw(st.booleans()),
        "mrg": mrg,
        "mss": mss,
        "total": total,
        "held": draw(st.integers(1, total)),  # what the socket really holds
        "acked": draw(st.integers(0, total)),  # acknowledged after queueing
        "buffers": draw(st.lists(st.sampled_from(sizes), max_size=30)),
        "max": draw(st.integers(1, 40)),
    }


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_any_run_lays_the_stream_in_order_with_every_buffer_accounted(sc: dict[str, Any]) -> None:
    mss, total, held = sc["mss"], sc["total"], sc["held"]
    acked = min(sc["acked"], held)
    with lay_rig(sc["v6"]) as t:
        t.send(STREAM[:held])
        t.queue(0, total, mss)
        if acked:
            assert lib.tn_tcpc_consume(t.native, acked) == acked
        ring = t.rig.rxq[0][0]
        for size in sc["buffers"]:
            ring.add_rx(size)
        t.drain(sc["max"], sc["mrg"])
        for _ in range(100):  # then room for everything, a frame a buffer
            if not len(t.box):
                break
            if t.rig.b.ring_full or not sc["buffers"]:
                for _ in range(8):
                    ring.add_rx(4096)
            t.drain(256, sc["mrg"])
        assert not len(t.box)
        vq = t.rig.rxq[0][1].vq
        segs = t.segments()
        used = sum(n for _, _, n in segs)
        # every chain is either used or still the guest's, never lost
        assert vq.last_avail == used
        offsets = [off for off, _, _ in segs]
        assert all(len(p) <= mss for _, p, _ in segs)
        # the stream from the first unacknowledged byte, each byte once, in order
        assert b"".join(p for _, p, _ in segs) == STREAM[acked:held]
        assert offsets == sorted(offsets)


def test_a_tso_guest_gets_gso_frames_of_mss_segments_with_partial_checksums() -> None:
    for v6 in (False, True):
        with lay_rig(v6) as t:
            t.send(STREAM[:40_000])
            assert t.queue(0, 40_000, 1460, seg=1460 * 20) == 2  # 29,200 + 10,800 bytes
            for _ in range(40):
                t.rig.rxq[0][0].add_rx(4096)
            flags = lib.TN_RX_DATA_VALID | (lib.TN_RX_TSO6 if v6 else lib.TN_RX_TSO4)
            assert t.drain(rx_flags=flags) == 2
            segs = t.segments()
            assert [(off, len(p)) for off, p, _ in segs] == [(0, 29_200), (29_200, 10_800)]
            assert b"".join(p for _, p, _ in segs) == STREAM[:40_000]
            tl = 14 + (40 if v6 else 20) + 20
            for hdr in t.gso_headers:
                flags_, gso_type, hdr_len, gso_size = struct.unpack_from("<BBHH", hdr)
                assert (flags_, gso_type, hdr_len, gso_size) == (1, 4 if v6 else 1, tl, 1460)


def test_a_gso_entry_for_a_guest_without_tso_sends_one_segment() -> None:
    """Queued for a TSO guest, drained after the driver lost TSO (a new VMM
    session): each entry goes as one MSS-sized frame, the rest is the
    retransmission's."""
    with lay_rig() as t:
        t.send(STREAM[:20_000])
        assert t.queue(0, 20_000, 1000, seg=10_000) == 2
        for _ in range(10):
            t.rig.rxq[0][0].add_rx(2048)
        assert t.drain(rx_flags=lib.TN_RX_DATA_VALID | lib.TN_RX_TSO6) == 2  # v4: no TSO4
        segs = t.segments()
        assert [(off, len(p)) for off, p, _ in segs] == [(0, 1000), (10_000, 1000)]
        assert all(h[0] & 1 == 0 and h[1] == 0 for h in t.gso_headers)
