"""The user backend end to end without a VM: a scripted guest's frames through
real vhost-user rings into the stack and real host sockets on loopback."""

from __future__ import annotations

import os
import select
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import ICMP, IP, UDP, UDPerror
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from tests.fakes.userguest import GUEST4, GUEST_MAC, GW4, HDR, OUR_MAC, make_config, user_guest
from trionet.backends.user.config import Forward
from trionet.backends.user.fastpath import SlowFrame
from trionet.backends.user.stack import UserStack

G_MAC, O_MAC = GUEST_MAC.hex(":"), OUR_MAC.hex(":")
IP_RECVTTL = 12  # <linux/in.h>; not in Python's socket module


@pytest.fixture(params=[False, True], ids=["trio", "threads"])
def threads(request: pytest.FixtureRequest) -> bool:
    """The user backend's pairs served on the Trio thread, and by worker threads."""
    return bool(request.param)


@pytest.fixture
async def echo_server() -> AsyncIterator[trio.socket.SocketType]:
    """A UDP echo server on the host's 127.0.0.1."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))

    async def serve() -> None:
        while True:
            data, peer = await sock.recvfrom(65535)
            await sock.sendto(data, peer)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        yield sock
        nursery.cancel_scope.cancel()
    sock.close()


def udp4(sport: int, dport: int, data: bytes, dst: str = str(GW4)) -> bytes:
    return bytes(
        Ether(src=G_MAC, dst=O_MAC) / IP(src=str(GUEST4), dst=dst) / UDP(sport=sport, dport=dport)
        / Raw(data)
    )  # fmt: skip


async def test_arp_for_the_gateway_answered_on_its_pair(tmp_path: Path, threads: bool) -> None:
    async with user_guest(tmp_path, make_config(), threads=threads) as g:
        req = Ether(src=G_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(
            op=1, hwsrc=G_MAC, psrc=str(GUEST4), pdst=str(GW4)
        )
        g.send(1, bytes(req))
        reply = Ether(await g.recv(1))
        assert reply[ARP].op == 2
        assert reply[ARP].hwsrc == O_MAC
        assert reply[ARP].psrc == str(GW4)
        assert reply.dst == G_MAC
        assert g.nothing_on(0)


async def test_dhcp_discover_gets_an_offer_with_mtu(tmp_path: Path, threads: bool) -> None:
    async with user_guest(tmp_path, make_config(), threads=threads) as g:
        disc = (
            Ether(src=G_MAC, dst="ff:ff:ff:ff:ff:ff") / IP(src="0.0.0.0", dst="255.255.255.255")
            / UDP(sport=68, dport=67) / BOOTP(chaddr=GUEST_MAC, xid=0x1234)
            / DHCP(options=[("message-type", "discover"), "end"])
        )  # fmt: skip
        g.send(0, bytes(disc))
        offer = Ether(await g.recv(0))
        assert offer[BOOTP].yiaddr == str(GUEST4)
        opts = dict(o for o in offer[DHCP].options if isinstance(o, tuple))
        assert opts["message-type"] == 2
        assert opts["interface-mtu"] == 65520


async def test_udp_flow_replies_follow_the_guests_pair(
    tmp_path: Path, threads: bool, echo_server: trio.socket.SocketType
) -> None:
    port = echo_server.getsockname()[1]
    async with user_guest(tmp_path, make_config(), threads=threads) as g:
        g.send(1, udp4(40000, port, b"first"))
        reply = Ether(await g.recv(1))
        assert reply[IP].src == str(GW4) and reply[IP].dst == str(GUEST4)
        assert (reply[UDP].sport, reply[UDP].dport) == (port, 40000)
        assert reply[Raw].load == b"first"
        # the second datagram goes the native way, and its reply the same pair
        g.send(1, udp4(40000, port, b"second"))
        assert Ether(await g.recv(1))[Raw].load == b"second"
        # the guest moves the flow to pair 0: replies follow
        g.send(0, udp4(40000, port, b"third"))
        assert Ether(await g.recv(0))[Raw].load == b"third"
        assert g.nothing_on(1)
        st = g.user_status()
        [flow] = [f for f in st["flows"] if f["proto"] == "udp"]  # type: ignore[union-attr]
        assert flow["pair"] == 0 and flow["guest_port"] == 40000
        assert st["udp"]["native_tx"] >= 2  # type: ignore[index]


async def test_checksums_of_replies_are_right(
    tmp_path: Path, threads: bool, echo_server: trio.socket.SocketType
) -> None:
    port = echo_server.getsockname()[1]
    async with user_guest(tmp_path, make_config(), threads=threads) as g:
        for payload in (b"x", b"y" * 1400):
            g.send(0, udp4(40001, port, payload))
            raw = await g.recv_raw(0)
            assert raw[0] & 2  # DATA_VALID: GUEST_CSUM was negotiated
            frame = Ether(raw[HDR:])
            assert len(raw) - HDR >= 60
            got_ip, got_udp = frame[IP].chksum, frame[UDP].chksum
            del frame[IP].chksum, frame[UDP].chksum
            again = Ether(bytes(frame))
            assert (got_ip, got_udp) == (again[IP].chksum, again[UDP].chksum)


async def test_dns_to_the_gateway_goes_to_the_upstream(
    tmp_path: Path, threads: bool, echo_server: trio.socket.SocketType
) -> None:
    port = echo_server.getsockname()[1]
    cfg = make_config(dns_upstreams=(("127.0.0.1", port),))
    async with user_guest(tmp_path, cfg, threads=threads) as g:
        g.send(0, udp4(5353, 53, b"query"))
        reply = Ether(await g.recv(0))
        assert reply[UDP].sport == 53 and reply[IP].src == str(GW4)
        assert reply[Raw].load == b"query"


async def test_bad_udp_checksum_dropped_and_counted(tmp_path: Path, threads: bool) -> None:
    async with user_guest(tmp_path, make_config(), threads=threads) as g:
        frame = Ether(udp4(40002, 9, b"data"))
        frame[UDP].chksum ^= 0x5555
        g.send(0, bytes(frame))
        # an ARP after it proves the bad frame was processed first
        g.send(0, bytes(Ether(src=G_MAC) / ARP(hwsrc=G_MAC, psrc=str(GUEST4), pdst=str(GW4))))
        await g.recv(0)
        assert g.user_status()["drops_by_reason"] == {"udp_checksum": 1}


async def test_echo_to_the_gateway_answered_without_ping_sockets(
    tmp_path: Path, threads: bool
) -> None:
    async with user_guest(tmp_path, make_config(), threads=threads) as g:
        stack = g.service.session.stack  # type: ignore[union-attr]
        stack.icmp.available = False
        req = (
            Ether(src=G_MAC, dst=O_MAC)
            / IP(src=str(GUEST4), dst=str(GW4))
            / ICMP(id=77, seq=3)
            / Raw(b"ping!")
        )
        g.send(1, bytes(req))
        reply = Ether(await g.recv(1))
        assert reply[ICMP].type == 0 and reply[ICMP].id == 77 and reply[ICMP].seq == 3
        assert reply[Raw].load == b"ping!"


async def test_inbound_forward_reaches_the_guest_and_back(tmp_path: Path, threads: bool) -> None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    host_port = probe.getsockname()[1]
    probe.close()
    fwd = Forward("udp", None, host_port, host_port, 7777)
    cfg = make_config(forwards=(fwd,), guest_mac=GUEST_MAC)
    async with user_guest(tmp_path, cfg, threads=threads) as g:
        sender = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await sender.bind(("127.0.0.1", 0))
        await sender.sendto(b"hello guest", ("127.0.0.1", host_port))
        frames = []
        with trio.fail_after(5):
            while not frames:
                for p in range(2):
                    if not g.nothing_on(p):
                        frames.append((p, await g.recv(p)))
                if not frames:
                    await trio.sleep(0.01)
        pair, raw = frames[0]
        frame = Ether(raw)
        assert frame[UDP].dport == 7777 and frame[IP].src == str(GW4)
        assert frame[Raw].load == b"hello guest"
        g.send(pair, udp4(7777, frame[UDP].sport, b"hello host"))
        with trio.fail_after(5):
            data, _ = await sender.recvfrom(100)
        assert data == b"hello host"
        sender.close()


async def test_udp_port_unreachable_translated(tmp_path: Path, threads: bool) -> None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    dead = probe.getsockname()[1]
    probe.close()
    async with user_guest(tmp_path, make_config(), threads=threads) as g:
        g.send(0, udp4(40003, dead, b"anyone?"))
        frame = Ether(await g.recv(0))
        assert frame[ICMP].type == 3 and frame[ICMP].code == 3
        assert frame[UDPerror].dport == dead


async def test_flows_on_a_disabled_pair_move(
    tmp_path: Path, threads: bool, echo_server: trio.socket.SocketType
) -> None:
    port = echo_server.getsockname()[1]
    async with user_guest(tmp_path, make_config(), threads=threads) as g:
        g.send(1, udp4(40004, port, b"a"))
        await g.recv(1)
        session = g.service.session
        assert session is not None
        await session.apply_active_pairs(1, "test")
        await echo_server.sendto(b"late", ("127.0.0.1", 40004))
        assert Ether(await g.recv(0))[Raw].load == b"late"


async def test_ipv6_udp_checksum_zero_dropped(tmp_path: Path, threads: bool) -> None:
    async with user_guest(tmp_path, make_config(), threads=threads) as g:
        frame = (
            Ether(src=G_MAC, dst=O_MAC)
            / IPv6(src="fd00:2::15", dst="fd00:2::2")
            / UDP(sport=1, dport=9, chksum=0)
            / Raw(b"z")
        )
        g.send(0, bytes(frame))
        g.send(0, bytes(Ether(src=G_MAC) / ARP(hwsrc=G_MAC, psrc=str(GUEST4), pdst=str(GW4))))
        await g.recv(0)
        assert g.user_status()["drops_by_reason"].get("udp_checksum") == 1  # type: ignore[union-attr]


def _thread_names() -> set[str]:
    return {t.read_text().strip() for t in Path("/proc/self/task").glob("*/comm")}


async def test_threads_serve_each_pair_on_its_own_worker(
    tmp_path: Path, echo_server: trio.socket.SocketType
) -> None:
    port = echo_server.getsockname()[1]
    async with user_guest(tmp_path, make_config(), threads=True) as g:
        session = g.service.session
        assert session is not None
        native = [session.counters[p].native for p in (0, 1)]
        for p in (0, 1):
            g.send(p, udp4(41000 + p, port, b"hello"))
        for p in (0, 1):
            assert Ether(await g.recv(p))[Raw].load == b"hello"
        assert {"tn-user-0", "tn-user-1"} <= _thread_names()  # both workers are up
        # a burst on both pairs at once: each pair's worker carries its own flow
        before = [int(n.rx_packets) for n in native]
        for i in range(20):
            for p in (0, 1):
                g.send(p, udp4(41000 + p, port, b"%d" % i))
        for p in (0, 1):
            for i in range(20):
                reply = Ether(await g.recv(p))
                assert reply[UDP].dport == 41000 + p and reply[Raw].load == b"%d" % i
        assert [int(n.rx_packets) - b for n, b in zip(native, before, strict=True)] == [20, 20]
        # pair 0's flow moves to pair 1: its replies come from pair 1's worker
        before = [int(n.rx_packets) for n in native]
        g.send(1, udp4(41000, port, b"moved"))
        reply = Ether(await g.recv(1))
        assert reply[UDP].dport == 41000 and reply[Raw].load == b"moved"
        assert [int(n.rx_packets) - b for n, b in zip(native, before, strict=True)] == [0, 1]
        assert g.nothing_on(0)
        [flow] = [f for f in g.user_status()["flows"] if f["guest_port"] == 41000]  # type: ignore[index, union-attr]
        assert flow["pair"] == 1
    assert not {"tn-user-0", "tn-user-1"} & _thread_names()  # joined, names given back


# ---- flow timers, on the stack alone (no rings), under the autojump clock -------


async def test_udp_flow_expires_when_idle(
    autojump_clock: trio.abc.Clock, echo_server: trio.socket.SocketType
) -> None:
    port = echo_server.getsockname()[1]
    stack = UserStack(make_config(udp_timeout=30.0, udp_stream_timeout=180.0), 2)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(stack.run)
            stack.guest_frame(udp4(40020, port, b"x"), 0)
            assert len(stack.udp.flows) == 1
            await trio.sleep(29)
            stack.guest_frame(udp4(40020, port, b"y"), 1)  # activity restarts the clock
            await trio.sleep(29)
            assert len(stack.udp.flows) == 1
            await trio.sleep(2)
            assert not stack.udp.flows
            assert stack.udp.expired == 1
            nursery.cancel_scope.cancel()
    finally:
        stack.close()


async def test_udp_flow_both_sides_spoke_lives_longer(autojump_clock: trio.abc.Clock) -> None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    host_port = probe.getsockname()[1]
    probe.close()
    cfg = make_config(
        forwards=(Forward("udp", None, host_port, host_port, 7777),), guest_mac=GUEST_MAC
    )
    stack = UserStack(cfg, 2)
    sender = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sender.bind(("127.0.0.1", 0))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(stack.run)
            await sender.sendto(b"hi", ("127.0.0.1", host_port))
            # loopback delivers at once: the listener turns it into a flow and a frame
            await trio.lowlevel.wait_readable(stack.outboxes[0].wake_fd)
            assert len(stack.udp.flows) == 1
            stack.guest_frame(udp4(7777, sender.getsockname()[1], b"back"), 0)
            await trio.sleep(100)
            assert len(stack.udp.flows) == 1  # past 30 s: both sides spoke
            await trio.sleep(100)
            assert not stack.udp.flows
            nursery.cancel_scope.cancel()
    finally:
        sender.close()
        stack.close()


async def test_guest_ttl_kept_on_the_host_side(tmp_path: Path, threads: bool) -> None:
    server = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await server.bind(("127.0.0.1", 0))
    server.setsockopt(socket.IPPROTO_IP, IP_RECVTTL, 1)
    async with user_guest(tmp_path, make_config(), threads=threads) as g:
        frame = Ether(udp4(40030, server.getsockname()[1], b"ttl"))
        frame[IP].ttl = 7
        del frame[IP].chksum
        g.send(0, bytes(frame))
        with trio.fail_after(5):
            data, anc, _flags, _addr = await server.recvmsg(100, socket.CMSG_SPACE(4))
        assert data == b"ttl"
        [(_level, _kind, ttl)] = anc
        assert int.from_bytes(ttl, "little") == 7
    server.close()


@pytest.mark.root
async def test_echo_through_a_ping_socket_keeps_the_guests_identifier(
    tmp_path: Path, threads: bool
) -> None:
    """With ping sockets allowed, the guest's echo to the gateway really goes to
    the host's 127.0.0.1, and the reply carries the guest's identifier back."""
    from tests.e2e.hostnet import ping_group_range

    with ping_group_range(0, 0):
        async with user_guest(tmp_path, make_config(), threads=threads) as g:
            stack = g.service.session.stack  # type: ignore[union-attr]
            assert stack.icmp.available
            req = (
                Ether(src=G_MAC, dst=O_MAC)
                / IP(src=str(GUEST4), dst=str(GW4))
                / ICMP(id=4242, seq=9)
                / Raw(b"via the host")
            )
            g.send(0, bytes(req))
            reply = Ether(await g.recv(0))
            assert reply[ICMP].type == 0 and reply[ICMP].id == 4242 and reply[ICMP].seq == 9
            assert reply[Raw].load == b"via the host"
            assert stack.handled["icmp_echo"] == 1
            [flow] = [f for f in stack.status()["flows"] if f["proto"] == "icmp"]
            assert flow["replies"] == 1


def test_a_slow_batch_wakes_the_outbox_s_consumer_once_at_its_end() -> None:
    """Replies put while a batch of handed-over frames is dispatched do not
    wake the ring's consumer one by one (with a worker thread on the same
    core, each wake-up was a context switch per frame): its eventfd stays
    quiet until the batch is done, then says once that frames wait."""
    stack = UserStack(make_config(guest_mac=GUEST_MAC), 1)
    box = stack.outboxes[0]
    quiet: list[bool] = []
    dispatch = stack.guest_frame

    def watching(frame: bytes, pair: int, flags: int = 0) -> None:
        dispatch(frame, pair, flags)
        quiet.append(not select.select([box.wake_fd], [], [], 0)[0])

    req = bytes(
        Ether(src=G_MAC, dst="ff:ff:ff:ff:ff:ff")
        / ARP(op=1, hwsrc=G_MAC, psrc=str(GUEST4), pdst=str(GW4))
    )

    class Batch:
        def drain(self) -> list[SlowFrame]:
            return [SlowFrame(0, 0, req)] * 4

    try:
        stack.guest_frame = watching  # type: ignore[method-assign]
        stack.take_slow(Batch())  # type: ignore[arg-type]
        assert len(box) == 4 and quiet == [True] * 4
        assert os.eventfd_read(box.wake_fd) == 1
    finally:
        stack.close()
