"""The namespace front end's driver loop (native/nsdrv.c) and front end
(trionet/netns/frontend.py), without a namespace: a SOCK_SEQPACKET socketpair
stands in for the tap (one read or write per frame, as a tap's).

The driver tests play the device themselves, like rust-vmm's
MockSplitQueue: they read what the loop posted, complete it and signal the
call eventfd.  The front-end tests run it against a real in-process session
on the user backend."""

from __future__ import annotations

import errno
import mmap
import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import trio
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from tests.fakes.userguest import GUEST4, GUEST_MAC, GW4, OUR_MAC, make_config
from trionet.backends.user import UserBackend
from trionet.native import ffi, lib
from trionet.netns.frontend import FrontendError, NetnsFrontend, RingAt, layout
from trionet.service.server import Service, ServiceConfig

QSIZE = 8
BUF = 512
HDR = 12
TIMEOUT = 10


async def _eventfd(fd: int) -> int:
    """Wait until the eventfd was written; its count."""
    with trio.fail_after(TIMEOUT):
        while True:
            try:
                return os.eventfd_read(fd)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fd)


@dataclass
class Device:
    """The device's view of one ring the loop drives."""

    ram: mmap.mmap
    at: RingAt
    last_avail: int = 0
    used_idx: int = 0

    def avail_idx(self) -> int:
        return int(struct.unpack_from("<H", self.ram, self.at.avail + 2)[0])

    def desc(self, i: int) -> tuple[int, int, int]:
        addr, length, flags, _ = struct.unpack_from("<QIHH", self.ram, self.at.desc + 16 * i)
        return addr, length, flags

    def take(self) -> list[int]:
        """Heads the loop posted since the last take."""
        heads = []
        while self.last_avail != self.avail_idx():
            slot = self.at.avail + 4 + 2 * (self.last_avail % QSIZE)
            heads.append(int(struct.unpack_from("<H", self.ram, slot)[0]))
            self.last_avail = (self.last_avail + 1) & 0xFFFF
        return heads

    def complete(self, head: int, length: int) -> None:
        slot = self.at.used + 4 + 8 * (self.used_idx % QSIZE)
        struct.pack_into("<II", self.ram, slot, head, length)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        struct.pack_into("<H", self.ram, self.at.used + 2, self.used_idx)


@dataclass
class Loop:
    d: Any
    rx: Device
    tx: Device
    tap: socket.socket  # the test's end of the stand-in tap
    fds: dict[str, int]
    result: list[int]
    done: trio.Event


@asynccontextmanager
async def driver_loop(**override: int) -> AsyncIterator[Loop]:
    size, rings = layout(1, QSIZE, BUF)
    memfd = os.memfd_create("test-nsdrv", os.MFD_CLOEXEC)
    os.ftruncate(memfd, size)
    ram = mmap.mmap(memfd, size)
    base = ffi.from_buffer("uint8_t[]", ram)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.setblocking(False)
    names = ("tx_kick", "tx_call", "rx_kick", "rx_call", "stop_fd")
    fds = {n: os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for n in names}
    rx, tx = rings[0]
    d = ffi.new("struct tn_nsdrv *")
    d.base, d.size = base, size
    d.tx_desc, d.tx_avail, d.tx_used, d.tx_bufs = tx.desc, tx.avail, tx.used, tx.bufs
    d.rx_desc, d.rx_avail, d.rx_used, d.rx_bufs = rx.desc, rx.avail, rx.used, rx.bufs
    d.qsize, d.buf_size, d.batch, d.tap_fd = QSIZE, BUF, 4, theirs.fileno()
    for n, fd in fds.items():
        setattr(d, n, fd)
    for k, v in override.items():
        setattr(d, k, v)
    loop = Loop(d, Device(ram, rx), Device(ram, tx), ours, fds, [], trio.Event())

    async def run() -> None:
        loop.result.append(await trio.to_thread.run_sync(lib.tn_nsdrv_run, d))
        loop.done.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            try:
                yield loop
            finally:
                os.eventfd_write(fds["stop_fd"], 1)
                with trio.fail_after(TIMEOUT):
                    await loop.done.wait()
    finally:
        for fd in fds.values():
            os.close(fd)
        ours.close()
        theirs.close()
        del base
        ram.close()
        os.close(memfd)


