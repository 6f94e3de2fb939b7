"""The host sockets of inbound forwarding (``-u``, ``-t``): one per port of
every range and address family, bound when the session starts.

A port that cannot be bound then (another process holds it, an outgoing
connection took it from the ephemeral range a moment ago, the address is not
there yet) is not given up: the forward is tried again with backoff, from
``RETRY_FIRST`` up to every ``RETRY_MAX`` seconds, until it binds.  Meanwhile
the status document lists it as not listening, with the error, and the
metrics count it (``trionet_forwards_not_listening``): a forward that does
not work is visible, and heals itself once the port is free.  The one failure
that cannot heal, a host with no sockets of the family at all (IPv6 off:
``EAFNOSUPPORT``), is a warning, not retried and not counted as failing.

The protocol modules give the socket (``open_socket``: created, options set,
bound, listening; ``OSError`` when it cannot be) and what serves it
(``serve``: accepts or receives until cancelled).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio
from trio_util import AsyncValue

from trionet.backends.user.config import UserConfig
from trionet.backends.user.fwd import listen_points

log = logging.getLogger(__name__)

RETRY_FIRST = 1.0  # seconds before the first retry of a port that would not bind
RETRY_MAX = 60.0  # the backoff's ceiling


@dataclass(slots=True)
class ListenPoint:
    """One host socket a forward needs, and how it stands."""

    proto: str  # "udp" / "tcp"
    family: int
    addr: str
    port: int
    guest_port: int
    listening: bool = False
    error: str | None = None  # the last failure, while not listening
    failures: int = 0  # bind attempts that failed
    unsupported: bool = False  # the host has no sockets of this family at all

    @property
    def where(self) -> str:
        host = f"[{self.addr}]" if self.family == socket.AF_INET6 else self.addr
        return f"{self.proto} {host}:{self.port}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "proto": self.proto,
            "address": self.addr,
            "port": self.port,
            "guest_port": self.guest_port,
            "listening": self.listening,
            "error": self.error,
            "failures": self.failures,
            "unsupported": self.unsupported,
        }


OpenSocket = Callable[[ListenPoint], socket.socket]
Serve = Callable[[socket.socket, int], Awaitable[None]]


class Listeners:
    """Every listen point of one protocol for one session."""

    def __init__(self, proto: str, open_socket: OpenSocket, serve: Serve) -> None:
        self.proto = proto
        self._open = open_socket
        self._serve = serve
        self.points: list[ListenPoint] = []
        self.sockets: list[socket.socket] = []
        self.listening: AsyncValue[int] = AsyncValue(0)  # points bound and served
        self.failures: AsyncValue[int] = AsyncValue(0)  # bind attempts that failed

    async def start(self, cfg: UserConfig, nursery: trio.Nursery) -> None:
        """Bind every point now; those that fail get a retrying task in ``nursery``."""
        for family, addr, port, guest_port in listen_points(cfg, self.proto):
            point = ListenPoint(self.proto, family, addr, port, guest_port)
            self.points.append(point)
            if self._try(point, nursery):
                continue
            if point.unsupported:
                # nothing to wait for: the host cannot have this socket (no IPv6)
                log.warning("user stack: not listening on %s: %s", point.where, point.error)
            else:
                log.error(
                    "user stack: cannot listen on %s: %s; retrying, up to every %.0f s",
                    point.where,
                    point.error,
                    RETRY_MAX,
                )
                nursery.start_soon(self._retry, point, nursery)
        await trio.lowlevel.checkpoint()

    def _try(self, point: ListenPoint, nursery: trio.Nursery) -> bool:
        try:
            sock = self._open(point)
        except OSError as exc:
            point.failures += 1
            self.failures.value += 1
            point.error = exc.strerror or os.strerror(exc.errno or 0)
            point.unsupported = exc.errno == errno.EAFNOSUPPORT
            return False
        point.listening, point.error = True, None
        self.sockets.append(sock)
        self.listening.value += 1
        nursery.start_soon(self._serve, sock, point.guest_port)
        return True

    async def _retry(self, point: ListenPoint, nursery: trio.Nursery) -> None:
        delay = RETRY_FIRST
        while True:
            await trio.sleep(delay)
            if self._try(point, nursery):
                log.info(
                    "user stack: listening on %s after %d failed attempts",
                    point.where,
                    point.failures,
                )
                return
            if point.unsupported:
                log.warning("user stack: not listening on %s: %s", point.where, point.error)
                return
            log.debug("user stack: %s still cannot listen: %s", point.where, point.error)
            delay = min(delay * 2, RETRY_MAX)

    def not_listening(self) -> int:
        """Points that should listen and do not (being retried)."""
        return sum(not p.listening and not p.unsupported for p in self.points)

    def unsupported(self) -> int:
        return sum(p.unsupported for p in self.points)

    def describe(self) -> list[dict[str, Any]]:
        return [p.as_dict() for p in self.points]

    def close_all(self) -> None:
        """Session end: the sockets close (their tasks and retries end with
        the session's nursery)."""
        for sock in self.sockets:
            trio.lowlevel.notify_closing(sock)
            sock.close()
        self.sockets.clear()
        self.points.clear()
        self.listening.value = 0
