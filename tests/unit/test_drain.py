"""SIGTERM under traffic: trionet drains and exits 0 with no used entry lost.

A scripted guest keeps every pair of a ``--backend loop`` trionet busy:
numbered frames on TX, RX buffers re-posted as they fill (always more RX room
than TX frames in flight, so the loop never drops).  Mid-stream the process
gets SIGTERM.  Then, as QEMU does when a backend went away, a second trionet
is started and the rings are handed to it from their used indices
(``SET_VRING_BASE`` = used idx), with the same ``--state-file``.  The guest
must see every frame echoed exactly once, in order, across both processes: a chain the first process
took without returning it as used would come back twice (or leave a gap).
"""

from __future__ import annotations

import os
import signal
import struct
from contextlib import suppress
from pathlib import Path

import pytest
import trio

from tests.fakes.driver import DESC_F_WRITE, DriverQueue, GuestRam
from tests.fakes.frontend import DRIVER_FEATURES, Frontend
from tests.fakes.service_process import ServiceProcess
from trionet.net import features as F
from trionet.vhost_user import messages as m

PAIRS = 4
RING = 256
TX_SLOTS = 64  # TX frames in flight per pair, at most
RX_SLOTS = 128  # RX buffers per pair: always room for every TX frame in flight
SLOT = 128
HDR = bytes(12)
# no EVENT_IDX: every publish with used entries interrupts (simplest driver)
FEATURES = DRIVER_FEATURES & ~F.bit(F.RING_EVENT_IDX)
BEFORE_SIGTERM = 300  # frames echoed on every pair before the signal
AFTER_RESTART = 100  # more frames on every pair through the second process


def frame(pair: int, seq: int) -> bytes:
    eth = b"\x52\x54\x00\x00\x00\x01" + b"\x52\x54\x00\x00\x00\x02" + b"\x88\xb5"
    return eth + struct.pack("<II", pair, seq) + bytes(40)


class PairTraffic:
    """One pair's side of the guest: fixed descriptor slots, numbered frames."""

    def __init__(self, fe: Frontend, ram: GuestRam, pair: int) -> None:
        self.pair = pair
        self.fe = fe
        self.rx: DriverQueue = fe.queues[2 * pair]
        self.tx: DriverQueue = fe.queues[2 * pair + 1]
        self.tx_free = [self.tx._free.pop(0) for _ in range(TX_SLOTS)]
        self.tx_gpa = {h: ram.alloc(SLOT) for h in self.tx_free}
        self.rx_gpa: dict[int, int] = {}
        for _ in range(RX_SLOTS):
            head = self.rx._free.pop(0)
            self.rx_gpa[head] = ram.alloc(SLOT)
            self._post_rx(head)
        self.ram = ram
        self.next_seq = 0
        self.tx_done = 0
        self.received: list[int] = []
        self.progress = trio.Event()
        self.goal = 0

    def _post_rx(self, head: int) -> None:
        self.rx.set_desc(head, self.rx_gpa[head], SLOT, DESC_F_WRITE)
        self.rx.publish_head(head)

    def step(self) -> None:
        """Take used entries from both rings, re-post RX, refill TX."""
        got_rx = False
        for u in self.rx.take_used():
            data = self.ram.read(self.rx_gpa[u.head], u.length)
            pair, seq = struct.unpack_from("<II", data, len(HDR) + 14)
            assert pair == self.pair
            self.received.append(seq)
            self._post_rx(u.head)
            got_rx = True
        if got_rx:
            self.fe.kick(2 * self.pair)
        for u in self.tx.take_used():
            self.tx_done += 1
            self.tx_free.append(u.head)
        put = False
        while self.tx_free:
            head = self.tx_free.pop()
            data = HDR + frame(self.pair, self.next_seq)
            self.ram.write(self.tx_gpa[head], data)
            self.tx.set_desc(head, self.tx_gpa[head], len(data))
            self.tx.publish_head(head)
            self.next_seq += 1
            put = True
        if put:
            self.fe.kick(2 * self.pair + 1)
        if len(self.received) >= self.goal:
            self.progress.set()

    async def run(self) -> None:
        call = self.fe.calls[2 * self.pair]
        while True:
            self.step()
            await trio.lowlevel.wait_readable(call)
            with suppress(BlockingIOError):
                os.eventfd_read(call)

    def rebind(self, fe: Frontend, goal: int) -> None:
        self.fe, self.goal, self.progress = fe, goal, trio.Event()


