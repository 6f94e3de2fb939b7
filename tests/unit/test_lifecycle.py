"""The service as a supervisor sees it: sd_notify datagrams read from a real
NOTIFY_SOCKET, ``--ready-fd``, JSON logs with the VM id, the capabilities
and QEMU's backend descriptor, ``trionet status --format table``."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import trio

from tests.fakes.driver import GuestRam
from tests.fakes.frontend import Frontend
from tests.fakes.service_process import ServiceProcess
from trionet.service.cli import capabilities
from trionet.service.lifecycle import Notifier
from trionet.service.logs import JsonFormatter, VmFilter
from trionet.vhost_user import messages as m

REPO = Path(__file__).resolve().parents[2]


class NotifyListener:
    """A service manager's end of NOTIFY_SOCKET: one datagram per message."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.address = address

    async def bind(self) -> None:
        await self.sock.bind(self.address)

    async def next(self) -> dict[str, str]:
        with trio.fail_after(20):
            data = await self.sock.recv(4096)
        return dict(line.split("=", 1) for line in data.decode().splitlines())

    async def until(self, key: str, contains: str = "") -> dict[str, str]:
        while True:
            msg = await self.next()
            if key in msg and contains in msg[key]:
                return msg


async def test_sd_notify_ready_status_stopping(tmp_path: Path, ram: GuestRam) -> None:
    listener = NotifyListener(str(tmp_path / "notify"))
    await listener.bind()
    proc = ServiceProcess(tmp_path, env={"NOTIFY_SOCKET": str(tmp_path / "notify")})
    try:
        ready = await listener.next()
        assert ready["READY"] == "1"
        assert ready["MAINPID"] == str(proc.pid)
        assert "4 queue pairs offered" in ready["STATUS"]
        # READY=1 means the socket listens: connecting now must work
        fe = await Frontend.connect(str(proc.socket_path), ram)
        try:
            await listener.until("STATUS", "VMM connected")
            await fe.negotiate()
            await fe.setup_pairs(4)
            await fe.send(m.SetStatus(status=15))  # DRIVER_OK: the enables count
            await fe.sync()
            await listener.until("STATUS", "4/4 queue pairs active")
            proc.popen.send_signal(15)
            stopping = await listener.until("STOPPING")
            assert stopping["STOPPING"] == "1"
        finally:
            fe.close()
    finally:
        rc = proc.stop()
    assert rc == 0, proc.log()


async def test_sd_notify_abstract_socket(tmp_path: Path) -> None:
    name = f"trionet-test-{os.getpid()}-{id(tmp_path)}"
    listener = NotifyListener(b"\0" + name.encode())
    await listener.bind()
    proc = ServiceProcess(tmp_path, env={"NOTIFY_SOCKET": "@" + name})
    try:
        assert (await listener.next())["READY"] == "1"
    finally:
        assert proc.stop() == 0, proc.log()


async def test_ready_fd_line_when_listening(tmp_path: Path, ram: GuestRam) -> None:
    r, w = os.pipe()
    proc = ServiceProcess(tmp_path, "--ready-fd", str(w), pass_fds=(w,))
    os.close(w)
    try:
        line = await trio.to_thread.run_sync(lambda: os.read(r, 256))
        assert line.startswith(b"READY=1") and line.endswith(b"\n")
        assert os.read(r, 256) == b""  # written once, then closed
        assert proc.socket_path.exists()
        await proc.serves_next_connection(ram)
    finally:
        os.close(r)
        assert proc.stop() == 0, proc.log()


def test_ready_fd_not_open_is_refused(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "trionet", "--backend", "loop", "--ready-fd", "987",
         "--socket-path", str(tmp_path / "s")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "--ready-fd 987" in out.stderr


async def test_json_logs_carry_the_vm_id(tmp_path: Path, ram: GuestRam) -> None:
    proc = ServiceProcess(tmp_path, "--log-format", "json", "--vm-id", "guest-42")
    try:
        await proc.started()
        await proc.serves_next_connection(ram)
    finally:
        assert proc.stop() == 0
    lines = [json.loads(line) for line in proc.log().splitlines() if line.strip()]
    assert lines, "no log lines"
    for obj in lines:
        assert obj["vm"] == "guest-42"
        assert {"time", "level", "event", "logger"} <= obj.keys()
        assert obj["time"].endswith("Z")
    events = [obj["event"] for obj in lines]
    assert any("VMM connected" in e for e in events)
    assert any("drain" in e for e in events)


def test_json_formatter_pair_field() -> None:
    rec = logging.LogRecord(
        "trionet.x", logging.WARNING, __file__, 1, "pair %d: %s", (3, "x"), None
    )
    VmFilter("vm1").filter(rec)
    obj = json.loads(JsonFormatter().format(rec))
    assert obj == {**obj, "vm": "vm1", "pair": 3, "level": "warning", "event": "pair 3: x"}
    rec = logging.LogRecord("trionet.x", logging.INFO, __file__, 1, "no pair", (), None)
    VmFilter("").filter(rec)
    assert "pair" not in json.loads(JsonFormatter().format(rec))


def test_capabilities_match_the_qemu_descriptor() -> None:
    desc = json.loads((REPO / "contrib" / "50-trionet.json").read_text())
    # the VhostUserBackend schema (QEMU docs/interop/vhost-user.json)
    assert set(desc) <= {"description", "type", "binary", "tags"}
    assert {"description", "type", "binary"} <= set(desc)
    assert Path(desc["binary"]).is_absolute() and desc["binary"].endswith("/trionet")
    assert desc["type"] == capabilities()["type"] == "net"
    # the convention: other options and arguments are ignored
    out = subprocess.run(
        [sys.executable, "-m", "trionet", "--no-such-option", "--print-capabilities", "x"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0
    assert json.loads(out.stdout) == capabilities()


def test_notifier_without_socket_is_silent() -> None:
    n = Notifier(None)
    n.ready("x")
    n.status("y")
    n.stopping("z")
    n.close()


async def test_status_table_from_the_cli(tmp_path: Path) -> None:
    proc = ServiceProcess(tmp_path, "--vm-id", "tbl")
    try:
        await proc.started()
        out = await trio.to_thread.run_sync(
            lambda: subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "trionet",
                    "status",
                    "--control-socket",
                    str(proc.control_path),
                    "--format",
                    "table",
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
        )
    finally:
        assert proc.stop() == 0
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[0]
    assert first.startswith("vm tbl") and "no VMM" in first and "pairs 0/4" in first


def test_metrics_address_in_use_is_a_config_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "trionet", "--backend", "loop", "--socket-path",
             str(tmp_path / "s"), "--metrics", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert f"--metrics 127.0.0.1:{port}" in out.stderr
