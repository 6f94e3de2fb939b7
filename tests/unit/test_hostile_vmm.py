"""A hostile VMM: nothing it sends ends the process, stalls it, leaks an fd or
makes it touch memory outside what the VMM mapped.

The rule under test: a bad message gets one log line and a NACK (or that
connection is closed), and the next connection is served; every message that
expects a reply gets one.  Where the process dying or freezing is the failure
mode, trionet runs as its own process (``trionet`` fixture).
"""

from __future__ import annotations

import os
import socket
import struct

import pytest
import trio

from tests.fakes.driver import DriverQueue, GuestRam
from tests.fakes.frontend import DEFAULT_PROTOCOL, DRIVER_FEATURES, Frontend
from tests.fakes.service_process import ServiceProcess
from trionet.net import features as F
from trionet.service.server import read_status
from trionet.vhost_user import messages as m
from trionet.vhost_user.constants import Request

NO_CTRL = DRIVER_FEATURES & ~F.bit(F.CTRL_VQ)
MIB = 1 << 20
UVA = 0x7F00_0000_0000
REQUEST_FLAGS = 0x1
NEED_REPLY = 0x8


async def closed(fe: Frontend) -> bool:
    with trio.fail_after(5):
        try:
            while data := await fe.sock.recv(4096):
                fe.replies.feed(data)  # replies sent before the close
            return True
        except ConnectionResetError:
            return True


async def settle(fe: Frontend, proc: ServiceProcess) -> None:
    """A round trip on ``fe``; a dead or frozen process fails the test with its log."""
    try:
        with trio.fail_after(5):
            await fe.sync()
    except (EOFError, OSError, trio.TooSlowError) as exc:
        proc.assert_alive()
        raise AssertionError(f"trionet stopped answering: {exc!r}\n{proc.log()}") from None


async def negotiate_without_memory(fe: Frontend, features: int = NO_CTRL) -> None:
    offered = await fe.u64(m.GetFeatures())
    await fe.send(m.SetOwner())
    fe.protocol_features = await fe.u64(m.GetProtocolFeatures()) & DEFAULT_PROTOCOL
    await fe.send(m.SetProtocolFeatures(features=fe.protocol_features))
    await fe.send(m.SetFeatures(features=features & offered))


async def start_ring_at(fe: Frontend, index: int, uva: int) -> None:
    """A 256-entry ring laid out from ``uva`` (in the VMM's address space)."""
    await fe.send(m.SetVringNum(index=index, num=256))
    await fe.send(m.SetVringBase(index=index, num=0))
    await fe.send(
        m.SetVringAddr(
            index=index,
            flags=0,
            desc_user_addr=uva,
            avail_user_addr=uva + 0x1000,
            used_user_addr=uva + 0x2000,
            log_guest_addr=0,
        )
    )
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    await fe.send(m.SetVringKick(index=index, fd=kick))
    os.close(kick)
    await fe.send(m.SetVringEnable(index=index, enable=True))


# ---- memory that is not there ---------------------------------------------------------

# (memfd size, region size, mmap offset, ring offset inside the region, request)
SHORT_MEMORY = {
    "region_past_end_of_fd": (4096, 4 * MIB, 0, MIB, "table"),
    "offset_past_end_of_fd": (4 * MIB, 4 * MIB, 2 * MIB, 3 * MIB, "table"),
    "empty_memfd": (0, 4 * MIB, 0, 0x10000, "table"),
    "add_mem_reg_past_end_of_fd": (4096, 4 * MIB, 0, MIB, "add"),
}


