"""What tools/benchtcp.py's runs check and read from outside the processes they
start: ICMP echo replies from inside a namespace, an iperf3 server listening in a
namespace, the backend's CPU time over the measured part of a run, trionet's
status document and drop count from its --control-socket, and iperf3's own
end-of-test totals (``iperf3 -J``).  Every wait has a timeout.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl

# ICMP echo from inside a namespace: argv = destination, count, per-reply timeout.
# Exit status 0 if at least one reply came back.
_PING = r"""
import os, socket, struct, sys, time
dst, count, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
ident, ok, payload = os.getpid() & 0xFFFF, 0, b"trionet benchtcp"
for seq in range(count):
    body = struct.pack("!HH", ident, seq) + payload
    sock.sendto(struct.pack("!BBH", 8, 0, csum(b"\x08\x00\x00\x00" + body)) + body, (dst, 0))
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data = sock.recv(2048)
        except TimeoutError:
            break
        ihl = (data[0] & 15) * 4
        typ, _, _, rid, rseq = struct.unpack("!BBHHH", data[ihl : ihl + 8])
        if typ == 0 and rid == ident and rseq == seq:
            ok += 1
            break
print(f"{ok}/{count} echo replies from {dst}")
sys.exit(0 if ok else 1)
"""


def wait_for_listener(ns: str, port: int, proc: bl.Proc, timeout: float) -> None:
    """Wait until something in `ns` listens on TCP `port` (the iperf3 server)."""
    deadline = time.monotonic() + timeout
    while True:
        out = bl.run_cmd(
            [*bl.netns_exec(ns), "ss", "-Htln", f"sport = :{port}"], "list listening sockets"
        ).strip()
        if out:
            return
        if not proc.alive():
            raise bl.BenchError(
                f"{proc.name} exited with status {proc.popen.returncode}; last output:\n"
                f"{proc.tail()}"
            )
        if time.monotonic() > deadline:
            raise bl.BenchError(f"{proc.name} did not listen on port {port} within {timeout:g} s")
        time.sleep(0.05)


def ping(ns: str, dst: str, count: int = 3, timeout: float = 1.0) -> str:
    """ICMP echo from namespace `ns` to `dst`; BenchError unless a reply comes back."""
    argv = [*bl.netns_exec(ns), sys.executable, "-c", _PING, dst, str(count), str(timeout)]
    what = f"no ICMP echo reply from {dst} (namespace {ns}, {count} requests)"
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=count * timeout + 10.0,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise bl.BenchError(f"{what}: timed out") from exc
    lines = (done.stdout + done.stderr).strip().splitlines()
    if done.returncode != 0:
        raise bl.BenchError(f"{what}: {lines[-1] if lines else f'status {done.returncode}'}")
    return lines[-1] if lines else ""


def sample_cpu(backend: bl.Proc, client: bl.Proc, wait: float) -> tuple[float, float] | None:
    """The backend's CPU seconds once `wait` seconds of the client's run have passed."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and client.alive():
        time.sleep(0.05)
    return bl.cpu_seconds(backend.pid) if client.alive() else None


def trionet_status(path: Path) -> dict[str, Any] | None:
    """trionet's status document from its --control-socket (None if unavailable)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5.0)
            s.connect(str(path))
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        data = json.loads(b"".join(chunks))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def trionet_drops(path: Path) -> int | None:
    """Frames trionet dropped, summed over its queue pairs (None if unavailable)."""
    status = trionet_status(path)
    try:
        return sum(int(p.get("drops", 0)) for p in status["pairs"]) if status else None
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def parse_iperf(proc: bl.Proc, code: int) -> tuple[float, float, int | None]:
    """(sender bits/s, receiver bits/s, retransmits) from `iperf3 -J` output."""
    text = "\n".join(ln.text for ln in proc.snapshot())
    start = text.find("{")
    try:
        data = json.loads(text[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise bl.BenchError(f"iperf3 client (status {code}) printed no JSON:\n{proc.tail()}")
    if data.get("error"):
        raise bl.BenchError(f"iperf3 client: {data['error']}")
    try:
        sent = data["end"]["sum_sent"]
        received = data["end"]["sum_received"]
        retr = sent.get("retransmits")
        return (
            float(sent["bits_per_second"]),
            float(received["bits_per_second"]),
            int(retr) if retr is not None else None,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise bl.BenchError(f"iperf3 JSON lacks end.sum_sent/sum_received: {exc}") from exc
