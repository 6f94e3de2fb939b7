"""Shared by the vhost-user codec tests (test_vhost_user_codec*.py,
test_session_state_machine): request bytes built by hand, one of every
request, real fds handed out and checked for leaks and closes, and the
property tests' settings."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

from hypothesis import HealthCheck, settings

from trionet.vhost_user import messages as m
from trionet.vhost_user.codec import RequestDecoder
from trionet.vhost_user.constants import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_VERSION,
    ProtocolFeature,
    Request,
)

V = VHOST_USER_VERSION
U64_MAX = (1 << 64) - 1
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        assert exc.errno == errno.EBADF
        return False
    return True


def close_quietly(fds: list[int] | tuple[int, ...]) -> None:
    for fd in fds:
        with suppress(OSError):
            os.close(fd)


@contextmanager
def no_fd_leak() -> Iterator[None]:
    before = open_fd_count()
    yield
    assert open_fd_count() == before


class Fds:
    """Hands out real fds (eventfds and pipe ends) and closes what is left."""

    def __init__(self) -> None:
        self.made: list[int] = []

    def __call__(self) -> int:
        if len(self.made) % 2:
            r, w = os.pipe()
            os.close(w)
            fd = r
        else:
            fd = os.eventfd(0)
        self.made.append(fd)
        return fd

    def close_all(self) -> None:
        close_quietly(self.made)
        self.made.clear()


def raw(request: int, payload: bytes = b"", flags: int = V, size: int | None = None) -> bytes:
    return m.encode_header(request, flags, len(payload) if size is None else size) + payload


def u64(value: int) -> bytes:
    return m.U64_STRUCT.pack(value)


def region_bytes(guest: int, size: int, user: int, off: int) -> bytes:
    return m.MEM_REGION_STRUCT.pack(guest, size, user, off)


def mem_table(regions: list[bytes], nregions: int | None = None, padding: int = 0) -> bytes:
    n = len(regions) if nregions is None else nregions
    return m.MEM_TABLE_HEADER_STRUCT.pack(n, padding) + b"".join(regions)


def decode_all(dec: RequestDecoder) -> list[m.RequestMessage]:
    out = []
    while (req := dec.next_request()) is not None:
        out.append(req)
    return out


REGION = m.MemRegion(0x0, 0x4000_0000, 0x7F00_0000_0000, 0)
REGION2 = m.MemRegion(0x1_0000_0000, 0x1000_0000, 0x7F80_0000_0000, 0x4000_0000)


def every_request(make_fd: Callable[[], int]) -> list[m.RequestMessage]:
    """One of each supported request (some twice), plus Unsupported ones."""
    return [
        m.GetFeatures(),
        m.SetFeatures(1 << VHOST_USER_F_PROTOCOL_FEATURES | 1 << 32 | 0x20, need_reply=True),
        m.SetOwner(),
        m.ResetOwner(),
        m.SetMemTable((REGION,), (make_fd(),)),
        m.SetMemTable((REGION, REGION2) * 4, tuple(make_fd() for _ in range(8)), True),
        m.GetMaxMemSlots(),
        m.AddMemReg(REGION2, make_fd(), need_reply=True),
        m.RemMemReg(REGION2),
        m.SetVringNum(1, 256),
        m.SetVringAddr(1, 1, 0x7F00_0000_1000, 0x7F00_0000_3000, 0x7F00_0000_2000, 0x4000),
        m.SetVringBase(0, 0x8001_8001),
        m.GetVringBase(2),
        m.SetVringKick(0, make_fd()),
        m.SetVringKick(255, None),
        m.SetVringCall(1, make_fd(), need_reply=True),
        m.SetVringCall(1, None),
        m.SetVringErr(2, make_fd()),
        m.SetVringErr(2, None),
        m.GetProtocolFeatures(),
        m.SetProtocolFeatures(int(ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK)),
        m.GetQueueNum(),
        m.SetVringEnable(3, True),
        m.SetVringEnable(0, False, need_reply=True),
        m.SendRarp(b"\x52\x54\x00\x12\x34\x56"),
        m.NetSetMtu(9000),
        m.SetStatus(0xF),
        m.GetStatus(),
        m.ResetDevice(need_reply=True),
        m.SetLogBase(4096, 0, make_fd(), need_reply=True),
        m.SetLogFd(make_fd()),
        m.Unsupported(Request.POSTCOPY_ADVISE, u64(0), (make_fd(),), True),
        m.Unsupported(Request.GET_CONFIG, b"\0" * (12 + 256), ()),
        m.Unsupported(99, b"", ()),
    ]


def release(req: m.RequestMessage) -> None:
    close_quietly(req.attached_fds())
