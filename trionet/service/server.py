"""The long-lived service: one backend, one VMM connection at a time.

``--socket-path`` listens (a stale socket file is replaced, anything else is
refused), ``--fd`` serves a listening socket the orchestrator handed over,
``--connect`` dials a VMM that listens and redials with backoff.  After a VMM
disconnects the session is cleaned up and the next connection is accepted.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import trio

from trionet.errors import ProtocolError
from trionet.netns.frontend import FrontendError, NetnsFrontend
from trionet.service.counters import PairCounters
from trionet.service.faults import Faults, Recoverable, watch_backend
from trionet.service.session import HostBackend, Session
from trionet.service.state import StateFile

log = logging.getLogger(__name__)

BACKOFF_MIN = 0.1
BACKOFF_MAX = 5.0


class ConfigError(Exception):
    """A command line or environment problem: printed, exit status 2."""


@dataclass
class ServiceConfig:
    queue_pairs: int = 16
    socket_path: Path | None = None
    listen_fd: int | None = None
    connect_path: Path | None = None
    control_socket: Path | None = None
    state_file: Path | None = None
    mtu: int = 1500
    threads: bool = False  # serve each pair's rings on a native worker thread
    vm_id: str = ""  # --vm-id: in the status, every log line and every metric
    # --netns: trionet's own front end, served over a socketpair instead of a VMM
    frontend: NetnsFrontend | None = None
    # called once the sockets are bound, before the first connection (the sandbox)
    after_setup: Callable[[], Awaitable[None]] | None = None


class Service:
    def __init__(self, config: ServiceConfig, backend: HostBackend) -> None:
        self.config = config
        self.backend = backend
        self.counters = [PairCounters() for _ in range(config.queue_pairs)]
        self.session: Session | None = None
        self.sessions_served = 0
        self.connections = 0
        self.rings_broken_before = 0  # by sessions that have ended
        self.draining = False
        self.on_change: Callable[[], None] | None = None  # connection or pair count changed
        self.faults = Faults()

    def status(self) -> dict[str, Any]:
        if self.session is not None:
            st = self.session.status()
        else:
            st = {
                "active_pairs": 0,
                "max_pairs": self.config.queue_pairs,
                "pairs": [
                    {"index": p, "enabled": False, **c.as_dict()}
                    for p, c in enumerate(self.counters)
                ],
            }
        st["connected"] = self.session is not None
        st["sessions_served"] = self.sessions_served
        st["backend"] = self.backend.name
        st["vm"] = self.config.vm_id
        st["vmm_connections"] = self.connections
        st["rings_broken"] = self.rings_broken_before + (
            self.session.rings_broken if self.session is not None else 0
        )
        st["draining"] = self.draining
        st["faults"] = self.faults.as_dict()
        if self.config.frontend is not None:
            st["netns"] = {"pairs": self.config.frontend.status()}
        return st

    def summary(self) -> str:
        """One line for the service manager (sd_notify STATUS=)."""
        s = self.session
        if self.draining:
            return "draining"
        if s is None:
            return f"waiting for a VMM, {self.config.queue_pairs} queue pairs offered"
        return f"VMM connected, {s.active_pairs}/{s.max_pairs} queue pairs active"

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    async def drain(self) -> None:
        """SIGTERM: take no new connection or work, finish the batches in
        flight and hand every chain taken back to the guest as used.  The
        caller bounds this with the grace period, then cancels ``run``."""
        self.draining = True
        self._changed()
        if self.session is not None:
            await self.session.drain()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            if self.config.control_socket is not None:
                await nursery.start(serve_control, self.config.control_socket, self.status)
            if hasattr(self.backend, "lost") and hasattr(self.backend, "reopen"):
                tap = cast(Recoverable, self.backend)
                nursery.start_soon(watch_backend, tap, self.faults, self._swap_fds)
            if self.config.frontend is not None:
                await self._setup_done()
                task_status.started()
                await self._serve_frontend(self.config.frontend)
            elif self.config.connect_path is not None:
                await self._setup_done()
                task_status.started()
                await self._dial(self.config.connect_path)
            else:
                listener = make_listener(self.config)
                try:
                    await self._setup_done()
                except BaseException:
                    listener.close()
                    raise
                task_status.started()
                log.info("listening for a VMM")
                with listener:
                    await self._accept(listener)
            nursery.cancel_scope.cancel()

    async def _setup_done(self) -> None:
        if self.config.after_setup is not None:
            await self.config.after_setup()

    async def _accept(self, listener: trio.socket.SocketType) -> None:
        while True:
            conn, _ = await listener.accept()
            if self.draining:
                conn.close()
                return
            with conn:
                await self._serve_connection(conn)

    async def _serve_frontend(self, frontend: NetnsFrontend) -> None:
        """One session for our own front end; its failure, or the session's end,
        ends the service (the namespace has nobody else to serve it)."""
        ours, theirs = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with ours, theirs:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(frontend.run, theirs)
                await self._serve_connection(ours)
                nursery.cancel_scope.cancel()
        raise FrontendError("the namespace's session ended (see the log above)")

    async def _dial(self, path: Path) -> None:
        delay = BACKOFF_MIN
        while True:
            conn = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                await conn.connect(str(path))
            except OSError as exc:
                conn.close()
                log.info("connect to %s: %s; retrying in %.1fs", path, exc.strerror, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            delay = BACKOFF_MIN
            with conn:
                await self._serve_connection(conn)

    async def _serve_connection(self, conn: trio.socket.SocketType) -> None:
        state = StateFile(self.config.state_file) if self.config.state_file else None
        session = Session(
            conn,
            self.backend,
            max_pairs=self.config.queue_pairs,
            mtu=self.config.mtu,
            state=state,
            counters=self.counters,
            threaded=self.config.threads,
        )
        session.on_change = self._changed
        self.session = session
        self.connections += 1
        log.info("VMM connected")
        self._changed()
        if state is not None and session.policy.restore_target is not None:
            self.faults.restored += 1
        try:
            await session.run()
        except* (OSError, trio.BrokenResourceError, ProtocolError) as group:
            # the session's own tasks (pairs, control queue) leave its nursery
            # as an ExceptionGroup: whatever the VMM did ends this connection only
            log.error("VMM connection failed: %s", "; ".join(map(str, group.exceptions)))
            session.error = session.error or "failed"
        finally:
            self.session = None
            self.sessions_served += 1
            self.rings_broken_before += session.rings_broken
            self._changed()
            self._count_end(session)
            if self.config.frontend is None:
                log.info("session ended; waiting for the next VMM connection")

    async def _swap_fds(self, old: list[int]) -> None:
        """The backend has new host fds (a tap re-created): restart the pairs on
        them, and close the old ones once no pair task uses them."""
        session = self.session
        if session is not None:
            done = [slot.done for slot in session.slots]
            session.reconcile(force=True)
            for event in done:
                await event.wait()
        for fd in old:
            trio.lowlevel.notify_closing(fd)
            os.close(fd)

    def _count_end(self, session: Session) -> None:
        if self.config.frontend is not None:
            return  # our own front end: no VMM lost (its failure ends the service)
        if session.error is not None:
            self.faults.vmm_errors += 1
        running = sum(1 for vr in session.proto.vrings if vr.started)
        if running:
            self.faults.vmm_lost += 1
            log.warning(
                "VMM went away with %d rings running (lost VMMs: %d); serving the next one",
                running,
                self.faults.vmm_lost,
            )


def make_listener(config: ServiceConfig) -> trio.socket.SocketType:
    if config.listen_fd is not None:
        try:
            sock = socket.socket(fileno=config.listen_fd)
        except OSError as exc:
            raise ConfigError(f"--fd {config.listen_fd}: {exc.strerror}") from None
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise ConfigError(f"--fd {config.listen_fd} is not a UNIX stream socket")
        sock.setblocking(False)
        return trio.socket.from_stdlib_socket(sock)
    assert config.socket_path is not None
    path = config.socket_path
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"--socket-path {path} exists and is not a socket")
        os.unlink(path)
    # bind + listen on a temporary name, then rename: the path appears only
    # once connections to it are accepted.
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        raw.bind(str(tmp))
        raw.listen(4)
        os.rename(tmp, path)
    except OSError as exc:
        raw.close()
        raise ConfigError(f"cannot listen on {path}: {exc.strerror}") from None
    raw.setblocking(False)
    return trio.socket.from_stdlib_socket(raw)


async def serve_control(
    path: Path,
    status: Callable[[], dict[str, Any]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Each connection to ``path`` receives the status as one JSON document."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(8)
    task_status.started()
    with sock:
        while True:
            conn, _ = await sock.accept()
            with conn:
                data = memoryview(json.dumps(status(), sort_keys=True).encode() + b"\n")
                try:
                    while data:
                        data = data[await conn.send(data) :]
                except OSError:
                    pass


def read_status(path: Path) -> dict[str, Any]:
    """Client side of ``serve_control`` (blocking; for the CLI)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    data = json.loads(b"".join(chunks))
    assert isinstance(data, dict)
    return data