async def hand_over(fe: Frontend, queues: dict[int, DriverQueue]) -> None:
    """Give a fresh backend the running rings, from their used indices."""
    await fe.negotiate(FEATURES)
    for index, q in sorted(queues.items()):
        fe.queues[index] = q
        ram = q.ram
        await fe.send(m.SetVringNum(index=index, num=q.size))
        await fe.send(m.SetVringBase(index=index, num=q.used_idx()))
        await fe.send(
            m.SetVringAddr(
                index=index, flags=0,
                desc_user_addr=q.desc - ram.base + ram.uva,
                used_user_addr=q.used - ram.base + ram.uva,
                avail_user_addr=q.avail - ram.base + ram.uva,
                log_guest_addr=0,
            )
        )  # fmt: skip
        for table in (fe.calls, fe.kicks, fe.errs):
            table[index] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        await fe.send(m.SetVringCall(index=index, fd=fe.calls[index]))
        await fe.send(m.SetVringErr(index=index, fd=fe.errs[index]))
        await fe.send(m.SetVringKick(index=index, fd=fe.kicks[index]))
        await fe.send(m.SetVringEnable(index=index, enable=True))
    await fe.send(m.SetStatus(status=15))
    await fe.sync()


async def wait_exit(proc: ServiceProcess, timeout: float = 60) -> int:
    with trio.fail_after(timeout):
        return await trio.to_thread.run_sync(proc.popen.wait, abandon_on_cancel=True)


async def until_progress(gens: list[PairTraffic]) -> None:
    with trio.fail_after(60):
        for g in gens:
            await g.progress.wait()


@pytest.mark.parametrize("mode", [(), ("--threads",)], ids=["trio", "threads"])
async def test_sigterm_under_traffic_loses_no_used_entry(
    tmp_path: Path, mode: tuple[str, ...]
) -> None:
    ram = GuestRam(8 << 20)
    # the restart path the operator's page documents: the same --state-file
    state = ("--state-file", str(tmp_path / "state.json"))
    first = ServiceProcess(tmp_path, *mode, *state, "--grace", "10")
    (tmp_path / "second").mkdir()
    second: ServiceProcess | None = None
    try:
        await first.started()
        fe = await Frontend.connect(str(first.socket_path), ram)
        await fe.negotiate(FEATURES)
        for i in range(2 * PAIRS):
            await fe.setup_vring(i, RING)
        await fe.send(m.SetStatus(status=15))  # DRIVER_OK: all pairs active
        await fe.sync()
        gens = [PairTraffic(fe, ram, p) for p in range(PAIRS)]
        for g in gens:
            g.goal = BEFORE_SIGTERM
        async with trio.open_nursery() as nursery:
            for g in gens:
                nursery.start_soon(g.run)
            await until_progress(gens)
            first.popen.send_signal(signal.SIGTERM)  # traffic still flowing
            rc = await wait_exit(first)
            nursery.cancel_scope.cancel()
        assert rc == 0, first.log()
        assert "drained" in first.log()
        for g in gens:
            g.step()  # whatever the last batch published
            # everything taken was echoed, and returned as used: nothing in between
            assert g.received == list(range(len(g.received)))
            assert g.tx_done == len(g.received), (g.pair, g.tx_done, len(g.received))
            assert g.tx_done >= BEFORE_SIGTERM
        echoed_before = [len(g.received) for g in gens]
        queues = dict(fe.queues)
        fe.close()

        # the VMM reconnects to a new backend from the used indices
        second = ServiceProcess(tmp_path / "second", *mode, *state)
        await second.started()
        fe2 = Frontend(await _connect(second), ram)
        await hand_over(fe2, queues)
        for g in gens:
            g.rebind(fe2, len(g.received) + AFTER_RESTART)
        async with trio.open_nursery() as nursery:
            for g in gens:
                nursery.start_soon(g.run)
            await until_progress(gens)
            nursery.cancel_scope.cancel()
        for g, before in zip(gens, echoed_before, strict=True):
            # each frame exactly once, in order, across the two processes
            assert g.received == list(range(len(g.received)))
            assert len(g.received) >= before + AFTER_RESTART
        fe2.close()
    finally:
        first.stop()
        if second is not None:
            assert second.stop() == 0
        ram.close()


async def _connect(proc: ServiceProcess) -> trio.socket.SocketType:
    import socket

    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(str(proc.socket_path))
    return sock
