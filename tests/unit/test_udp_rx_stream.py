"""Host -> guest UDP streams checked byte for byte under the guest buffer
layouts a Linux driver posts (and odder ones).

Each datagram's content is a function of its number and size; the test plays a
driver that recycles its receive buffers, and checks that every datagram the
host sent reaches the ring whole, in order, in a frame whose lengths and
checksums are right (a guest told ``DATA_VALID`` would not catch a wrong byte
itself).  Through ``tn_user_rx`` directly (the recvmmsg path for chains that
hold any datagram, the one-at-a-time path for smaller ones, merged or not), and
through the whole service with an inbound forward (the first datagram through
the stack's outbox, the rest through the flow's socket), on the Trio thread and
on ``--threads`` workers.
"""

from __future__ import annotations

import random
import socket
import struct
from collections.abc import Callable
from ipaddress import ip_address
from pathlib import Path

import pytest
import trio
from scapy.utils import checksum

from tests.fakes.driver import DriverQueue
from tests.fakes.userguest import GUEST4, GUEST6, HDR, make_config, user_guest
from tests.fakes.userrig import GUEST4 as RIG_GUEST4
from tests.fakes.userrig import PEER4, Rig, readable
from trionet.backends.user.config import Forward

DATA_VALID = 2
SIZES = (1000, 1400, 1472, 8000, 60000)
ROUNDS = 6  # each size this many times, interleaved
IN_FLIGHT = 120_000  # bytes the host lets wait in the socket (its receive buffer holds more)


def datagram(seq: int, size: int) -> bytes:
    """Datagram ``seq`` of ``size`` bytes: its number, its size, then bytes drawn
    from a generator seeded by both (an older datagram, a shifted copy or stale
    buffer contents never match)."""
    head = struct.pack("!II", seq, size)
    return head + random.Random(seq * 65537 + size).randbytes(size - len(head))


def plan(rounds: int = ROUNDS, sizes: tuple[int, ...] = SIZES) -> list[bytes]:
    return [datagram(i, sizes[i % len(sizes)]) for i in range(rounds * len(sizes))]


def udp_payload(frame: bytes, v6: bool, src: str, dst: str, sport: int, dport: int) -> bytes:
    """The payload of the IPv4/IPv6 UDP ``frame`` (Ethernet on), after checking
    its addresses, ports, lengths and checksums."""
    l3 = frame[14:]
    if v6:
        assert frame[12:14] == b"\x86\xdd" and l3[6] == 17
        assert l3[8:24] == ip_address(src).packed and l3[24:40] == ip_address(dst).packed
        plen = int.from_bytes(l3[4:6], "big")
        udp = l3[40 : 40 + plen]
        pseudo = l3[8:40] + struct.pack("!I3xB", plen, 17)
    else:
        assert frame[12:14] == b"\x08\x00" and l3[0] == 0x45 and l3[9] == 17
        assert checksum(l3[:20]) == 0, "IPv4 header checksum"
        assert l3[12:16] == ip_address(src).packed and l3[16:20] == ip_address(dst).packed
        total = int.from_bytes(l3[2:4], "big")
        udp = l3[20:total]
        pseudo = l3[12:20] + struct.pack("!xBH", 17, len(udp))
    assert len(frame) == max(60, 14 + len(l3[: (40 + plen) if v6 else total]))
    assert int.from_bytes(udp[4:6], "big") == len(udp) >= 8
    assert struct.unpack("!HH", udp[:4]) == (sport, dport)
    assert udp[6:8] != b"\0\0" and checksum(pseudo + udp) == 0, "UDP checksum"
    return udp[8:]


def first_difference(got: list[bytes], want: list[bytes]) -> str:
    for i, (g, w) in enumerate(zip(got, want, strict=False)):
        if g != w:
            at = next((k for k, (a, b) in enumerate(zip(g, w, strict=False)) if a != b), None)
            gs = struct.unpack("!II", g[:8]) if len(g) >= 8 else g
            return f"datagram {i}: {len(g)} bytes (seq, size {gs}), want {len(w)}; byte {at} wrong"
    return f"{len(got)} datagrams, want {len(want)}"


