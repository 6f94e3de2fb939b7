"""The drain on the user backend: every TX chain the guest got back as used
was delivered to the host, including frames a native worker's last batch
handed to Python (``--threads``) just before the pairs stopped.  Every
datagram opens a new flow, so every one takes Python's path."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest
import trio
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from tests.fakes.userguest import GUEST4, GUEST_MAC, GW4, OUR_MAC, make_config, user_guest

PAIRS = 2
ROUNDS, PER_ROUND = 10, 16  # 160 chains per TX ring: within the fake ring's 256


def datagram(pair: int, seq: int, port: int) -> bytes:
    return bytes(
        Ether(src=GUEST_MAC, dst=OUR_MAC)
        / IP(src=str(GUEST4), dst=str(GW4))
        / UDP(sport=20000 + 1000 * pair + seq, dport=port)  # a new flow each: Python's path
        / Raw(struct.pack("<II", pair, seq))
    )


def received(host: socket.socket) -> list[tuple[int, int]]:
    out = []
    while True:
        try:
            out.append(struct.unpack("<II", host.recv(64)))
        except BlockingIOError:
            return out


@pytest.mark.parametrize("threads", [False, True], ids=["trio", "threads"])
async def test_drain_delivers_every_used_datagram(tmp_path: Path, threads: bool) -> None:
    host = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    host.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    host.bind(("127.0.0.1", 0))
    host.setblocking(False)
    port = host.getsockname()[1]
    async with user_guest(tmp_path, make_config(), PAIRS, threads=threads) as g:
        halfway = trio.Event()

        async def traffic() -> None:
            for r in range(ROUNDS):
                for p in range(PAIRS):
                    for i in range(PER_ROUND):
                        g.send(p, datagram(p, r * PER_ROUND + i, port))
                if r == ROUNDS // 2:
                    halfway.set()
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(traffic)
            await halfway.wait()
            await g.service.drain()  # traffic is still being added meanwhile
        used = {p: len(g.fe.queues[2 * p + 1].take_used()) for p in range(PAIRS)}
        assert g.service.status()["draining"]
    got = received(host)
    host.close()
    assert sum(used.values()) >= PER_ROUND  # the drain did not come before all traffic
    for p in range(PAIRS):
        seqs = sorted(s for q, s in got if q == p)
        # used ⇔ delivered: each used chain's datagram reached the host once
        assert seqs == list(range(used[p])), (p, used[p], seqs[:5], len(seqs))