async def test_every_rx_buffer_is_posted_writable_and_kicked() -> None:
    async with driver_loop() as loop:
        await _eventfd(loop.fds["rx_kick"])
        heads = loop.rx.take()
        assert sorted(heads) == list(range(QSIZE))
        addrs = set()
        for h in heads:
            addr, length, flags = loop.rx.desc(h)
            assert (length, flags) == (BUF, 2)  # VIRTQ_DESC_F_WRITE
            assert loop.rx.at.bufs <= addr <= loop.rx.at.bufs + (QSIZE - 1) * BUF
            addrs.add(addr)
        assert len(addrs) == QSIZE
    assert loop.result == [0]


async def test_tap_frames_go_to_tx_and_wait_for_free_buffers() -> None:
    frames = [bytes([i]) * (HDR + 60 + i) for i in range(QSIZE + 3)]
    async with driver_loop() as loop:
        for f in frames:
            loop.tap.send(f)
        got: list[bytes] = []
        while len(got) < QSIZE:
            await _eventfd(loop.fds["tx_kick"])
            for h in loop.tx.take():
                addr, length, flags = loop.tx.desc(h)
                assert flags == 0
                got.append(bytes(loop.tx.ram[addr : addr + length]))
        # every buffer is out: the rest waits in the tap until the device
        # hands buffers back
        assert got == frames[:QSIZE]
        assert loop.tx.take() == []
        for h in range(QSIZE):
            loop.tx.complete(h, 0)
        os.eventfd_write(loop.fds["tx_call"], 1)
        while len(got) < len(frames):
            await _eventfd(loop.fds["tx_kick"])
            for h in loop.tx.take():
                addr, length, _ = loop.tx.desc(h)
                got.append(bytes(loop.tx.ram[addr : addr + length]))
        assert got == frames
        assert int(loop.d.stats.tx_frames) == len(frames)


async def test_used_rx_buffers_are_written_to_the_tap_and_posted_again() -> None:
    async with driver_loop() as loop:
        await _eventfd(loop.fds["rx_kick"])
        heads = loop.rx.take()
        sent = []
        for n, h in enumerate(heads[:3]):
            addr, _, _ = loop.rx.desc(h)
            frame = bytes([0x40 + n]) * (HDR + 100 + n)
            loop.rx.ram[addr : addr + len(frame)] = frame
            loop.rx.complete(h, len(frame))
            sent.append(frame)
        os.eventfd_write(loop.fds["rx_call"], 1)
        with trio.fail_after(TIMEOUT):
            got = []
            while len(got) < 3:
                await trio.lowlevel.wait_readable(loop.tap.fileno())
                got.append(loop.tap.recv(BUF))
        assert got == sent
        await _eventfd(loop.fds["rx_kick"])
        assert loop.rx.take() == heads[:3]  # the same buffers, posted again
        assert int(loop.d.stats.rx_frames) == 3


async def test_a_used_entry_naming_no_buffer_of_ours_ends_the_loop_with_eproto() -> None:
    async with driver_loop() as loop:
        await _eventfd(loop.fds["rx_kick"])
        loop.rx.complete(QSIZE + 5, 64)
        os.eventfd_write(loop.fds["rx_call"], 1)
        with trio.fail_after(TIMEOUT):
            await loop.done.wait()
        assert loop.result == [-errno.EPROTO]


@pytest.mark.parametrize(
    "override",
    [{"qsize": 6}, {"rx_bufs": 1 << 40}, {"size": 4096}, {"tap_fd": -1}, {"batch": 0}],
    ids=["qsize-not-power-of-two", "buffers-outside", "rings-outside", "no-tap", "no-batch"],
)
async def test_a_layout_that_does_not_fit_is_refused(override: dict[str, int]) -> None:
    async with driver_loop(**override) as loop:
        with trio.fail_after(TIMEOUT):
            await loop.done.wait()
    assert loop.result == [-errno.EINVAL]


