"""A hostile guest driver: its rings may break only themselves.  Nothing it
writes stalls the process, makes it spin, or makes it allocate or copy more
than a frame's worth of memory."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.fakes.driver import DESC_F_INDIRECT, DESC_F_NEXT, GuestRam, Used
from tests.fakes.frontend import DRIVER_FEATURES, Frontend
from tests.fakes.service_process import ServiceProcess
from tests.unit.test_virtq import Rig
from trionet.errors import RingError
from trionet.native import ffi, lib
from trionet.net import features as F
from trionet.virtq.vring import DEVICE_READS

NO_CTRL = DRIVER_FEATURES & ~F.bit(F.CTRL_VQ)
HDR = 12


async def settle(fe: Frontend, proc: ServiceProcess) -> None:
    try:
        with trio.fail_after(5):
            await fe.sync()
    except (EOFError, OSError, trio.TooSlowError) as exc:
        proc.assert_alive()
        raise AssertionError(f"trionet stopped answering: {exc!r}\n{proc.log()}") from None


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


# ---- RX: some room, but less than a frame needs -----------------------------------------


@pytest.mark.parametrize(
    "trionet", [("--loop-generate", "1500"), ("--loop-generate", "1500", "--threads")],
    ids=["trio", "threads"], indirect=True,
)  # fmt: skip
async def test_rx_ring_with_too_little_room_waits_for_a_kick(
    trionet: ServiceProcess, ram: GuestRam
) -> None:
    """MRG_RXBUF: one 64-byte buffer is "not empty" but cannot take a 1512-byte
    frame.  The RX loop must sleep until the driver adds buffers and kicks,
    not retry at once (a frozen Trio loop; a worker thread that never sees
    its stop fd)."""
    fe = await Frontend.connect(str(trionet.socket_path), ram)
    try:
        await fe.negotiate(NO_CTRL)
        await fe.setup_pairs(1)
        rx = fe.queues[0]
        rx.add_rx(64)
        fe.kick(0)
        await settle(fe, trionet)
        before = cpu_seconds(trionet.pid)
        await trio.sleep(0.5)  # a measurement window, not a synchronisation
        await settle(fe, trionet)
        busy = cpu_seconds(trionet.pid) - before
        assert busy < 0.3, f"trionet spun for {busy:.2f}s of CPU while the ring was short"
        for _ in range(40):  # now there is room for a frame: the kick wakes the generator
            rx.add_rx(64)
        fe.kick(0)
        with trio.fail_after(5):
            while not (used := rx.take_used()):
                await trio.sleep(0.005)
        assert sum(u.length for u in used) >= HDR + 1500
    finally:
        fe.close()
    await trionet.serves_next_connection(ram)
    assert trionet.stop(5) == 0, "SIGTERM did not stop trionet"


def test_rx_gather_remembers_how_far_it_looked(rig: Rig) -> None:
    """After a short gather, only buffers beyond those it saw count as news."""
    rig.q.add_rx(64)
    scratch, b = ffi.new("struct tn_scratch *"), ffi.new("struct tn_batch *")
    frame = bytes(HDR + 1500)
    assert lib.tn_rx_fill(rig.vr.vq, rig.mem.table, 1, HDR, frame, len(frame), 8, scratch, b) == 0
    assert b.ring_full
    assert not rig.vr.enable_notify()  # the 64 bytes are no news: sleep until a kick
    rig.q.add_rx(2048)
    assert rig.vr.enable_notify()  # a buffer past those: try again
    assert lib.tn_rx_fill(rig.vr.vq, rig.mem.table, 1, HDR, frame, len(frame), 8, scratch, b) == 1


# ---- RX from an fd: every frame read counts toward the batch ---------------------------


@pytest.mark.parametrize("refused", ["short", "filtered"])
def test_rx_from_fd_batch_is_bounded_by_frames_read(rig: Rig, refused: str) -> None:
    """Frames dropped as too short or refused by the driver's filter count
    toward the batch limit: a flood of them cannot keep the call from returning."""
    f = ffi.new("struct tn_rxfilter *")  # all zero: no promisc, no MAC: unicast refused
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        if refused == "short":
            frame = b"x" * 5
        else:
            frame = bytes(HDR) + bytes.fromhex("5254000000aa") * 2 + b"\x08\x00" + bytes(46)
        for _ in range(100):
            a.send(frame)
        for _ in range(4):
            rig.q.add_rx(2048)
        b.setblocking(False)
        scratch, batch = ffi.new("struct tn_scratch *"), ffi.new("struct tn_batch *")
        rc = lib.tn_rx_from_fd(
            rig.vr.vq, rig.mem.table, b.fileno(), 1, HDR, 1600, 16, scratch, batch, f
        )
        assert rc == 0
        dropped = batch.drops_bad_frame + batch.drops_filtered
        assert 0 < dropped <= 16
    finally:
        a.close()
        b.close()


# ---- indirect tables have a size cap -----------------------------------------------------


def test_indirect_table_larger_than_the_cap_breaks_the_ring(rig: Rig) -> None:
    """An indirect table of 4096 descriptors (the ring has 16): the walk is
    bounded by a cap, not by whatever length the guest wrote."""
    entries = 4096
    table = rig.ram.alloc(16 * entries, 16)
    buf = rig.ram.alloc(64)
    last = entries - 1
    data = b"".join(
        struct.pack("<QIHH", buf, 60 if i == last else 0, 0 if i == last else DESC_F_NEXT, i + 1)
        for i in range(entries)
    )
    rig.ram.write(table, data)
    rig.q.set_desc(0, table, 16 * entries, DESC_F_INDIRECT)
    rig.q.publish_head(0)
    with pytest.raises(RingError, match="indirect table"):
        rig.vr.pop(rig.mem, DEVICE_READS)
    assert rig.vr.vq.broken == 1


def test_indirect_table_within_the_cap_still_works(rig: Rig) -> None:
    rig.q.add_tx(b"y" * 900, segments=300, indirect=True)
    chain = rig.vr.pop(rig.mem, DEVICE_READS)
    assert chain is not None and chain.readable == b"y" * 900


# ---- a disabled TX ring is discarded without copying --------------------------------------


async def test_discarding_a_disabled_tx_ring_copies_nothing(
    trionet: ServiceProcess, ram: GuestRam
) -> None:
    """A chain claiming 1 GiB (256 descriptors over the same 4 MiB): discarding
    it must not allocate or copy what it claims."""
    fe = await Frontend.connect(str(trionet.socket_path), ram)
    try:
        await fe.negotiate(NO_CTRL)
        await fe.setup_vring(0, enable=False)
        tx = await fe.setup_vring(1, enable=False)
        await settle(fe, trionet)
        rss = trionet.peak_rss()
        entries = 256
        table = ram.alloc(16 * entries, 16)
        last = entries - 1
        descs = [
            struct.pack("<QIHH", ram.base, ram.size, 0 if i == last else DESC_F_NEXT, i + 1)
            for i in range(entries)
        ]
        ram.write(table, b"".join(descs))
        head = 0
        tx.set_desc(head, table, 16 * entries, DESC_F_INDIRECT)
        for _ in range(4):
            tx.publish_head(head)
        fe.kick(1)
        with trio.fail_after(20):
            used: list[Used] = []
            while len(used) < 4:
                trionet.assert_alive()
                used += tx.take_used()
                await trio.sleep(0.005)
        await settle(fe, trionet)
        grew = trionet.peak_rss() - rss
        assert grew < 64 << 20, f"discarding grew the process by {grew >> 20} MiB"
        status = await trio.to_thread.run_sync(_status, trionet)
        assert status["pairs"][0]["drops_by_reason"]["tx_ring_disabled"] == 4
    finally:
        fe.close()
    await trionet.serves_next_connection(ram)


def _status(proc: ServiceProcess) -> dict[str, Any]:
    from trionet.service.server import read_status

    return read_status(proc.control_path)
