"""TapBackend against the real kernel: queue steering, frames both ways,
TUNSETQUEUE bookkeeping, offloads, link lifetime.

The tap is opened in the test process's namespace, then moved into a fresh
namespace (its queue fds keep working) where it gets 10.99.0.1/24 and a
permanent neighbour 10.99.0.2 -> 52:54:00:00:00:02, so the kernel sends
frames for 10.99.0.2 straight out of the tap, with no ARP.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
import trio
import trio.testing

from tests.netns import ip, netns, ns_run, require_root, root_test, unique_ifname
from trionet.backends import netlink, tap
from trionet.backends.tap import (
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_TSO_ECN,
    TUN_F_UFO,
    VNET_HDR_SIZE,
    TapBackend,
    TapError,
    honourable_features,
    tun_offloads_for_features,
)

HOST_IP = "10.99.0.1"
PEER_IP = "10.99.0.2"
PEER_MAC = bytes.fromhex("525400000002")
UDP_DPORT = 9999
PAIRS = 4

__all__ = ["require_root"]  # the fixture behind @root_test must be visible here

# Run inside the namespace: one UDP socket per source port, REPS datagrams each.
SENDER = """
import socket, sys
base, count, reps = map(int, sys.argv[1:4])
for port in range(base, base + count):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("10.99.0.1", port))
    for rep in range(reps):
        s.sendto(b"trionet-%d-%d" % (port, rep), ("10.99.0.2", 9999))
    s.close()
