"""A session served to the scripted front-end, on the loop backend."""

from __future__ import annotations

import trio

from tests.fakes.frontend import Frontend
from trionet.service.server import Service

HDR = bytes(12)


async def wait_used(fe: Frontend, index: int, n: int = 1) -> list:
    got: list = []
    with trio.fail_after(5):
        while len(got) < n:
            got += fe.queues[index].take_used()
            if len(got) < n:
                await trio.sleep(0.001)
    return got


async def test_frame_comes_back_on_its_pair(frontend: Frontend, loop_service: Service) -> None:
    await frontend.negotiate()
    await frontend.setup_pairs(1)
    await frontend.sync()
    rx, tx = frontend.queues[0], frontend.queues[1]
    for _ in range(4):
        rx.add_rx(2048)
    frame = HDR + bytes(range(60))
    tx.add_tx(frame, segments=3)
    frontend.kick(1)
    [done] = await wait_used(frontend, 1)
    assert done.length == 0
    [got] = await wait_used(frontend, 0)
    data = rx.read_rx(got)
    assert data[12:] == frame[12:]
    assert int.from_bytes(data[10:12], "little") == 1  # num_buffers
    st = loop_service.status()
    assert st["pairs"][0]["tx_packets"] == 1
    assert st["pairs"][0]["rx_packets"] == 1
