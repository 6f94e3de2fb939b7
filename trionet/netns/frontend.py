"""trionet's own vhost-user front end, for a namespace's tap (see the package doc).

It does what a VMM and a guest driver do together: negotiates features and
protocol features, hands over its memory (a memfd) and the rings it laid out
in it, enables one ring pair per tap queue, and then runs one native driver
loop per pair (``tn_nsdrv_run``, GIL released).  The session on the other end
of the socketpair is the ordinary one: with more than one pair the enables set
the active pair count, as QEMU's do.

The driver's offer: VERSION_1, CSUM (the tap's partial checksums go to the
stack as NEEDS_CSUM), GUEST_CSUM, GUEST_TSO4 and GUEST_TSO6 (the stack's TCP
data comes as GSO frames of many segments, which the tap takes whole),
HOST_TSO4 and HOST_TSO6 (the namespace's TCP leaves as GSO frames, the tap's
TUN_F_TSO4/6), and MQ with more than one pair.  No merged
RX buffers: every buffer holds the largest frame a tap can carry.
"""

from __future__ import annotations

import array
import mmap
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any

import trio

from trionet.native import ffi, lib
from trionet.nativethread import run_native, wait_eventfd
from trionet.net import features as F
from trionet.vhost_user import messages as m
from trionet.vhost_user.constants import ProtocolFeature
from trionet.vhost_user.replies import ReplyDecoder

QSIZE = 128  # x 64 KiB buffers per ring: 8 MiB in flight each way
BATCH = 64
PAGE = 4096
UVA_BASE = 0x7E00_0000_0000  # the "user address" of offset 0 in the SET_MEM_TABLE region
PROTOCOL = ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK
HDR_LEN = 12
ETH_MAX_HDR = 18  # Ethernet header with a VLAN tag
MAX_MTU = 65535  # a tap's largest: buffers hold any frame, whatever MTU the namespace sets


class FrontendError(Exception):
    """The session refused our set-up, or a driver loop failed."""


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class RingAt:
    desc: int
    avail: int
    used: int
    bufs: int


def layout(pairs: int, qsize: int, buf_size: int) -> tuple[int, list[tuple[RingAt, RingAt]]]:
    """Offsets of every pair's RX and TX ring and buffers, and the total size."""
    off = 0
    out: list[tuple[RingAt, RingAt]] = []

    def ring() -> RingAt:
        nonlocal off
        desc = off
        avail = desc + 16 * qsize
        used = _align(avail + 6 + 2 * qsize, PAGE)
        bufs = _align(used + 6 + 8 * qsize, PAGE)
        off = bufs + qsize * buf_size
        return RingAt(desc, avail, used, bufs)

    for _ in range(pairs):
        rx = ring()
        tx = ring()
        out.append((rx, tx))
    return off, out


