"""A TCP connection's native part (``struct tn_tcpc``, ``native/usertcp.h``)
for tests that play the guest driver themselves: a connected socket pair on
loopback, and the header template the stack would give the connection."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from trionet.backends.user.config import parse_mac
from trionet.backends.user.tcp import Template
from trionet.native import ffi, lib


def loopback_pair(v6: bool = False) -> tuple[socket.socket, socket.socket]:
    """(host, ours): the host peer, and the stack's end (non-blocking)."""
    family, loop = (socket.AF_INET6, "::1") if v6 else (socket.AF_INET, "127.0.0.1")
    with socket.create_server((loop, 0), family=family) as listener:
        host = socket.create_connection(listener.getsockname()[:2])
        ours, _ = listener.accept()
    ours.setblocking(False)
    return host, ours


def new_tcpc(
    ours: socket.socket, macs: tuple[str, str], addrs: tuple[str, str], ports: tuple[int, int],
    una: int,
) -> Any:  # fmt: skip
    """A ``struct tn_tcpc *`` for socket ``ours``: frames from the peer
    (``addrs``, ``ports``: the peer's then the guest's; ``macs``: the guest's
    then ours) whose stream's first byte is ``una``."""
    guest_mac, our_mac = macs
    peer, guest = addrs
    tmpl = Template(
        parse_mac(guest_mac), parse_mac(our_mac), ipaddress.ip_address(peer),
        ipaddress.ip_address(guest), *ports,
    ).header()  # fmt: skip
    native = lib.tn_tcpc_new(ours.fileno(), tmpl, len(tmpl), una, 0)
    assert native != ffi.NULL
    return native
