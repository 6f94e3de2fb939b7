"""A scripted vhost-user front-end (the VMM's side) over a real UNIX socket.

It speaks through trionet's own codec's front-end half (``encode_request`` /
``ReplyDecoder``), lays rings out in a ``GuestRam`` and kicks them through
real eventfds, so session tests exercise the same socket and fd paths a VMM
does, deterministically.
"""

from __future__ import annotations

import array
import os
import socket
import struct
from typing import Any

import trio

from tests.fakes.driver import DriverQueue, GuestRam
from trionet.net import features as F
from trionet.vhost_user import messages as m
from trionet.vhost_user.constants import ProtocolFeature
from trionet.vhost_user.replies import ReplyDecoder

DEFAULT_PROTOCOL = int(
    ProtocolFeature.MQ
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
    | ProtocolFeature.STATUS
)
DRIVER_FEATURES = F.mask(
    F.VERSION_1,
    F.RING_INDIRECT_DESC,
    F.RING_EVENT_IDX,
    F.MRG_RXBUF,
    F.MQ,
    F.CTRL_VQ,
    F.VHOST_USER_PROTOCOL_FEATURES,
)


class Frontend:
    def __init__(self, sock: trio.socket.SocketType, ram: GuestRam) -> None:
        self.sock = sock
        self.ram = ram
        self.replies = ReplyDecoder()
        self.queues: dict[int, DriverQueue] = {}
        self.kicks: dict[int, int] = {}
        self.calls: dict[int, int] = {}
        self.errs: dict[int, int] = {}
        self.protocol_features = 0

    @classmethod
    async def connect(cls, path: str, ram: GuestRam) -> Frontend:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.connect(path)
        return cls(sock, ram)

    async def send_raw(self, data: bytes, fds: list[int] | None = None) -> None:
        anc = []
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        await self.sock.sendmsg([data], anc)

    async def send(self, req: Any) -> None:
        data, fds = m.encode_request(req)
        await self.send_raw(data, fds)

    async def reply(self) -> tuple[int, int, bytes]:
        while (r := self.replies.next_reply()) is None:
            data = await self.sock.recv(4096)
            if not data:
                raise EOFError("backend closed the connection")
            self.replies.feed(data)
        return r

    async def call(self, req: Any) -> bytes:
        """Send a request that has a reply (GET_*, or NEED_REPLY with REPLY_ACK)."""
        await self.send(req)
        code, _, payload = await self.reply()
        assert code == req.request_code
        return payload

    async def u64(self, req: Any) -> int:
        return int(struct.unpack("<Q", await self.call(req))[0])

    async def acked(self, req: Any) -> int:
        """Send with NEED_REPLY; returns the REPLY_ACK value (0 = success)."""
        return await self.u64(type(req)(**{**_fields(req), "need_reply": True}))

    async def negotiate(
        self, features: int = DRIVER_FEATURES, protocol: int = DEFAULT_PROTOCOL
    ) -> int:
        offered = await self.u64(m.GetFeatures())
        await self.send(m.SetOwner())
        if offered & F.bit(F.VHOST_USER_PROTOCOL_FEATURES):
            pf = await self.u64(m.GetProtocolFeatures())
            self.protocol_features = pf & protocol
            await self.send(m.SetProtocolFeatures(features=self.protocol_features))
        await self.send(m.SetFeatures(features=features & offered))
        region = m.MemRegion(
            guest_addr=self.ram.base, size=self.ram.size, user_addr=self.ram.uva, mmap_offset=0
        )
        await self.send(m.SetMemTable(regions=(region,), fds=(self.ram.fd,)))
        return offered

    async def setup_vring(
        self, index: int, size: int = 256, enable: bool = True, base: int = 0
    ) -> DriverQueue:
        q = DriverQueue(self.ram, size)
        self.queues[index] = q
        ram = self.ram
        await self.send(m.SetVringNum(index=index, num=size))
        await self.send(m.SetVringBase(index=index, num=base))
        q.avail_idx = q.last_used = base
        await self.send(
            m.SetVringAddr(
                index=index,
                flags=0,
                desc_user_addr=q.desc - ram.base + ram.uva,
                used_user_addr=q.used - ram.base + ram.uva,
                avail_user_addr=q.avail - ram.base + ram.uva,
                log_guest_addr=0,
            )
        )
        self.calls[index] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.kicks[index] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.errs[index] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        await self.send(m.SetVringCall(index=index, fd=self.calls[index]))
        await self.send(m.SetVringErr(index=index, fd=self.errs[index]))
        await self.send(m.SetVringKick(index=index, fd=self.kicks[index]))
        if self.protocol_features or enable:
            await self.send(m.SetVringEnable(index=index, enable=enable))
        return q

    async def setup_pairs(self, pairs: int, size: int = 256) -> None:
        for i in range(2 * pairs):
            await self.setup_vring(i, size)

    def kick(self, index: int) -> None:
        os.eventfd_write(self.kicks[index], 1)

    def calls_pending(self, index: int) -> int:
        try:
            return os.eventfd_read(self.calls[index])
        except BlockingIOError:
            return 0

    def err_pending(self, index: int) -> int:
        try:
            return os.eventfd_read(self.errs[index])
        except BlockingIOError:
            return 0

    async def sync(self) -> None:
        """Round trip: every request sent before is applied when this returns."""
        await self.u64(m.GetQueueNum())

    def close(self) -> None:
        self.sock.close()
        for fds in (self.kicks, self.calls, self.errs):
            for fd in fds.values():
                os.close(fd)
            fds.clear()


def _fields(req: Any) -> dict[str, Any]:
    return {name: getattr(req, name) for name in req.__dataclass_fields__}
