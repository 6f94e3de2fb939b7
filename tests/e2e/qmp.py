"""A minimal QMP client (QEMU's JSON monitor) over a UNIX socket, for the e2e tests.

One command at a time: ``execute`` sends it and returns its ``return`` value,
skipping the asynchronous events QEMU interleaves (kept in ``events``).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import trio


class QMPError(RuntimeError):
    """QEMU answered a command with an error, or the monitor went away."""


class QMP:
    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock
        self._buf = b""
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, path: Path, timeout: float = 30) -> QMP:
        """Connect (retrying until QEMU created the socket), read the greeting and
        leave capabilities negotiation mode."""
        with trio.fail_after(timeout):
            while True:
                sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    await sock.connect(str(path))
                    break
                except OSError:
                    sock.close()
                    await trio.sleep(0.05)
        qmp = cls(sock)
        greeting = await qmp._message()
        if "QMP" not in greeting:
            raise QMPError(f"not a QMP greeting: {greeting}")
        await qmp.execute("qmp_capabilities")
        return qmp

    async def _message(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            data = await self._sock.recv(65536)
            if not data:
                raise QMPError("QMP connection closed")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        msg: dict[str, Any] = json.loads(line)
        return msg

    async def execute(self, command: str, **arguments: Any) -> Any:
        req: dict[str, Any] = {"execute": command}
        if arguments:
            req["arguments"] = arguments
        await self._sock.send(json.dumps(req).encode() + b"\n")
        while True:
            msg = await self._message()
            if "event" in msg:
                self.events.append(msg)
                continue
            if "error" in msg:
                raise QMPError(f"{command}: {msg['error']}")
            return msg.get("return")

    def close(self) -> None:
        self._sock.close()
