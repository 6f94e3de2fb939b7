"""Host ports for the e2e tests' own servers and for trionet's inbound
forwards, picked below the kernel's ephemeral range: a port picked from that
range and let go can be taken by any outgoing connection (the user stack's
sockets towards the host, the tests' own probes) before it is used, and a
forward that cannot listen is retried only after a second."""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOWEST = 10000


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    """A port of ``kind`` free on 127.0.0.1 now, outside the ephemeral range."""
    high = _ephemeral_low() - 1
    for _ in range(200):
        port = random.randint(LOWEST, high)
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {LOWEST}-{high}")


def free_ports(n: int, kind: socket.SocketKind = socket.SOCK_STREAM) -> list[int]:
    """``n`` different such ports."""
    ports: list[int] = []
    while len(ports) < n:
        port = free_port(kind)
        if port not in ports:
            ports.append(port)
    return ports
