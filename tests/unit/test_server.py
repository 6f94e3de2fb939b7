"""Backend program conventions: --socket-path, --fd, --connect, --print-capabilities."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.fakes.driver import GuestRam
from tests.fakes.frontend import Frontend
from trionet.backends.loop import LoopBackend
from trionet.service.server import ConfigError, Service, ServiceConfig, make_listener
from trionet.vhost_user import messages as m


def test_print_capabilities_is_json() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "trionet", "--print-capabilities"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert json.loads(out) == {"type": "net"}


def test_refuses_a_path_that_is_not_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "not-a-socket"
    path.write_text("precious")
    with pytest.raises(ConfigError, match="not a socket"):
        make_listener(ServiceConfig(socket_path=path))
    assert path.read_text() == "precious"


def test_cli_reports_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    res = subprocess.run(
        [sys.executable, "-m", "trionet", "--backend", "loop", "--socket-path", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 2 and "not a socket" in res.stderr


async def test_stale_socket_is_replaced_and_next_vmm_accepted(
    tmp_path: Path, ram: GuestRam
) -> None:
    path = tmp_path / "vhost.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on
    service = Service(ServiceConfig(queue_pairs=2, socket_path=path), LoopBackend(2))
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        for _ in range(2):  # one VMM after another
            fe = await Frontend.connect(str(path), ram)
            assert await fe.u64(m.GetQueueNum()) == 2
            fe.close()
            with trio.fail_after(5):
                while service.session is not None:
                    await trio.sleep(0.01)
        assert service.sessions_served == 2
        nursery.cancel_scope.cancel()


async def test_listening_fd_handed_over(tmp_path: Path, ram: GuestRam) -> None:
    path = tmp_path / "orchestrator.sock"
    lsock = socket.socket(socket.AF_UNIX)
    lsock.bind(str(path))
    lsock.listen(1)
    fd = os.dup(lsock.fileno())
    lsock.close()
    service = Service(ServiceConfig(queue_pairs=3, listen_fd=fd), LoopBackend(3))
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        fe = await Frontend.connect(str(path), ram)
        assert await fe.u64(m.GetQueueNum()) == 3
        fe.close()
        nursery.cancel_scope.cancel()


async def test_connect_to_a_listening_vmm_with_backoff(tmp_path: Path, ram: GuestRam) -> None:
    path = tmp_path / "vmm.sock"
    service = Service(ServiceConfig(queue_pairs=1, connect_path=path), LoopBackend(1))
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        await trio.sleep(0.3)  # trionet is retrying: nobody listens yet
        listener = trio.socket.socket(socket.AF_UNIX)
        await listener.bind(str(path))
        listener.listen(1)
        with trio.fail_after(10):
            conn, _ = await listener.accept()
        fe = Frontend(conn, ram)
        assert await fe.u64(m.GetQueueNum()) == 1
        fe.close()
        listener.close()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "args", [["--backend", "tap", "--loop-generate", "64"], ["--loop-generate", "13"]]
)
def test_cli_refuses_a_generator_it_cannot_run(tmp_path: Path, args: list[str]) -> None:
    sock = tmp_path / "s.sock"
    argv = [sys.executable, "-m", "trionet", "--backend", "loop", "--socket-path", str(sock)]
    res = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "--loop-generate" in res.stderr
    assert not sock.exists()