# ------------------------------------------------------------ the front end


@asynccontextmanager
async def namespace_service(threads: bool) -> AsyncIterator[tuple[Service, socket.socket]]:
    """A service on the user backend whose guest is the front end, its tap a
    socketpair: the test's end carries frames with their virtio-net header."""
    cfg = make_config()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.setblocking(False)
    ours.setblocking(False)
    fe = NetnsFrontend([os.dup(theirs.fileno())], qsize=16)
    config = ServiceConfig(queue_pairs=1, mtu=cfg.mtu, threads=threads, frontend=fe)
    backend = UserBackend(cfg, 1)
    service = Service(config, backend)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.run)
            with trio.fail_after(TIMEOUT):
                await fe.ready.wait()
            yield service, ours
            nursery.cancel_scope.cancel()
    finally:
        await backend.aclose()
        ours.close()
        theirs.close()


async def _frame_from(tap: socket.socket, want: Any) -> Any:
    """The next frame out of the stack (header stripped) that has layer ``want``."""
    with trio.fail_after(TIMEOUT):
        while True:
            await trio.lowlevel.wait_readable(tap.fileno())
            pkt = Ether(tap.recv(70000)[HDR:])
            if want in pkt:
                return pkt


def _mac(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


@pytest.mark.parametrize("threads", [False, True], ids=["trio", "threads"])
async def test_the_front_end_carries_the_guests_arp_and_udp(threads: bool) -> None:
    host = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    host.bind(("127.0.0.1", 0))
    host.setblocking(False)
    port = host.getsockname()[1]
    async with namespace_service(threads) as (service, tap):
        gm, om = _mac(GUEST_MAC), _mac(OUR_MAC)
        who_has = Ether(src=gm, dst="ff:ff:ff:ff:ff:ff") / ARP(
            op=1, hwsrc=gm, psrc=str(GUEST4), pdst=str(GW4)
        )
        tap.send(bytes(HDR) + bytes(who_has))
        reply = await _frame_from(tap, ARP)
        assert (reply[ARP].op, reply[ARP].hwsrc, reply[ARP].psrc) == (2, om, str(GW4))
        dgram = (
            Ether(src=gm, dst=om)
            / IP(src=str(GUEST4), dst=str(GW4))
            / UDP(sport=40000, dport=port)
            / b"out through the front end"
        )
        tap.send(bytes(HDR) + bytes(dgram))
        with trio.fail_after(TIMEOUT):
            await trio.lowlevel.wait_readable(host.fileno())
        data, peer = host.recvfrom(100)
        assert data == b"out through the front end"
        host.sendto(b"and back", peer)
        back = await _frame_from(tap, UDP)
        assert (back[UDP].dport, back[Raw].load) == (40000, b"and back")
        st = service.status()
        assert st["netns"]["pairs"][0]["tx_frames"] >= 2
        assert st["netns"]["pairs"][0]["rx_frames"] >= 2
        assert st["active_pairs"] == 1
    host.close()


async def test_a_session_that_refuses_the_front_end_is_an_error() -> None:
    """More pairs than the session has: the front end says so and stops."""
    cfg = make_config()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    taps = [os.dup(theirs.fileno()) for _ in range(2)]
    fe = NetnsFrontend(list(taps), qsize=16)
    backend = UserBackend(cfg, 1)
    service = Service(ServiceConfig(queue_pairs=1, mtu=cfg.mtu, frontend=fe), backend)
    try:
        with pytest.raises(BaseExceptionGroup) as info, trio.fail_after(TIMEOUT):
            await service.run()
        assert info.group_contains(FrontendError, match="2 queue pairs asked, the session has 1")
        for fd in taps:  # the front end owns the tap's fds and closed them
            with pytest.raises(OSError):
                os.fstat(fd)
    finally:
        await backend.aclose()
        ours.close()
        theirs.close()