def take_frames(q: DriverQueue) -> list[tuple[bytes, list[int]]]:
    """Frames in ``q``'s used ring (virtio-net header included), each with the
    lengths of its used entries, whose chains are reposted as a driver
    recycles its buffers."""
    out: list[tuple[bytes, list[int]]] = []
    used = q.take_used()
    while used:
        first = q.read_rx(used[0])
        n = int.from_bytes(first[10:12], "little")
        assert 1 <= n <= len(used), f"num_buffers {n} with {len(used)} used entries"
        group, used = used[:n], used[n:]
        out.append((b"".join(q.read_rx(u) for u in group), [u.length for u in group]))
        for u in group:
            q.repost(u.head)
    return out


def check_lengths(data: bytes, lengths: list[int], caps: list[int]) -> None:
    """Every used entry but the last fills its chain; together they hold the frame."""
    assert sum(lengths) == len(data)
    assert all(n <= cap for n, cap in zip(lengths, caps, strict=True))
    assert lengths[:-1] == caps[:-1]


# ---- buffer layouts ------------------------------------------------------------------

Post = Callable[[DriverQueue, int], None]  # posts chain number i


def chains(*layouts: tuple[list[int], bool]) -> Post:
    """Post the layouts in turn: (segment sizes, indirect)."""

    def post(q: DriverQueue, i: int) -> None:
        sizes, indirect = layouts[i % len(layouts)]
        q.add_rx_chain(sizes, indirect=indirect)

    return post


# odd sizes, chains of several buffers (a 12-byte header buffer among them), indirect ones
MRG_ODD = [([97], False), ([255, 3], True), ([333], False), ([12, 1001], False)]
MRG_ODD += [([1537], False), ([61, 7, 129], True), ([700], False), ([4096], False)]

# name: (mrg, chains to post, how)
LAYOUTS: dict[str, tuple[bool, int, Post]] = {
    # Linux with VIRTIO_NET_F_MRG_RXBUF: one buffer per chain, header inline
    "mrg_linux": (True, 400, chains(([1536], False))),
    "mrg_odd": (True, 300, chains(*MRG_ODD)),
    "mrg_header_apart": (True, 400, chains(([12, 1514], True))),
    # Linux's big-packet buffers without MRG_RXBUF: the header alone, then pages
    "big_linux": (False, 24, chains(([12, 4080] + [4096] * 16, False))),
    # chains that hold any datagram, cut at odd places: the recvmmsg path
    "single_odd_large": (False, 64, chains(([12, 1001, 333, 65000], False), ([7, 65600], True))),
    # too small for the larger datagrams: those are dropped, the rest arrive whole
    "single_small": (False, 64, chains(([293] * 6 + [290], False), ([2048], True))),
}


def capacities(q: DriverQueue) -> dict[int, int]:
    return {head: sum(n for _, n in bufs) for head, bufs in q.buffers.items()}


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_stream_arrives_byte_for_byte(layout: str, v6: bool) -> None:
    mrg, n_chains, post = LAYOUTS[layout]
    r = Rig(pairs=1, size=1024, ram=64 << 20)
    try:
        flow = r.flow(v6=v6)
        q = r.rxq[0][0]
        for i in range(n_chains):
            post(q, i)
        caps = capacities(q)
        small = layout == "single_small"
        want = plan()
        fits = [d for d in want if not small or HDR + (62 if v6 else 42) + len(d) <= 2048]
        got: list[bytes] = []
        sent = dropped = 0
        for _ in range(10_000):
            while sent < len(want) and (
                sent == len(got) + dropped
                or sum(map(len, want[len(got) + dropped : sent + 1])) <= IN_FLIGHT
            ):
                flow.reply(want[sent])
                sent += 1
            n = r.rx(mrg=mrg, data_valid=True)
            dropped += r.b.drops_bad_frame + r.b.drops_no_buffer
            used_heads = q.take_used()
            # regroup by hand to check the used lengths against the chains' capacities
            while used_heads:
                first = q.read_rx(used_heads[0])
                k = int.from_bytes(first[10:12], "little")
                assert 1 <= k <= len(used_heads), (k, len(used_heads))
                group, used_heads = used_heads[:k], used_heads[k:]
                data = b"".join(q.read_rx(u) for u in group)
                assert mrg or k == 1
                check_lengths(data, [u.length for u in group], [caps[u.head] for u in group])
                assert data[0] == DATA_VALID and data[1] == 0, data[:HDR]
                got.append(
                    udp_payload(data[HDR:], v6, flow.peer, flow.guest, flow.pport, flow.gport)
                )
                for u in group:
                    q.repost(u.head)
            if sent == len(want) and n == 0 and not readable(flow.sock.fileno()):
                break
        assert got == fits, first_difference(got, fits)
        assert dropped == len(want) - len(fits)
    finally:
        r.close()


