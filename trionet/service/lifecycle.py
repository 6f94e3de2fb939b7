"""Telling the supervisor where the service is: sd_notify and ``--ready-fd``.

systemd (``Type=notify``) sets ``NOTIFY_SOCKET``; every state change is one
datagram to it: ``READY=1`` once the vhost-user socket listens (or, with
``--connect``, once the service starts dialling), ``STATUS=`` lines with the
VM's pair count as it changes, ``STOPPING=1`` when a SIGTERM starts the drain.
Supervisors without systemd (s6's ``notification-fd``, a shell, an
orchestrator's own pipe) pass ``--ready-fd N``: one line is written to fd N
when the socket listens, then the fd is closed.

Both are best effort: a supervisor that went away is logged once, never
fatal.  Nothing is sent when neither is configured.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


def notify_address(value: str) -> str | bytes | None:
    """``NOTIFY_SOCKET`` as a ``sendto`` address: a path, or ``@name`` for the
    abstract namespace (sd_notify(3))."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock: and others are not ours to speak


class Notifier:
    def __init__(self, notify_socket: str | None = None, ready_fd: int | None = None) -> None:
        self.address = notify_address(notify_socket or "")
        self.ready_fd = ready_fd
        self._sock: socket.socket | None = None
        self._failed = False
        self._last_status: str | None = None
        if self.address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @classmethod
    def from_env(cls, env: Mapping[str, str], ready_fd: int | None = None) -> Notifier:
        return cls(env.get("NOTIFY_SOCKET"), ready_fd)

    def send(self, *fields: str) -> None:
        """One datagram of ``KEY=VALUE`` lines to the service manager."""
        if self._sock is None or self.address is None:
            return
        try:
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            if not self._failed:
                log.warning("NOTIFY_SOCKET: %s (notifications off from now on)", exc)
            self._failed = True
            self._sock.close()
            self._sock = None

    def ready(self, status: str) -> None:
        self._last_status = status
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")
        if self.ready_fd is not None:
            fd, self.ready_fd = self.ready_fd, None
            try:
                os.write(fd, f"READY=1 {status}\n".encode())
            except OSError as exc:
                log.warning("--ready-fd %d: %s", fd, exc)
            finally:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def status(self, status: str) -> None:
        if status != self._last_status:
            self._last_status = status
            self.send(f"STATUS={status}")

    def stopping(self, status: str) -> None:
        self._last_status = status
        self.send("STOPPING=1", f"STATUS={status}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
