"""A guest on trionet's user backend, played by the test: frames in, frames out.

Wraps the scripted front-end: ``send(pair, frame)`` puts an Ethernet frame
(built with scapy by the test) on a pair's TX ring and kicks it; ``recv(pair)``
waits for the next frame on that pair's RX ring by waiting on the ring's call
eventfd (state, not time).  RX rings are kept stocked with buffers.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import trio

from tests.fakes.driver import GuestRam
from tests.fakes.frontend import DRIVER_FEATURES, Frontend
from tests.fakes.sandboxed import sandbox_for_tests
from trionet.backends.user import UserBackend
from trionet.backends.user.config import UserConfig, V4Config, V6Config
from trionet.net import features as F
from trionet.service.server import Service, ServiceConfig

HDR = 12
GUEST_MAC = bytes.fromhex("525400123456")
OUR_MAC = bytes.fromhex("9a559a559a55")
GUEST4, GW4 = IPv4Address("10.0.2.15"), IPv4Address("10.0.2.2")
GUEST6, GW6 = IPv6Address("fd00:2::15"), IPv6Address("fd00:2::2")
RX_BUFFERS = 32


def make_config(**kw: object) -> UserConfig:
    """The addressing the tests use: 10.0.2.15/24 and fd00:2::15/64 behind
    gateways that are the host's loopback."""
    v4 = V4Config(GUEST4, 24, GW4, GW4, (GW4,))
    v6 = V6Config(GUEST6, 64, GW6, IPv6Address("fe80::1"), GW6, (GW6,))
    args: dict[str, object] = {
        "v4": v4, "v6": v6, "guest_mac": None, "our_mac": OUR_MAC, "mtu": 65520,
    }  # fmt: skip
    args.update(kw)
    return UserConfig(**args)  # type: ignore[arg-type]


def _is_router_advertisement(frame: bytes) -> bool:
    return frame[12:14] == b"\x86\xdd" and frame[20] == 58 and frame[54] == 134


class UserGuest:
    def __init__(self, fe: Frontend, service: Service, pairs: int) -> None:
        self.fe = fe
        self.service = service
        self.pairs = pairs
        self.pending: dict[int, deque[bytes]] = {p: deque() for p in range(pairs)}

    def stock(self, pair: int, n: int = RX_BUFFERS, capacity: int = 4096) -> None:
        for _ in range(n):
            self.fe.queues[2 * pair].add_rx(capacity)
        self.fe.kick(2 * pair)

    def send(self, pair: int, frame: bytes, flags: int = 0) -> None:
        hdr = bytes([flags]) + bytes(HDR - 1)
        self.fe.queues[2 * pair + 1].add_tx(hdr + frame)
        self.fe.kick(2 * pair + 1)

    def _collect(self, pair: int) -> None:
        q = self.fe.queues[2 * pair]
        used = q.take_used()
        for u in used:
            self.pending[pair].append(q.read_rx(u))
            q.add_rx(4096)
        if used:
            self.fe.kick(2 * pair)  # as a driver does after adding buffers
        q.set_used_event(q.last_used)

    async def recv_raw(self, pair: int, timeout: float = 5) -> bytes:
        """The next frame on ``pair``'s RX ring, virtio-net header included,
        other than the stack's own router advertisements (it sends one
        unprompted when the guest shows up)."""
        while True:
            raw = await self._next(pair, timeout)
            if not _is_router_advertisement(raw[HDR:]):
                return raw

    async def _next(self, pair: int, timeout: float) -> bytes:
        call = self.fe.calls[2 * pair]
        with trio.move_on_after(timeout):
            while True:
                self._collect(pair)
                if self.pending[pair]:
                    return self.pending[pair].popleft()
                await trio.lowlevel.wait_readable(call)
                with suppress(BlockingIOError):
                    os.eventfd_read(call)
        st = self.service.status()
        pairs = [{k: p[k] for k in ("index", "tx_packets", "rx_packets", "drops_by_reason")}
                 for p in st["pairs"]]  # fmt: skip
        changes = st["active_changes"]
        raise AssertionError(
            f"no frame on pair {pair} in {timeout} s: {pairs} {changes} {st['user']}"
        )

    async def recv(self, pair: int, timeout: float = 5) -> bytes:
        return (await self.recv_raw(pair, timeout))[HDR:]

    def nothing_on(self, pair: int) -> bool:
        self._collect(pair)
        return not self.pending[pair]

    def user_status(self) -> dict[str, object]:
        st = self.service.status()["user"]
        assert isinstance(st, dict)
        return st


@asynccontextmanager
async def user_guest(
    tmp_path: Path,
    cfg: UserConfig,
    pairs: int = 2,
    features: int = DRIVER_FEATURES,
    *,
    threads: bool = False,
    stock: int = RX_BUFFERS,
    ram_size: int = 8 << 20,
) -> AsyncIterator[UserGuest]:
    """A trionet service on the user backend with ``pairs`` pairs set up and
    active, served on the Trio thread or (``threads``) by worker threads, each
    RX ring stocked with ``stock`` 4 KiB buffers (0: the test stocks them)."""
    config = ServiceConfig(
        queue_pairs=pairs,
        socket_path=tmp_path / "vhost.sock",
        mtu=cfg.mtu,
        threads=threads,
        after_setup=sandbox_for_tests(),
    )
    backend = UserBackend(cfg, pairs)
    service = Service(config, backend)
    ram = GuestRam(ram_size)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            fe = await Frontend.connect(str(config.socket_path), ram)
            try:
                await fe.negotiate(features | F.bit(F.GUEST_CSUM) | F.bit(F.CSUM))
                await fe.setup_pairs(pairs)
                await fe.sync()
                session = service.session
                assert session is not None
                await session.apply_active_pairs(pairs, "test")
                guest = UserGuest(fe, service, pairs)
                for p in range(pairs):
                    if stock:
                        guest.stock(p, stock)
                yield guest
            finally:
                fe.close()
                nursery.cancel_scope.cancel()
    finally:
        await backend.aclose()
        ram.close()
