"""The loop backend as a traffic source (--loop-generate): each active pair's
RX ring is kept full of one generated frame, on both data paths."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tests.fakes.driver import GuestRam
from tests.fakes.frontend import Frontend
from trionet.backends.loop import LoopBackend, generated_frame
from trionet.service.server import Service, ServiceConfig

SIZE = 60


@pytest.fixture(params=["trio", "threads"])
async def gen_service(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Service]:
    config = ServiceConfig(
        threads=request.param == "threads",
        queue_pairs=2,
        socket_path=tmp_path / "vhost.sock",
    )
    service = Service(config, LoopBackend(config.queue_pairs, generate_size=SIZE))
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        yield service
        nursery.cancel_scope.cancel()


async def _used(fe: Frontend, index: int, n: int) -> list:
    got: list = []
    with trio.fail_after(5):
        while len(got) < n:
            got += fe.queues[index].take_used()
            await trio.sleep(0.001)
    return got


def test_generated_frame_shape() -> None:
    f = generated_frame(SIZE)
    assert len(f) == SIZE and f[:6] == b"\xff" * 6 and f[12:14] == b"\x88\xb5"
    with pytest.raises(ValueError):
        generated_frame(13)


async def test_generator_fills_rx_and_refills_on_kick(gen_service: Service, ram: GuestRam) -> None:
    assert gen_service.config.socket_path is not None
    fe = await Frontend.connect(str(gen_service.config.socket_path), ram)
    try:
        await fe.negotiate()
        await fe.setup_pairs(2)
        await fe.sync()
        rx = fe.queues[0]
        for _ in range(8):
            rx.add_rx(2048)
        fe.kick(0)
        first = await _used(fe, 0, 8)
        assert {u.length for u in first} == {12 + SIZE}
        data = rx.read_rx(first[0])
        assert data[12:] == generated_frame(SIZE)
        assert int.from_bytes(data[10:12], "little") == 1  # num_buffers
        # the ring is full: nothing more until the driver adds buffers and kicks
        await trio.sleep(0.05)
        assert rx.take_used() == []
        for _ in range(4):
            rx.add_rx(2048)
        fe.kick(0)
        assert len(await _used(fe, 0, 4)) == 4
        st = gen_service.status()
        assert st["pairs"][0]["rx_packets"] == 12
        assert st["pairs"][0]["tx_packets"] == 0
        # pair 1 is not active (one pair after reset): its RX ring gets nothing
        q1 = fe.queues[2]
        q1.add_rx(2048)
        fe.kick(2)
        await trio.sleep(0.05)
        assert q1.take_used() == []
    finally:
        fe.close()
