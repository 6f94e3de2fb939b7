"""Live migration through a whole session: QEMU's sequence (SET_LOG_BASE, LOG_ALL
on a running device, SET_VRING_ADDR with VHOST_VRING_F_LOG, GET_VRING_BASE) against
the loop backend on the Trio thread and on worker threads (two pairs, so two workers
mark the log at once), and SEND_RARP on the user backend."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from tests.fakes.driver import DriverQueue
from tests.fakes.frontend import DRIVER_FEATURES, Frontend
from tests.fakes.userguest import make_config, user_guest
from tests.waits import until
from trionet.dirtylog import LOG_PAGE, log_bytes_for
from trionet.net import features as F
from trionet.service.server import Service
from trionet.vhost_user import messages as m
from trionet.vhost_user.constants import VHOST_VRING_F_LOG, ProtocolFeature

HDR = bytes(12)
PAIRS = 2
FRAMES = 40  # per pair
PROTOCOL = int(
    ProtocolFeature.MQ
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
    | ProtocolFeature.STATUS
    | ProtocolFeature.LOG_SHMFD
)


def marked(log: mmap.mmap, size: int) -> set[int]:
    data = bytes(log[:size])
    return {8 * i + b for i, byte in enumerate(data) for b in range(8) if byte >> b & 1}


def pages(gpa: int, length: int) -> set[int]:
    return set(range(gpa // LOG_PAGE, (gpa + length - 1) // LOG_PAGE + 1))


async def wait_used(q: DriverQueue, n: int) -> list:  # type: ignore[type-arg]
    got: list = []  # type: ignore[type-arg]

    def enough() -> bool:
        got.extend(q.take_used())
        return len(got) >= n

    await until(enough, f"{n} used entries")
    return got


async def test_a_migrating_session_marks_what_its_pairs_write(
    frontend: Frontend, loop_service: Service
) -> None:
    fe, ram = frontend, frontend.ram
    await fe.negotiate(protocol=PROTOCOL)
    assert fe.protocol_features & ProtocolFeature.LOG_SHMFD
    await fe.setup_pairs(PAIRS)
    await fe.sync()
    session = loop_service.session
    assert session is not None
    await session.apply_active_pairs(PAIRS, "test")

    # the migration starts: QEMU's log, LOG_ALL on the running device, and each
    # ring's log address (QEMU gives the used ring's guest address)
    size = log_bytes_for(ram.base + ram.size)
    fd = os.memfd_create("test-log", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    log = mmap.mmap(fd, size)
    assert await fe.call(m.SetLogBase(size, 0, fd)) == b""  # the empty reply
    os.close(fd)
    assert await fe.acked(m.SetFeatures(DRIVER_FEATURES | F.bit(F.LOG_ALL))) == 0
    for i, q in fe.queues.items():
        u = ram.uva - ram.base
        addr = m.SetVringAddr(i, VHOST_VRING_F_LOG, q.desc + u, q.used + u, q.avail + u, q.used)
        await fe.send(addr)
    await fe.sync()

    # both pairs loop frames back at once: the RX buffers are each on their own pages
    rx = {p: fe.queues[2 * p] for p in range(PAIRS)}
    tx = {p: fe.queues[2 * p + 1] for p in range(PAIRS)}
    for p in range(PAIRS):
        for _ in range(FRAMES):
            rx[p].add_rx(2 * LOG_PAGE)
        for i in range(FRAMES):
            tx[p].add_tx(HDR + bytes([p, i]) * 700)
        fe.kick(2 * p)
    for p in range(PAIRS):
        fe.kick(2 * p + 1)
    used = {p: await wait_used(rx[p], FRAMES) for p in range(PAIRS)}

    got = marked(log, size)
    for p in range(PAIRS):
        for u in used[p]:
            assert rx[p].read_rx(u)[12:14] == bytes([p, used[p].index(u)])
            ((gpa, _),) = rx[p].buffers[u.head]
            assert pages(gpa, u.length) <= got, f"pair {p} buffer {u.head} not marked"
        for q in (rx[p], tx[p]):
            assert pages(q.used + 2, 2) <= got
            assert pages(q.used + 4, 8 * FRAMES) <= got

    # the source stops: GET_VRING_BASE returns the used index, as published
    for i, q in fe.queues.items():
        index, base = m.VRING_STATE_STRUCT.unpack(await fe.call(m.GetVringBase(i)))
        assert (index, base) == (i, q.used_idx())
    log.close()


async def test_send_rarp_on_the_user_backend_is_counted_and_teaches_the_mac(
    tmp_path: Path,
) -> None:
    async with user_guest(tmp_path, make_config()) as g:
        session = g.service.session
        assert session is not None and session.stack is not None
        assert session.stack.guest_mac is None
        mac = bytes.fromhex("525400abcdef")
        await g.fe.send(m.SendRarp(mac))
        await g.fe.sync()
        assert session.status()["announces"] == 1
        assert session.stack.guest_mac == mac
