"""Interrupt coalescing with EVENT_IDX, on both data paths.

The guest is interrupted at most once per batch, never when it has not asked
(its used_event is behind), and always when it has.  The eventfd counter adds
up every write, so reading it gives the number of interrupts sent."""

from __future__ import annotations

import trio

from tests.fakes.frontend import Frontend
from tests.waits import until
from trionet.service.server import Service

HDR = bytes(12)
FRAMES = 40


async def _round(frontend: Frontend, service: Service, arm: bool) -> tuple[int, int, int]:
    """Queue FRAMES frames on TX with one kick; wait until all are looped back.
    Returns (RX interrupts, TX interrupts, batches the pair ran)."""
    rx, tx = frontend.queues[0], frontend.queues[1]
    if arm:  # "interrupt me at the next used entry", as a driver enabling callbacks
        rx.set_used_event(rx.last_used)
        tx.set_used_event(tx.last_used)
    await trio.sleep(0.02)  # the pair is asleep on its kick, not spinning
    before = service.status()["pairs"][0]
    for i in range(FRAMES):
        tx.add_tx(HDR + bytes([i]) * 60)
    frontend.kick(1)
    got_rx = got_tx = 0
    with trio.fail_after(5):
        while got_rx < FRAMES or got_tx < FRAMES:
            got_rx += len(rx.take_used())
            got_tx += len(tx.take_used())
            await trio.sleep(0.001)
    # The call eventfds are written just after the used rings, and before the
    # pair asks for kicks again (EVENT_IDX: avail_event moves up to avail idx):
    # once it has, whatever interrupts this batch sends have been sent.
    await until(lambda: tx.avail_event() == tx.avail_idx, "the pair to ask for kicks again")
    after = service.status()["pairs"][0]
    assert after["rx_packets"] - before["rx_packets"] == FRAMES
    return frontend.calls_pending(0), frontend.calls_pending(1), after["kicks"] - before["kicks"]


async def test_event_idx_interrupts_once_per_batch_and_only_when_asked(
    frontend: Frontend, loop_service: Service
) -> None:
    await frontend.negotiate()
    await frontend.setup_pairs(1)
    await frontend.sync()
    rx = frontend.queues[0]
    for _ in range(3 * FRAMES):
        rx.add_rx(2048)
    # fresh rings: used_event 0, so the first batch interrupts, once per ring
    assert await _round(frontend, loop_service, arm=False) == (1, 1, 1)
    # the driver did not move used_event: 40 more frames, no interrupt at all
    assert await _round(frontend, loop_service, arm=False) == (0, 0, 1)
    # re-armed: one interrupt per ring for the whole batch, not one per frame
    assert await _round(frontend, loop_service, arm=True) == (1, 1, 1)


async def test_a_started_but_disabled_ring_with_nothing_used_never_interrupts(
    frontend: Frontend, loop_service: Service
) -> None:
    await frontend.negotiate()
    await frontend.setup_vring(0)
    await frontend.setup_vring(1, enable=False)  # TX started, not enabled: discarded
    await frontend.sync()
    await trio.sleep(0.05)
    assert frontend.calls_pending(1) == 0
    frontend.queues[1].add_tx(HDR + bytes(60))
    frontend.kick(1)
    with trio.fail_after(5):
        while not frontend.queues[1].take_used():
            await trio.sleep(0.001)
        await trio.lowlevel.wait_readable(frontend.calls[1])  # the call comes after the used ring
    assert frontend.calls_pending(1) == 1  # the discarded chain is completed and signalled
