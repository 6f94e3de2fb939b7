"""Address translation between the guest's view and the host's sockets.

One policy for every protocol (UDP and ICMP here, TCP later), as passt's
``fwd.c``: where a guest packet to address A, port P goes on the host, and
what address a host peer appears as to the guest.

- the map-host-loopback address (default: the gateway) is the host's own
  loopback: 127.0.0.1 / ::1;
- DNS (port 53) to an address trionet advertises as the resolver goes to the
  configured upstreams;
- multicast, broadcast, unspecified and the guest's own address go nowhere;
- any other address is itself.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, ip_address

from trionet.backends.user.config import UserConfig
from trionet.backends.user.packets import IPAddress

LOOPBACK4 = IPv4Address("127.0.0.1")
LOOPBACK6 = IPv6Address("::1")
DNS_PORT = 53


@dataclass(frozen=True, slots=True)
class Target:
    """Where a guest flow goes on the host: a socket address and its family."""

    address: IPAddress
    port: int
    dns: bool = False  # a query forwarded to an upstream resolver

    @property
    def sockaddr(self) -> tuple[str, int]:
        return (str(self.address), self.port)


class Unroutable(Exception):
    """The guest addressed something trionet does not forward; ``reason`` names the counter."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _v4_is_special(cfg: UserConfig, a: IPv4Address) -> str | None:
    if a.is_multicast or a == IPv4Address("255.255.255.255") or a.is_unspecified:
        return "multicast"
    if cfg.v4 is not None:
        net = IPv4Network(f"{cfg.v4.address}/{cfg.v4.prefix_len}", strict=False)
        if a == net.broadcast_address:
            return "multicast"
        if a == cfg.v4.address:
            return "to_self"
    return None


def host_target(cfg: UserConfig, dst: IPAddress, port: int) -> Target:
    """The host-side destination of a guest packet to ``dst``:``port``."""
    if isinstance(dst, IPv4Address):
        special = _v4_is_special(cfg, dst)
        if special is not None:
            raise Unroutable(special)
        v4 = cfg.v4
        if v4 is None:
            raise Unroutable("family_disabled")
        if port == DNS_PORT and dst in v4.dns and cfg.dns_upstreams:
            return _upstream(cfg)
        if v4.map_host_loopback is not None and dst == v4.map_host_loopback:
            return Target(LOOPBACK4, port)
        return Target(dst, port)
    if dst.is_multicast or dst.is_unspecified:
        raise Unroutable("multicast")
    v6 = cfg.v6
    if v6 is None:
        raise Unroutable("family_disabled")
    if dst == v6.address:
        raise Unroutable("to_self")
    if port == DNS_PORT and dst in v6.dns and cfg.dns_upstreams:
        return _upstream(cfg)
    if v6.map_host_loopback is not None and dst == v6.map_host_loopback:
        return Target(LOOPBACK6, port)
    if dst in (v6.gateway, v6.link_local) and dst.is_link_local:
        # the router's link-local address has no host-side meaning: it is the host
        return Target(LOOPBACK6, port)
    if dst.is_link_local:
        raise Unroutable("link_local")
    return Target(dst, port)


def _upstream(cfg: UserConfig) -> Target:
    address, port = cfg.dns_upstreams[0]
    return Target(ip_address(address), port, dns=True)


def guest_view(cfg: UserConfig, host_addr: IPAddress) -> IPAddress | None:
    """How a host-side peer at ``host_addr`` appears to the guest (inbound
    forwarding): the host's loopback appears as the map-host-loopback address;
    None when the guest cannot be told about it (no such family)."""
    if isinstance(host_addr, IPv6Address) and host_addr.ipv4_mapped is not None:
        host_addr = host_addr.ipv4_mapped
    if isinstance(host_addr, IPv4Address):
        if cfg.v4 is None:
            return None
        if host_addr.is_loopback:
            return cfg.v4.map_host_loopback or cfg.v4.gateway
        return host_addr
    if cfg.v6 is None:
        return None
    if host_addr.is_loopback:
        return cfg.v6.map_host_loopback or cfg.v6.gateway
    return host_addr


def guest_address(cfg: UserConfig, version: int) -> IPAddress | None:
    if version == 4:
        return cfg.v4.address if cfg.v4 is not None else None
    return cfg.v6.address if cfg.v6 is not None else None


def listen_points(cfg: UserConfig, proto: str) -> Iterator[tuple[int, str, int, int]]:
    """Where inbound forwarding of ``proto`` ("udp"/"tcp") listens on the host:
    (address family, bind address, host port, guest port) for every port of
    every ``-u``/``-t`` range; without a bind address, any address of each
    family the guest has."""
    for fwd in cfg.forwards:
        if fwd.proto != proto:
            continue
        if fwd.bind is not None:
            family = socket.AF_INET if isinstance(fwd.bind, IPv4Address) else socket.AF_INET6
            binds = [(family, str(fwd.bind))]
        else:
            binds = [(socket.AF_INET, "0.0.0.0")] if cfg.v4 is not None else []
            binds += [(socket.AF_INET6, "::")] if cfg.v6 is not None else []
        for port in range(fwd.host_first, fwd.host_last + 1):
            for family, addr in binds:
                yield family, addr, port, fwd.guest_first + port - fwd.host_first