"""


# --------------------------------------------------------------------- frames


def inet_csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(src: str, dst: str, proto: int, payload: bytes, ident: int = 0x1234) -> bytes:
    hdr = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(payload),
        ident,
        0x4000,
        64,
        proto,
        0,
        bytes(map(int, src.split("."))),
        bytes(map(int, dst.split("."))),
    )
    hdr = hdr[:10] + struct.pack("!H", inet_csum(hdr)) + hdr[12:]
    return hdr + payload


def icmp_echo(ident: int, seq: int, data: bytes) -> bytes:
    msg = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + data
    return msg[:2] + struct.pack("!H", inet_csum(msg)) + msg[4:]


@dataclass
class Parsed:
    flags: int  # virtio_net_hdr flags (1 = NEEDS_CSUM)
    proto: int
    src: str
    dst: str
    l4: bytes
    ip_hdr: bytes


def parse(frame: bytes) -> Parsed | None:
    """An IPv4 frame behind the 12-byte header, or None for anything else."""
    flags = frame[0]
    eth = frame[VNET_HDR_SIZE:]
    if len(eth) < 34 or eth[12:14] != b"\x08\x00":
        return None
    iph = eth[14:]
    ihl = (iph[0] & 0x0F) * 4
    total = struct.unpack("!H", iph[2:4])[0]
    return Parsed(
        flags=flags,
        proto=iph[9],
        src=".".join(map(str, iph[12:16])),
        dst=".".join(map(str, iph[16:20])),
        l4=iph[ihl:total],
        ip_hdr=iph[:ihl],
    )


def drain(backend: TapBackend) -> dict[int, list[bytes]]:
    """Everything readable right now, per queue."""
    out: dict[int, list[bytes]] = {q: [] for q in range(backend.queue_pairs)}
    for q in range(backend.queue_pairs):
        while True:
            try:
                out[q].append(os.read(backend.queue_fd(q), 70000))
            except BlockingIOError:
                break
    return out


async def settle(backend: TapBackend) -> dict[int, list[bytes]]:
    """Drain until nothing new has arrived for a while."""
    got: dict[int, list[bytes]] = {q: [] for q in range(backend.queue_pairs)}
    quiet = 0
    while quiet < 3:
        await trio.sleep(0.05)
        new = drain(backend)
        quiet = 0 if any(new.values()) else quiet + 1
        for q, frames in new.items():
            got[q].extend(frames)
    return got


def udp_flows(frames: dict[int, list[bytes]]) -> dict[int, list[int]]:
    """Per queue: source ports of our UDP datagrams to PEER_IP."""
    out: dict[int, list[int]] = {}
    for q, lst in frames.items():
        ports = []
        for f in lst:
            p = parse(f)
            if p and p.proto == 17 and p.dst == PEER_IP:
                sport, dport = struct.unpack("!HH", p.l4[:4])
                if dport == UDP_DPORT:
                    ports.append(sport)
        out[q] = ports
    return out


# ------------------------------------------------------------------- fixtures


@dataclass
class NsTap:
    backend: TapBackend
    ns: str
    mac: bytes


@pytest.fixture
async def ns_tap() -> AsyncIterator[NsTap]:
    name = unique_ifname()
    backend = TapBackend(name, PAIRS)
    await backend.open()
    try:
        async with netns() as ns:
            await netlink.move_to_netns_async(name, ns)
            await ns_run(ns, "sysctl", "-qw", f"net.ipv6.conf.{name}.disable_ipv6=1")
            await netlink.add_address_async(name, HOST_IP, 24, netns=ns)
            await netlink.set_link_up_async(name, netns=ns)
            await ns_run(
                ns, "ip", "neigh", "add", PEER_IP, "lladdr", "52:54:00:00:00:02", "dev", name
            )
            out = await ns_run(ns, "ip", "-j", "link", "show", "dev", name)
            mac = bytes.fromhex(json.loads(out.stdout)[0]["address"].replace(":", ""))
            await settle(backend)  # drop anything the link-up produced
            yield NsTap(backend, ns, mac)
            await backend.aclose()  # the link is gone from here: nothing to delete
    finally:
        await backend.aclose()


async def send_udp(ns: str, base: int, count: int, reps: int = 1) -> None:
    await ns_run(ns, sys.executable, "-c", SENDER, str(base), str(count), str(reps))


# ------------------------------------------------------- (a) queue steering


@root_test
async def test_steering_follows_active_pairs(
    ns_tap: NsTap, capsys: pytest.CaptureFixture[str]
) -> None:
    b, ns = ns_tap.backend, ns_tap.ns
    flows = 128
    report = []

    await b.set_active_pairs(1)
    assert b.attached == (True, False, False, False)
    await send_udp(ns, 20000, flows)
    by_q = udp_flows(await settle(b))
    report.append(("1 pair", {q: len(v) for q, v in by_q.items()}))
    assert len(by_q[0]) == flows
    assert not by_q[1] and not by_q[2] and not by_q[3]

    await b.set_active_pairs(4)
    assert b.attached == (True, True, True, True)
    await send_udp(ns, 30000, flows, reps=3)
    by_q = udp_flows(await settle(b))
    report.append(("4 pairs", {q: len(set(v)) for q, v in by_q.items()}))
    assert sum(len(v) for v in by_q.values()) == 3 * flows
    assert all(by_q[q] for q in range(4)), by_q
    # one flow, one queue
    owner: dict[int, set[int]] = {}
    for q, ports in by_q.items():
        for port in ports:
            owner.setdefault(port, set()).add(q)
    assert all(len(qs) == 1 for qs in owner.values())

    await b.set_active_pairs(2)
    assert b.attached == (True, True, False, False)
    await send_udp(ns, 40000, flows)
    by_q = udp_flows(await settle(b))
    report.append(("2 pairs", {q: len(v) for q, v in by_q.items()}))
    assert len(by_q[0]) + len(by_q[1]) == flows
    assert by_q[0] and by_q[1]
    assert not by_q[2] and not by_q[3]

    with capsys.disabled():
        print("\nflows per queue:", report)


# ------------------------------------------------------ (b) frames both ways


async def ping(b: TapBackend, mac: bytes, pair: int, ident: int, seq: int) -> int:
    """Write an echo request on queue ``pair``; check the reply; return its queue."""
    payload = b"trionet-ping-" + bytes(range(32))
    packet = ipv4(PEER_IP, HOST_IP, 1, icmp_echo(ident, seq, payload))
    frame = bytes(VNET_HDR_SIZE) + mac + PEER_MAC + b"\x08\x00" + packet
    assert await b.send(pair, frame) == len(frame)

    want = struct.pack("!BBxxHH", 0, 0, ident, seq)
    with trio.move_on_after(3):
        while True:
            for q, frames in (await settle(b)).items():
                for f in frames:
                    p = parse(f)
                    if p is None or p.proto != 1 or p.l4[:2] + p.l4[4:8] != want[:2] + want[4:]:
                        continue
                    assert f[VNET_HDR_SIZE : VNET_HDR_SIZE + 12] == PEER_MAC + mac
                    assert (p.src, p.dst) == (HOST_IP, PEER_IP)
                    assert p.l4[8:] == payload
                    assert inet_csum(p.ip_hdr) == 0
                    assert inet_csum(p.l4) == 0  # offloads are off: full checksum
                    assert p.flags == 0
                    return q
    raise AssertionError(f"no echo reply for a request written on queue {pair}")


@root_test
async def test_icmp_echo_through_queue_fd(
    ns_tap: NsTap, capsys: pytest.CaptureFixture[str]
) -> None:
    b, mac = ns_tap.backend, ns_tap.mac
    seen = []
    for pair in range(PAIRS):
        ident = 0x4200 + pair
        first = await ping(b, mac, pair, ident, 1)
        # The kernel records "flow hash -> queue written on" only after the
        # written frame has been delivered, so the first reply is steered by
        # hash alone; later replies of the flow follow the writer's queue.
        later = [await ping(b, mac, pair, ident, seq) for seq in (2, 3)]
        assert later == [pair, pair]
        seen.append((pair, first, later))
    with capsys.disabled():
        print("\n(written on, first reply on, later replies on):", seen)


# ------------------------------------------------- (c) TUNSETQUEUE bookkeeping


def record_set_queue(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool]]:
    calls: list[tuple[int, bool]] = []
    real = tap._set_queue

    def recording(fd: int, attach: bool) -> int:
        calls.append((fd, attach))
        return real(fd, attach)

    monkeypatch.setattr(tap, "_set_queue", recording)
    return calls


@pytest.fixture
async def host_tap() -> AsyncIterator[TapBackend]:
    backend = TapBackend(unique_ifname(), PAIRS)
    await backend.open()
    try:
        yield backend
    finally:
        await backend.aclose()


@root_test
async def test_set_queue_only_on_change(
    host_tap: TapBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = host_tap
    fd = [b.queue_fd(q) for q in range(PAIRS)]
    # what the kernel says to a repeated TUNSETQUEUE
    assert tap._set_queue(fd[1], True) == -errno.EINVAL

    calls = record_set_queue(monkeypatch)
    steps: list[tuple[int, list[tuple[int, bool]], tuple[bool, ...]]] = [
        (2, [(fd[3], False), (fd[2], False)], (True, True, False, False)),
        (2, [], (True, True, False, False)),
        (1, [(fd[1], False)], (True, False, False, False)),
        (1, [], (True, False, False, False)),
        (4, [(fd[1], True), (fd[2], True), (fd[3], True)], (True,) * 4),
        (4, [], (True,) * 4),
        (3, [(fd[3], False)], (True, True, True, False)),
        (2, [(fd[2], False)], (True, True, False, False)),
        (3, [(fd[2], True)], (True, True, True, False)),
    ]
    for n, expect_calls, expect_state in steps:
        calls.clear()
        await b.set_active_pairs(n)
        assert calls == expect_calls, n
        assert b.attached == expect_state, n
    info = await netlink.link_info_async(b.name)
    assert info is not None
    assert (info.num_queues, info.num_disabled_queues) == (3, 1)

    for bad in (0, PAIRS + 1):
        with pytest.raises(ValueError):
            await b.set_active_pairs(bad)


@root_test
async def test_detach_failure_keeps_record_true(host_tap: TapBackend) -> None:
    b = host_tap
    # Swap queue 2's tun file for /dev/null: its TUNSETQUEUE now fails (ENOTTY).
    null = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(null, b.queue_fd(2))
    finally:
        os.close(null)
    with pytest.raises(TapError) as exc:
        await b.set_active_pairs(1)
    assert exc.value.errno == errno.ENOTTY
    assert "detach" in str(exc.value) and "queue 2" in str(exc.value)
    # queue 3 went first and did detach; queue 2 failed; queue 1 was not tried
    assert b.attached == (True, True, True, False)


@root_test
async def test_attach_failure_keeps_record_true(
    host_tap: TapBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = host_tap
    await b.set_active_pairs(1)
    real = tap._set_queue
    broken = b.queue_fd(2)

    def failing(fd: int, attach: bool) -> int:
        return -errno.EPERM if fd == broken else real(fd, attach)

    monkeypatch.setattr(tap, "_set_queue", failing)
    with pytest.raises(TapError) as exc:
        await b.set_active_pairs(4)
    assert exc.value.errno == errno.EPERM
    assert b.attached == (True, True, False, False)

    monkeypatch.setattr(tap, "_set_queue", real)
    await b.set_active_pairs(4)  # picks up where it stopped
    assert b.attached == (True,) * 4


# ----------------------------------------------------------- (d) offloads


async def ethtool_features(name: str, ns: str | None = None) -> dict[str, bool]:
    argv = ["ethtool", "-k", name]
    out = await (ns_run(ns, *argv) if ns else trio.run_process(argv, capture_stdout=True))
    feats = {}
    for line in out.stdout.decode().splitlines()[1:]:
        key, _, value = line.strip().partition(": ")
        feats[key] = value.startswith("on")
    return feats


@root_test
async def test_offloads_round_trip(host_tap: TapBackend) -> None:
    b = host_tap
    supported = b.supported_offloads()
    assert (
        supported & (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6) == TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
    )
    assert supported & ~(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO) == 0
    assert b.offloads == 0
    feats = await ethtool_features(b.name)
    assert not feats["tx-checksum-ip-generic"] and not feats["tx-tcp-segmentation"]

    want = tun_offloads_for_features((1 << 1) | (1 << 7) | (1 << 8) | (1 << 9))
    assert want == TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
    b.set_offloads(want & supported)
    assert b.offloads == want & supported
    feats = await ethtool_features(b.name)
    assert feats["tx-checksum-ip-generic"]
    assert feats["tx-tcp-segmentation"] and feats["tx-tcp6-segmentation"]

    b.set_offloads(0)
    feats = await ethtool_features(b.name)
    assert not feats["tx-checksum-ip-generic"] and not feats["tx-tcp-segmentation"]

    with pytest.raises(TapError) as exc:
        b.set_offloads(TUN_F_TSO4)  # TSO without CSUM: the kernel says no
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(TapError):
        b.set_offloads(0x1000)


@root_test
async def test_csum_offload_reaches_vnet_header(ns_tap: NsTap) -> None:
    b, ns = ns_tap.backend, ns_tap.ns
    await b.set_active_pairs(1)
    await send_udp(ns, 21000, 4)
    frames = [f for f in (await settle(b))[0] if (p := parse(f)) and p.proto == 17]
    assert len(frames) == 4 and all(f[0] == 0 for f in frames)

    b.set_offloads(TUN_F_CSUM)
    await send_udp(ns, 22000, 4)
    frames = [f for f in (await settle(b))[0] if (p := parse(f)) and p.proto == 17]
    # VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start at the UDP header, csum_offset 6
    assert len(frames) == 4 and all(f[0] & 1 for f in frames)
    assert all(struct.unpack("<HH", f[6:10]) == (14 + 20, 6) for f in frames)


def test_feature_mapping() -> None:
    def bits(*ns: int) -> int:
        return sum(1 << n for n in ns)

    assert tun_offloads_for_features(0) == 0
    assert tun_offloads_for_features(bits(7, 8, 9, 10)) == 0  # no GUEST_CSUM
    assert tun_offloads_for_features(bits(1)) == TUN_F_CSUM
    assert tun_offloads_for_features(bits(1, 9)) == TUN_F_CSUM  # ECN needs TSO
    assert tun_offloads_for_features(bits(1, 7, 9)) == TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO_ECN
    assert tun_offloads_for_features(bits(1, 8, 10)) == TUN_F_CSUM | TUN_F_TSO6 | TUN_F_UFO
    assert tun_offloads_for_features(bits(0, 11, 12, 13, 14)) == 0  # host side: not TUN_F

    host = bits(0, 11, 12, 13, 14)
    assert honourable_features(0) == host
    assert honourable_features(TUN_F_TSO4) == host  # nothing on receive without CSUM
    assert honourable_features(TUN_F_CSUM) == host | bits(1)
    everything = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO
    assert honourable_features(everything) == host | bits(1, 7, 8, 9, 10)
    for sup in range(32):
        # whatever we offer maps back to flags the kernel accepts
        assert tun_offloads_for_features(honourable_features(sup)) & ~sup == 0 or not (
            sup & TUN_F_CSUM
        )


# ------------------------------------------------------- (e) link lifetime


@root_test
async def test_aclose_deletes_created_tap() -> None:
    b = TapBackend(unique_ifname(), 2)
    await b.open()
    assert b.created
    info = await netlink.link_info_async(b.name)
    assert info is not None and info.is_tap and info.up
    assert info.multi_queue and info.vnet_hdr and not info.pi and info.persist
    assert info.num_queues == 2
    await b.aclose()
    assert not await netlink.link_exists_async(b.name)
    await b.aclose()  # idempotent
    with pytest.raises(IndexError):
        b.queue_fd(0)


async def with_existing(setup: list[str], body: Callable[[str], Awaitable[None]]) -> None:
    """Create a link with ``ip SETUP`` (NAME replaced), run ``body``, delete it."""
    name = unique_ifname()
    await ip(*[a.replace("NAME", name) for a in setup])
    try:
        await body(name)
    finally:
        await ip("link", "del", name, check=False)


@root_test
async def test_aclose_leaves_existing_tap() -> None:
    async def body(name: str) -> None:
        b = TapBackend(name, 3)
        await b.open()
        assert not b.created
        info = await netlink.link_info_async(name)
        assert info is not None and info.num_queues == 3 and info.up
        await b.aclose()
        info = await netlink.link_info_async(name)
        assert info is not None and info.num_queues == 0

    await with_existing(
        ["tuntap", "add", "mode", "tap", "multi_queue", "vnet_hdr", "name", "NAME"], body
    )


@root_test
async def test_existing_tap_without_vnet_hdr_is_usable() -> None:
    async def body(name: str) -> None:
        async with TapBackend(name, 2) as b:
            info = await netlink.link_info_async(name)
            assert info is not None and info.vnet_hdr  # TUNSETIFF turned it on
            assert b.attached == (True, True)

    await with_existing(["tuntap", "add", "mode", "tap", "multi_queue", "name", "NAME"], body)


@root_test
@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (["tuntap", "add", "mode", "tap", "vnet_hdr", "name", "NAME"], "IFF_MULTI_QUEUE"),
        (["tuntap", "add", "mode", "tun", "multi_queue", "name", "NAME"], "not a tap"),
        (["link", "add", "NAME", "type", "veth", "peer", "name", "NAMEp"], "not a tap"),
        (["tuntap", "add", "mode", "tap", "multi_queue", "pi", "name", "NAME"], "IFF_NO_PI"),
    ],
)
async def test_unusable_existing_link(setup: list[str], message: str) -> None:
    async def body(name: str) -> None:
        b = TapBackend(name, 2)
        with pytest.raises(TapError, match=message):
            await b.open()
        assert await netlink.link_exists_async(name)  # not ours: left alone

    await with_existing(setup, body)


@root_test
async def test_busy_tap() -> None:
    async with TapBackend(unique_ifname(), 2) as first:
        second = TapBackend(first.name, 2)
        with pytest.raises(TapError) as exc:
            await second.open()
        assert exc.value.errno == errno.EBUSY
        assert await netlink.link_exists_async(first.name)
        assert first.attached == (True, True)


@root_test
async def test_open_failure_cleans_up(monkeypatch: pytest.MonkeyPatch) -> None:
    real = tap._tap_open
    opened: list[int] = []

    def flaky(name: str) -> int:
        if len(opened) == 2:
            return -errno.E2BIG
        fd = real(name)
        opened.append(fd)
        return fd

    monkeypatch.setattr(tap, "_tap_open", flaky)
    b = TapBackend(unique_ifname(), 4)
    with pytest.raises(TapError, match="too many queues"):
        await b.open()
    assert not await netlink.link_exists_async(b.name)
    for fd in opened:  # closed (or reused by something that is not a tap)
        with contextlib.suppress(FileNotFoundError):
            assert os.readlink(f"/proc/self/fd/{fd}") != "/dev/net/tun"


@root_test
async def test_aclose_wakes_blocked_reader(host_tap: TapBackend) -> None:
    b = host_tap
    async with trio.open_nursery() as nursery:

        async def reader() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await b.recv(0)

        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        await b.aclose()
