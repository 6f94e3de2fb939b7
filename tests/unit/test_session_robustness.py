"""Bad input from a VMM or a guest: a clear error for that device, never a crash."""

from __future__ import annotations

import os
import struct

import pytest
import trio

from tests.fakes.driver import GuestRam
from tests.fakes.frontend import DRIVER_FEATURES, Frontend
from trionet.net import features as F
from trionet.service.server import Service
from trionet.vhost_user import messages as m
from trionet.vhost_user.constants import Request

NO_CTRL = DRIVER_FEATURES & ~F.bit(F.CTRL_VQ)


async def closed(fe: Frontend) -> bool:
    with trio.fail_after(5):
        try:
            return await fe.sock.recv(100) == b""
        except ConnectionResetError:
            return True


async def test_garbage_closes_only_that_connection(
    loop_service: Service, frontend: Frontend, ram: GuestRam
) -> None:
    await frontend.send_raw(b"\xff" * 40)
    assert await closed(frontend)
    fe2 = await Frontend.connect(str(loop_service.config.socket_path), ram)
    try:
        assert await fe2.u64(m.GetQueueNum()) == 4  # the process serves the next VMM
    finally:
        fe2.close()


async def test_unsupported_request_is_nacked_not_ignored(
    frontend: Frontend, caplog: pytest.LogCaptureFixture
) -> None:
    await frontend.negotiate(NO_CTRL)
    hdr = m.encode_header(Request.GET_CONFIG, 0x1 | 0x8, 12)
    await frontend.send_raw(hdr + struct.pack("<III", 0, 0, 0))
    code, _, payload = await frontend.reply()
    assert code == Request.GET_CONFIG and payload == b""  # GET_CONFIG's failure: no config
    assert "unsupported request GET_CONFIG refused" in caplog.text
    assert await frontend.u64(m.GetQueueNum()) == 4  # still talking


async def test_memory_fd_that_cannot_be_mapped(frontend: Frontend) -> None:
    await frontend.negotiate(NO_CTRL)
    fd = os.open("/dev/null", os.O_RDONLY)
    region = m.MemRegion(guest_addr=1 << 32, size=1 << 20, user_addr=1 << 40, mmap_offset=0)
    nack = await frontend.acked(m.AddMemReg(region=region, fd=fd))
    os.close(fd)
    assert nack == 1  # refused with REPLY_ACK, the connection goes on
    assert await frontend.u64(m.GetQueueNum()) == 4


async def test_vring_index_out_of_range_closes(frontend: Frontend) -> None:
    await frontend.negotiate(NO_CTRL)
    await frontend.send(m.SetVringNum(index=200, num=256))
    assert await closed(frontend)


async def test_broken_ring_is_reported_and_others_go_on(
    frontend: Frontend, loop_service: Service
) -> None:
    await frontend.negotiate(NO_CTRL)
    await frontend.setup_pairs(2)
    await frontend.sync()
    # pair 1's TX ring: a descriptor chain that loops
    q = frontend.queues[3]
    buf = q.ram.alloc(64)
    q.set_desc(0, buf, 8, 1, 1)
    q.set_desc(1, buf, 8, 1, 0)
    q.publish_head(0)
    frontend.kick(3)
    with trio.fail_after(5):
        while frontend.err_pending(3) == 0:
            await trio.sleep(0.005)
    status = await frontend.u64(m.GetStatus())
    assert status & 0x40  # NEEDS_RESET
    st = loop_service.status()
    assert "loops" in st["pairs"][1]["tx_ring"]["broken"]
    # pair 0 still loops frames back
    frontend.queues[0].add_rx(2048)
    frontend.queues[1].add_tx(bytes(12) + bytes(60))
    frontend.kick(1)
    with trio.fail_after(5):
        while not frontend.queues[0].take_used():
            await trio.sleep(0.005)


async def test_ring_outside_memory_is_broken_not_fatal(
    frontend: Frontend, loop_service: Service
) -> None:
    await frontend.negotiate(NO_CTRL)
    await frontend.send(m.SetVringNum(index=1, num=256))
    await frontend.send(
        m.SetVringAddr(
            index=1,
            flags=0,
            desc_user_addr=1 << 50,
            used_user_addr=1 << 50,
            avail_user_addr=1 << 50,
            log_guest_addr=0,
        )
    )
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    await frontend.send(m.SetVringKick(index=1, fd=kick))
    os.close(kick)
    assert await frontend.u64(m.GetStatus()) & 0x40
    assert loop_service.status()["pairs"][0]["tx_ring"]["broken"]