def test_stream_through_a_small_ring_recycled_many_times() -> None:
    """Ten chains, thousands of datagrams: every chain is reused hundreds of
    times, at every ring position, by datagrams of many sizes."""
    r = Rig(pairs=1, size=16, ram=16 << 20)
    try:
        flow = r.flow()
        q = r.rxq[0][0]
        for i in range(10):  # 15 of the ring's 16 descriptors
            q.add_rx_chain([333, 1203] if i % 2 else [1536])
        want = [datagram(i, 900 + i * 37 % 1400) for i in range(4000)]
        got: list[bytes] = []
        for start in range(0, len(want), 8):
            for d in want[start : start + 8]:
                flow.reply(d)
            for _ in range(100):
                if len(got) == min(start + 8, len(want)):
                    break
                r.rx(mrg=True, data_valid=True)
                for data, _ in take_frames(q):
                    got.append(udp_payload(data[HDR:], False, PEER4, RIG_GUEST4, 53, 5000))
        assert got == want, first_difference(got, want)
        assert q.last_used > len(want)  # datagrams took two chains at times
    finally:
        r.close()


# ---- through the service: an inbound forward, Trio thread and worker threads ---------


@pytest.fixture(params=[False, True], ids=["trio", "threads"])
def threads(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
async def test_forwarded_stream_arrives_byte_for_byte(
    tmp_path: Path, threads: bool, v6: bool
) -> None:
    family, loop = (socket.AF_INET6, "::1") if v6 else (socket.AF_INET, "127.0.0.1")
    probe = socket.socket(family, socket.SOCK_DGRAM)
    probe.bind((loop, 0))
    host_port = probe.getsockname()[1]
    probe.close()
    fwd = Forward("udp", ip_address(loop), host_port, host_port, 5000)
    cfg = make_config(forwards=(fwd,), guest_mac=bytes.fromhex("525400123456"))
    post = LAYOUTS["mrg_odd"][2]
    want = plan()
    async with user_guest(tmp_path, cfg, threads=threads, stock=0, ram_size=32 << 20) as g:
        for p in range(g.pairs):
            for i in range(200):
                post(g.fe.queues[2 * p], i)
            g.fe.kick(2 * p)
        got: list[bytes] = []
        src = dst = ""  # the host's address as the guest sees it, and the guest's
        with trio.socket.socket(family, socket.SOCK_DGRAM) as sender:
            await sender.bind((loop, 0))
            sport = sender.getsockname()[1]
            sent = 0
            with trio.fail_after(30):
                while len(got) < len(want):
                    while sent < len(want) and (
                        sent == len(got) or sum(map(len, want[len(got) : sent + 1])) <= IN_FLIGHT
                    ):
                        await sender.sendto(want[sent], (loop, host_port))
                        sent += 1
                    for p in range(g.pairs):
                        q = g.fe.queues[2 * p]
                        frames = take_frames(q)
                        for data, _ in frames:
                            assert data[0] == DATA_VALID, data[:HDR]
                            frame = data[HDR:]
                            if not src:
                                src, dst = addresses(frame, v6)
                            got.append(udp_payload(frame, v6, src, dst, sport, 5000))
                        if frames:
                            g.fe.kick(2 * p)
                    await trio.sleep(0.002)
        assert got == want, first_difference(got, want)
        assert dst == str(GUEST6 if v6 else GUEST4)
        udp = g.user_status()["udp"]
        assert isinstance(udp, dict)
        # the first datagrams went through the stack (the listener), the rest natively
        assert udp["native_rx"] >= len(want) // 2 and udp["native_rx_dropped"] == 0, udp


def addresses(frame: bytes, v6: bool) -> tuple[str, str]:
    """(source, destination) of an IPv4/IPv6 frame."""
    if v6:
        return str(ip_address(frame[22:38])), str(ip_address(frame[38:54]))
    return str(ip_address(frame[26:30])), str(ip_address(frame[30:34]))