@pytest.mark.parametrize("case", list(SHORT_MEMORY))
async def test_memory_region_larger_than_its_fd_is_refused(
    trionet: ServiceProcess, ram: GuestRam, case: str
) -> None:
    """Mapping past the end of a file works, touching it is SIGBUS: the region
    is checked against the fd's size first."""
    fd_size, size, offset, ring_at, how = SHORT_MEMORY[case]
    fe = await Frontend.connect(str(trionet.socket_path), ram)
    try:
        await negotiate_without_memory(fe)
        fd = os.memfd_create("short-guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(fd, fd_size)
        region = m.MemRegion(guest_addr=0, size=size, user_addr=UVA, mmap_offset=offset)
        req: m.SetMemTable | m.AddMemReg
        if how == "table":
            req = m.SetMemTable(regions=(region,), fds=(fd,))
        else:
            req = m.AddMemReg(region=region, fd=fd)
        nack = await fe.acked(req)
        os.close(fd)
        await start_ring_at(fe, 1, UVA + ring_at)  # the TX ring of pair 0
        await settle(fe, trionet)
        assert nack == 1, "a region reaching past the end of its fd was accepted"
        assert "past the end" in trionet.log()
    finally:
        fe.close()
    await trionet.serves_next_connection(ram)


# ---- more than a message may carry ---------------------------------------------------


def _mem_table_of(n: int) -> bytes:
    regions = [
        m.MemRegion(guest_addr=i * MIB, size=MIB, user_addr=UVA + i * MIB, mmap_offset=0)
        for i in range(n)
    ]
    payload = m.MEM_TABLE_HEADER_STRUCT.pack(n, 0) + b"".join(r.pack() for r in regions)
    return m.encode_header(Request.SET_MEM_TABLE, REQUEST_FLAGS, len(payload)) + payload


@pytest.mark.parametrize("case", ["mem_table_of_9_regions", "kick_with_12_fds"])
async def test_more_fds_than_a_message_may_carry(
    trionet: ServiceProcess, ram: GuestRam, case: str
) -> None:
    fe = await Frontend.connect(str(trionet.socket_path), ram)
    try:
        await negotiate_without_memory(fe)
        if case == "mem_table_of_9_regions":
            data, fds = _mem_table_of(9), [os.dup(ram.fd) for _ in range(9)]
        else:
            data, _ = m.encode_request(m.SetVringKick(index=0, fd=None))
            data = data[:-8] + struct.pack("=Q", 0)  # index 0, an fd claimed
            fds = [os.eventfd(0) for _ in range(12)]
        await fe.send_raw(data, fds)
        for fd in fds:
            os.close(fd)
        try:
            assert await closed(fe)
        except trio.TooSlowError:
            trionet.assert_alive()
            raise
    finally:
        fe.close()
    await trionet.serves_next_connection(ram)
    assert "more fds than a message may carry" in trionet.log()


# ---- the VMM goes away while we answer --------------------------------------------------


async def test_vmm_gone_before_its_replies(trionet: ServiceProcess, ram: GuestRam) -> None:
    """EPIPE / ECONNRESET on the VMM socket end that session, not the process."""
    burst = b"".join(m.encode_request(m.GetFeatures())[0] for _ in range(500))
    for served in range(1, 6):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(trionet.socket_path))
        s.sendall(burst)
        s.close()  # unread replies: the backend's next send fails
        with trio.fail_after(10):
            while True:
                trionet.assert_alive()
                if read_status(trionet.control_path)["sessions_served"] >= served:
                    break
                await trio.sleep(0.01)
    await trionet.serves_next_connection(ram)


# ---- kick / call / err must be eventfds ---------------------------------------------------


def _not_an_eventfd(kind: str) -> tuple[int, list[int]]:
    """(fd to send, fds to close afterwards)."""
    if kind == "pipe_write_end":
        r, w = os.pipe()
        return w, [r, w]
    if kind == "dev_null":
        fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        return fd, [fd]
    fd = os.memfd_create("not-an-eventfd", os.MFD_CLOEXEC)
    os.ftruncate(fd, 4096)
    return fd, [fd]


NOT_EVENTFDS = [
    *(("kick", kind) for kind in ("pipe_write_end", "dev_null", "memfd")),
    ("call", "memfd"),
    ("call", "pipe_write_end"),
    ("err", "dev_null"),
]