class NetnsFrontend:
    """Owns the tap queue fds it is given: ``run`` closes them when it ends."""

    def __init__(self, taps: list[int], *, qsize: int = QSIZE) -> None:
        self.taps = taps
        self.pairs = len(taps)
        self.qsize = qsize
        # Sized for the tap's largest frame, not the stack's MTU: root in the
        # namespace may raise the tap's.  Pages are only touched as frames fill them.
        self.buf_size = _align(HDR_LEN + ETH_MAX_HDR + MAX_MTU, 64)
        self.size, self.rings = layout(self.pairs, qsize, self.buf_size)
        self.replies = ReplyDecoder()
        self.drivers: list[Any] = []  # struct tn_nsdrv *, per pair
        self.features = 0
        self.ready = trio.Event()

    # ------------------------------------------------------------ vhost-user
    async def _send(self, sock: trio.socket.SocketType, req: Any) -> None:
        data, fds = m.encode_request(req)
        anc = []
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        await sock.sendmsg([data], anc)

    async def _reply(self, sock: trio.socket.SocketType, req: Any) -> bytes:
        await self._send(sock, req)
        while (r := self.replies.next_reply()) is None:
            data = await sock.recv(4096)
            if not data:
                raise FrontendError("the session closed the connection")
            self.replies.feed(data)
        code, _, payload = r
        if code != req.REQUEST:
            raise FrontendError(f"reply to {code}, expected {int(req.REQUEST)}")
        return payload

    async def _u64(self, sock: trio.socket.SocketType, req: Any) -> int:
        return int(struct.unpack("<Q", await self._reply(sock, req))[0])

    async def _acked(self, sock: trio.socket.SocketType, req: Any) -> None:
        """A request with NEED_REPLY: the session says whether it applied it."""
        if await self._u64(sock, req) != 0:
            raise FrontendError(f"the session refused {type(req).__name__}")

    async def negotiate(self, sock: trio.socket.SocketType, memfd: int) -> list[list[int]]:
        """Everything up to running rings; returns each ring's [kick, call, err] fds."""
        offered = await self._u64(sock, m.GetFeatures())
        await self._send(sock, m.SetOwner())
        if not offered & F.bit(F.VHOST_USER_PROTOCOL_FEATURES):
            raise FrontendError("the session offers no vhost-user protocol features")
        pf = await self._u64(sock, m.GetProtocolFeatures()) & int(PROTOCOL)
        if not pf & ProtocolFeature.REPLY_ACK:
            raise FrontendError("the session does not offer REPLY_ACK")
        await self._send(sock, m.SetProtocolFeatures(features=pf))
        if self.pairs > 1:
            if not pf & ProtocolFeature.MQ or not offered & F.bit(F.MQ):
                raise FrontendError("the session does not offer multiqueue")
            most = await self._u64(sock, m.GetQueueNum())
            if self.pairs > most:
                raise FrontendError(f"{self.pairs} queue pairs asked, the session has {most}")
        want = F.mask(
            *(F.VERSION_1, F.CSUM, F.GUEST_CSUM, F.VHOST_USER_PROTOCOL_FEATURES),
            *(F.GUEST_TSO4, F.GUEST_TSO6),  # the tap takes GSO frames written to it
            *(F.HOST_TSO4, F.HOST_TSO6),  # and hands them over (TUN_F_TSO4/6, set below)
        )
        if self.pairs > 1:
            want |= F.bit(F.MQ)
        self.features = want & offered
        await self._acked(sock, m.SetFeatures(features=self.features, need_reply=True))
        region = m.MemRegion(guest_addr=0, size=self.size, user_addr=UVA_BASE, mmap_offset=0)
        await self._acked(sock, m.SetMemTable(regions=(region,), fds=(memfd,), need_reply=True))
        fds: list[list[int]] = []
        for p, (rx, tx) in enumerate(self.rings):
            for index, at in ((2 * p, rx), (2 * p + 1, tx)):
                fds.append(await self._ring(sock, index, at))
        return fds

    async def _ring(self, sock: trio.socket.SocketType, index: int, at: RingAt) -> list[int]:
        mk = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(3)]
        kick, call, err = mk
        reqs: list[Any] = [
            m.SetVringNum(index=index, num=self.qsize, need_reply=True),
            m.SetVringBase(index=index, num=0, need_reply=True),
            m.SetVringAddr(
                index=index,
                flags=0,
                desc_user_addr=UVA_BASE + at.desc,
                used_user_addr=UVA_BASE + at.used,
                avail_user_addr=UVA_BASE + at.avail,
                log_guest_addr=0,
                need_reply=True,
            ),
            m.SetVringCall(index=index, fd=call, need_reply=True),
            m.SetVringErr(index=index, fd=err, need_reply=True),
            m.SetVringKick(index=index, fd=kick, need_reply=True),
            m.SetVringEnable(index=index, enable=True, need_reply=True),
        ]
        try:
            for req in reqs:
                await self._acked(sock, req)
        except BaseException:
            for fd in mk:
                os.close(fd)
            raise
        return mk

    def _tap_offloads(self) -> None:
        """The tap was made handing over partial checksums and TCP GSO frames
        (link.py); narrowed to what the session took, if it took less."""
        if F.has(self.features, F.HOST_TSO4) and F.has(self.features, F.HOST_TSO6):
            return
        flags = lib.TN_TUN_F_CSUM
        if F.has(self.features, F.HOST_TSO4):
            flags |= lib.TN_TUN_F_TSO4
        if F.has(self.features, F.HOST_TSO6):
            flags |= lib.TN_TUN_F_TSO6
        for fd in self.taps:
            rc = lib.tn_tap_set_offload(fd, flags)
            if rc < 0:
                raise FrontendError(f"TUNSETOFFLOAD: {os.strerror(-rc)}")

    # ---------------------------------------------------------------- drivers
    def _driver(self, p: int, base: Any, fds: list[list[int]]) -> Any:
        rx, tx = self.rings[p]
        (rx_kick, rx_call, _), (tx_kick, tx_call, _) = fds[2 * p], fds[2 * p + 1]
        d = ffi.new("struct tn_nsdrv *")
        d.base, d.size = base, self.size
        d.tx_desc, d.tx_avail, d.tx_used, d.tx_bufs = tx.desc, tx.avail, tx.used, tx.bufs
        d.rx_desc, d.rx_avail, d.rx_used, d.rx_bufs = rx.desc, rx.avail, rx.used, rx.bufs
        d.qsize, d.buf_size, d.batch = self.qsize, self.buf_size, BATCH
        d.tap_fd = self.taps[p]
        d.tx_kick, d.tx_call, d.rx_kick, d.rx_call = tx_kick, tx_call, rx_kick, rx_call
        d.stop_fd = -1
        return d

    async def _drive(self, p: int, d: Any) -> None:
        """Pair ``p``'s driver loop on a thread, stopped through its stop eventfd
        (and joined, shielded) when this task is cancelled."""
        rc = await run_native(lib.tn_nsdrv_run, d)
        if rc < 0:
            raise FrontendError(f"queue pair {p}: driver loop: {os.strerror(-rc)}")

    async def _watch_err(self, index: int, fd: int) -> None:
        await wait_eventfd(fd)
        raise FrontendError(f"the device reported ring {index} broken")

    async def run(
        self,
        sock: trio.socket.SocketType,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        memfd = os.memfd_create("trionet-netns-rings", os.MFD_CLOEXEC)
        fds: list[list[int]] = []
        try:
            os.ftruncate(memfd, self.size)
            with mmap.mmap(memfd, self.size) as ram:
                base = ffi.from_buffer("uint8_t[]", ram)
                try:
                    fds = await self.negotiate(sock, memfd)
                    self._tap_offloads()
                    self.drivers = [self._driver(p, base, fds) for p in range(self.pairs)]
                    async with trio.open_nursery() as nursery:
                        for p, d in enumerate(self.drivers):
                            nursery.start_soon(self._drive, p, d)
                        for index, (_, _, err) in enumerate(fds):
                            nursery.start_soon(self._watch_err, index, err)
                        self.ready.set()
                        task_status.started()
                finally:
                    del base
        finally:
            os.close(memfd)
            for trio_fds in fds:
                for fd in trio_fds:
                    os.close(fd)
            for fd in self.taps:  # every driver loop has returned: the tap goes away
                os.close(fd)
            self.taps = []

    def status(self) -> list[dict[str, int]]:
        """Per pair: frames and bytes each way, tap read and write failures (frames
        dropped), kicks, wake-ups."""
        names = (
            *("tx_frames", "tx_bytes", "tx_errors", "rx_frames", "rx_bytes", "rx_errors"),
            *("kicks", "wakeups"),
        )
        return [{k: int(getattr(d.stats, k)) for k in names} for d in self.drivers]