@pytest.mark.parametrize(("which", "kind"), NOT_EVENTFDS)
async def test_vring_fds_must_be_eventfds(
    trionet: ServiceProcess, ram: GuestRam, which: str, kind: str
) -> None:
    fe = await Frontend.connect(str(trionet.socket_path), ram)
    try:
        await fe.negotiate(NO_CTRL)
        await fe.setup_vring(0)
        q = DriverQueue(ram, 256)
        fe.queues[1] = q
        await fe.send(m.SetVringNum(index=1, num=256))
        await fe.send(m.SetVringBase(index=1, num=0))
        u = ram.uva - ram.base
        await fe.send(
            m.SetVringAddr(
                index=1,
                flags=0,
                desc_user_addr=q.desc + u,
                used_user_addr=q.used + u,
                avail_user_addr=q.avail + u,
                log_guest_addr=0,
            )
        )
        await settle(fe, trionet)
        fds_before = trionet.open_fds()
        bad, to_close = _not_an_eventfd(kind)
        cls = {"kick": m.SetVringKick, "call": m.SetVringCall, "err": m.SetVringErr}[which]
        nack = await fe.acked(cls(index=1, fd=bad))
        for fd in to_close:
            os.close(fd)
        await settle(fe, trionet)
        assert trionet.open_fds() == fds_before, "the refused fd was kept"
        if which != "kick":
            good = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            await fe.send(m.SetVringKick(index=1, fd=good))
            os.close(good)
        await fe.send(m.SetVringEnable(index=1, enable=True))
        q.add_tx(bytes(12) + bytes(60))
        await settle(fe, trionet)
        await settle(fe, trionet)
        assert nack == 1, f"a {kind} was accepted as the {which} fd"
        assert "not an eventfd" in trionet.log()
    finally:
        fe.close()
    await trionet.serves_next_connection(ram)
    assert trionet.stop(5) == 0, "SIGTERM did not stop trionet"


# ---- refused messages leak nothing -----------------------------------------------------


async def test_vring_fds_with_a_bad_index_are_closed(
    trionet: ServiceProcess, ram: GuestRam
) -> None:
    fe = await Frontend.connect(str(trionet.socket_path), ram)
    try:
        await fe.negotiate(NO_CTRL)
        await settle(fe, trionet)
        before = trionet.open_fds()
        for cls in (m.SetVringKick, m.SetVringCall, m.SetVringErr):
            for _ in range(5):
                fd = os.eventfd(0, os.EFD_CLOEXEC)
                nack = await fe.acked(cls(index=200, fd=fd))
                os.close(fd)
                assert nack == 1
        await settle(fe, trionet)
        assert trionet.open_fds() == before
    finally:
        fe.close()
    await trionet.serves_next_connection(ram)


# ---- every message that expects a reply gets one ---------------------------------------


@pytest.mark.parametrize("size", [0, 12, 12 + 256, 12 + 4096])
@pytest.mark.parametrize("need_reply", [False, True])
async def test_get_config_is_answered(frontend: Frontend, size: int, need_reply: bool) -> None:
    """GET_CONFIG always has a reply: its own message, a zero-size payload
    meaning failure (trionet has no config space to give)."""
    flags = REQUEST_FLAGS | (NEED_REPLY if need_reply else 0)
    await frontend.send_raw(m.encode_header(Request.GET_CONFIG, flags, size) + bytes(size))
    with trio.fail_after(2):
        code, _, payload = await frontend.reply()
    assert (code, payload) == (Request.GET_CONFIG, b"")
    assert await frontend.u64(m.GetQueueNum()) == 4


@pytest.mark.parametrize(
    ("request_code", "size"),
    [(Request.IOTLB_MSG, 64), (Request.POSTCOPY_END, 0), (Request.CHECK_DEVICE_STATE, 0)],
)
async def test_unsupported_requests_with_a_reply_are_refused_by_reply(
    frontend: Frontend, request_code: int, size: int
) -> None:
    await frontend.send_raw(m.encode_header(request_code, REQUEST_FLAGS, size) + bytes(size))
    with trio.fail_after(2):
        code, _, payload = await frontend.reply()
    assert code == request_code and struct.unpack("=Q", payload)[0] != 0
    assert await frontend.u64(m.GetQueueNum()) == 4
