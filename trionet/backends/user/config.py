"""Configuration of the user-mode stack: addressing, DNS, forwards, timeouts.

The guest's addresses follow passt (its ``conf.c`` and man page; our code):

* **From the host.** Per family, the interface of the host's default route
  (lowest metric; of a multipath route, the first nexthop of the highest
  weight) gives the guest its first global address and the gateway.  IPv4
  keeps the host's prefix length; IPv6 always gets /64, as passt does.
* **Local mode.** With no usable default route (none, no gateway on an IPv4
  one, or no global address on its interface) a family falls back to
  link-local addressing: IPv4 guest 169.254.2.1/16 with gateway 169.254.2.2;
  IPv6 gateway fe80::1 and *no* assigned address -- ``V6Config.address`` is
  then ``::`` (unspecified): the guest keeps only its own link-local address
  (RA carries no prefix, DHCPv6 offers no address).  Unlike passt we do not
  fall back to an interface that merely has some non-default route.
* **Options** replace single fields per family: ``--address`` keeps the
  host's gateway unless ``--gateway`` is given too (give both when the
  host's gateway is not on the new subnet).
* **Our IPv6 link-local** (the RA source) is the gateway when that is
  link-local, else fe80::1.
* **map-host-loopback** defaults to the gateway per family; ``--no-map-gw``
  turns that off for both families unless ``--map-host-loopback`` names one.
* **DNS.** The guest is told about the gateway (``--dns`` replaces that list
  for both families; ``--dns none`` clears it).  Queries to an advertised
  address go to ``dns_upstreams``: by default every ``/etc/resolv.conf``
  nameserver on port 53 (loopback ones too: trionet asks them from the host;
  IPv6 link-local ones are skipped as their scope is lost).  The search list
  comes from resolv.conf.

``read_host_routes`` is the only netlink reader (blocking: run it on a worker
thread, as ``read_host_view`` does); ``derive_config`` is the pure decision
from a ``HostView`` and the ``UserOptions`` parsed by ``options_from_args``.
"""

from __future__ import annotations

import argparse
import logging
import math
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv6Address,
    IPv6Interface,
    ip_address,
    ip_interface,
)
from pathlib import Path
from typing import Any, TypeVar

import trio
from pyroute2 import IPRoute

from trionet.backends.user.forwards import Forward, check_overlaps, parse_forward

__all__ = [
    "OUR_MAC",
    "RESOLV_CONF",
    "DefaultRoute",
    "Forward",
    "HostV4",
    "HostV6",
    "HostView",
    "ResolvConf",
    "UserConfig",
    "UserConfigError",
    "UserOptions",
    "V4Config",
    "V6Config",
    "add_user_arguments",
    "derive_config",
    "options_from_args",
    "parse_dns_upstream",
    "parse_forward",
    "parse_mac",
    "parse_resolv_conf",
    "pick_default_route",
    "read_host_routes",
    "read_host_view",
    "user_config_from_args",
]

log = logging.getLogger(__name__)

IPAddress = IPv4Address | IPv6Address
_T = TypeVar("_T")

OUR_MAC = bytes.fromhex("9a559a559a55")
RESOLV_CONF = Path("/etc/resolv.conf")
DNS_PORT = 53
LOCAL_V4 = IPv4Interface("169.254.2.1/16")
LOCAL_GW4 = IPv4Address("169.254.2.2")
LOCAL_GW6 = IPv6Address("fe80::1")
NO_ADDRESS6 = IPv6Interface("::/64")
V6_PREFIX_LEN = 64
MIN_MTU, MIN_MTU6, MAX_MTU = 68, 1280, 65535

_RT_TABLE_MAIN = 254
_RTN_UNICAST = 1
_RT_SCOPE_UNIVERSE = 0
_IFF_LOOPBACK = 0x8
_IFA_F_DADFAILED = 0x08
_IFA_F_DEPRECATED = 0x20


class UserConfigError(ValueError):
    """An invalid user-mode option or combination (the CLI reports it, exit 2).

    Not ``trionet.service.server.ConfigError``: the service imports this
    package, so importing the service from here would be an import cycle.
    """


# ----------------------------------------------------------------------------
# the configuration the stack runs with


@dataclass(frozen=True, slots=True)
class V4Config:
    address: IPv4Address  # the guest's
    prefix_len: int
    gateway: IPv4Address  # trionet answers as this address (ARP, DHCP server id, router)
    map_host_loopback: IPv4Address | None  # traffic to it goes to the host's 127.0.0.1
    dns: tuple[IPv4Address, ...]  # advertised by DHCP


@dataclass(frozen=True, slots=True)
class V6Config:
    address: IPv6Address  # the guest's; "::" in local mode (nothing assigned)
    prefix_len: int  # 64 normally
    gateway: IPv6Address  # global or link-local; trionet answers NS for it
    link_local: IPv6Address  # trionet's own link-local (RA source)
    map_host_loopback: IPv6Address | None  # traffic to it goes to the host's ::1
    dns: tuple[IPv6Address, ...]  # advertised by RA RDNSS and DHCPv6


@dataclass(frozen=True, slots=True)
class UserConfig:
    v4: V4Config | None  # None with -6
    v6: V6Config | None  # None with -4
    guest_mac: bytes | None  # --mac; None: learned from the guest's first frame
    our_mac: bytes  # the gateway's MAC
    mtu: int = 65520
    dns_upstreams: tuple[tuple[str, int], ...] = ()  # where advertised-DNS queries go
    search: tuple[str, ...] = ()  # domain search list
    forwards: tuple[Forward, ...] = ()
    udp_timeout: float = 30.0
    udp_stream_timeout: float = 180.0  # once both sides spoke
    lease_time: int = 3600  # DHCP/DHCPv6 lease seconds


# ----------------------------------------------------------------------------
# what the host looks like (plain data; tests build it by hand)


@dataclass(frozen=True, slots=True)
class HostV4:
    """The IPv4 default route's interface, its gateway and first global address."""

    ifname: str
    gateway: IPv4Address | None
    address: IPv4Interface | None


@dataclass(frozen=True, slots=True)
class HostV6:
    """The IPv6 default route's interface, its gateway and first global address."""

    ifname: str
    gateway: IPv6Address | None
    address: IPv6Interface | None


@dataclass(frozen=True, slots=True)
class ResolvConf:
    nameservers: tuple[IPAddress, ...] = ()  # scope ids dropped
    search: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class HostView:
    """The host as the user-mode stack sees it; a family is None without a default route."""

    v4: HostV4 | None = None
    v6: HostV6 | None = None
    resolv: ResolvConf = field(default_factory=ResolvConf)


@dataclass(frozen=True, slots=True)
class DefaultRoute:
    """One default route of the main table, reduced to what we choose by."""

    oif: int
    gateway: str | None
    metric: int = 0


def pick_default_route(routes: Iterable[DefaultRoute]) -> DefaultRoute | None:
    """The route the kernel prefers: lowest metric, the first among equals."""
    best: DefaultRoute | None = None
    for route in routes:
        if best is None or route.metric < best.metric:
            best = route
    return best


def _default_routes(ipr: Any, family: int, loopbacks: set[int]) -> list[DefaultRoute]:
    found: list[DefaultRoute] = []
    for msg in ipr.route("dump", family=family):
        table = msg.get("RTA_TABLE") or msg["table"]
        if msg["dst_len"] != 0 or table != _RT_TABLE_MAIN or msg["type"] != _RTN_UNICAST:
            continue
        oif, gateway = msg.get("RTA_OIF"), msg.get("RTA_GATEWAY")
        hops = msg.get("RTA_MULTIPATH")
        if hops:  # the first nexthop of the highest weight (weight = hops + 1)
            top = max(nh["hops"] for nh in hops)
            first = next(nh for nh in hops if nh["hops"] == top)
            oif, gateway = first["oif"], first.get("RTA_GATEWAY")
        if not oif or oif in loopbacks:
            continue
        found.append(DefaultRoute(int(oif), gateway, int(msg.get("RTA_PRIORITY") or 0)))
    return found


def _first_global(ipr: Any, family: int, index: int) -> str | None:
    """``ADDR/PREFIX`` of the first usable global address on link ``index``."""
    for msg in ipr.addr("dump", family=family):
        flags = msg.get("IFA_FLAGS") or msg["flags"]
        if (
            msg["index"] != index
            or msg["scope"] != _RT_SCOPE_UNIVERSE
            or flags & (_IFA_F_DEPRECATED | _IFA_F_DADFAILED)
        ):
            continue
        addr = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
        if addr and not ip_address(addr).is_link_local:
            return f"{addr}/{msg['prefixlen']}"
    return None


def read_host_routes() -> HostView:
    """Read the host's default routes and addresses through netlink (blocking:
    call it on a worker thread).  ``resolv`` is left empty."""
    with IPRoute() as ipr:
        links = list(ipr.link("dump"))
        loopbacks = {int(m["index"]) for m in links if m["flags"] & _IFF_LOOPBACK}
        names = {int(m["index"]): str(m.get("IFLA_IFNAME")) for m in links}
        v4: HostV4 | None = None
        v6: HostV6 | None = None
        route = pick_default_route(_default_routes(ipr, socket.AF_INET, loopbacks))
        if route is not None:
            addr = _first_global(ipr, socket.AF_INET, route.oif)
            v4 = HostV4(
                names.get(route.oif, str(route.oif)),
                IPv4Address(route.gateway) if route.gateway else None,
                IPv4Interface(addr) if addr else None,
            )
        route = pick_default_route(_default_routes(ipr, socket.AF_INET6, loopbacks))
        if route is not None:
            addr = _first_global(ipr, socket.AF_INET6, route.oif)
            v6 = HostV6(
                names.get(route.oif, str(route.oif)),
                IPv6Address(route.gateway) if route.gateway else None,
                IPv6Interface(addr) if addr else None,
            )
    return HostView(v4, v6)


def parse_resolv_conf(path: Path | str = RESOLV_CONF) -> ResolvConf:
    """Nameservers (scope ids dropped, duplicates removed) and the search list
    (the last ``search`` or ``domain`` line wins, as in resolv.conf(5)).
    A missing or unreadable file gives an empty ``ResolvConf``."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as exc:
        log.warning("cannot read %s: %s", path, exc.strerror)
        return ResolvConf()
    servers: list[IPAddress] = []
    search: tuple[str, ...] = ()
    for line in text.splitlines():
        words = line.split()
        if len(words) < 2 or words[0].startswith(("#", ";")):
            continue
        if words[0] == "nameserver":
            try:
                addr = ip_address(words[1].split("%", 1)[0])
            except ValueError:
                log.warning("%s: ignoring nameserver %r", path, words[1])
                continue
            if addr not in servers:
                servers.append(addr)
        elif words[0] == "search":
            search = tuple(w for w in words[1:] if w != ".")
        elif words[0] == "domain":
            search = (words[1],)
    return ResolvConf(tuple(servers), search)


async def read_host_view(resolv_conf: Path | str = RESOLV_CONF) -> HostView:
    """``read_host_routes`` and ``parse_resolv_conf`` on a worker thread.  If
    netlink fails, both families fall back to local mode (with a warning)."""

    def read() -> HostView:
        resolv = parse_resolv_conf(resolv_conf)
        try:
            view = read_host_routes()
        except Exception as exc:  # netlink unavailable: OSError or NetlinkError
            log.warning("cannot read host routes (%s): using link-local addressing", exc)
            view = HostView()
        return replace(view, resolv=resolv)

    return await trio.to_thread.run_sync(read)


# ----------------------------------------------------------------------------
# options, and the decision


@dataclass(frozen=True, slots=True)
class UserOptions:
    """The user-mode options, parsed; None means "the default"."""

    address4: IPv4Interface | None = None
    address6: IPv6Interface | None = None
    gateway4: IPv4Address | None = None
    gateway6: IPv6Address | None = None
    dns4: tuple[IPv4Address, ...] | None = None  # None: (gateway,)
    dns6: tuple[IPv6Address, ...] | None = None
    dns_upstreams: tuple[tuple[str, int], ...] | None = None  # None: resolv.conf's
    map_host_loopback4: IPv4Address | None = None
    map_host_loopback6: IPv6Address | None = None
    no_map_gw: bool = False
    ipv4_only: bool = False
    ipv6_only: bool = False
    guest_mac: bytes | None = None
    mtu: int = 65520
    forwards: tuple[Forward, ...] = ()
    udp_timeout: float = 30.0
    udp_stream_timeout: float = 180.0


def derive_config(host: HostView, opts: UserOptions) -> UserConfig:
    """The configuration from what the host looks like and what was asked for
    (options win, per family and per field).  Raises ``UserConfigError``."""
    if opts.ipv4_only and opts.ipv6_only:
        raise UserConfigError("--ipv4-only and --ipv6-only exclude each other")
    _refuse_disabled(opts)
    v4 = None if opts.ipv6_only else _derive_v4(host.v4, opts)
    v6 = None if opts.ipv4_only else _derive_v6(host.v6, opts)
    if not MIN_MTU <= opts.mtu <= MAX_MTU:
        raise UserConfigError(f"--mtu {opts.mtu}: must be {MIN_MTU}..{MAX_MTU}")
    if v6 is not None and opts.mtu < MIN_MTU6:
        raise UserConfigError(f"--mtu {opts.mtu}: IPv6 needs at least {MIN_MTU6} (or use -4)")
    timeouts = (
        ("--udp-timeout", opts.udp_timeout),
        ("--udp-stream-timeout", opts.udp_stream_timeout),
    )
    for name, value in timeouts:
        if not (value > 0 and math.isfinite(value)):
            raise UserConfigError(f"{name} {value}: must be a positive number of seconds")
    if opts.dns_upstreams is not None:
        upstreams = opts.dns_upstreams
    else:
        upstreams = tuple(
            (str(ns), DNS_PORT)
            for ns in host.resolv.nameservers
            if not (ns.version == 6 and ns.is_link_local)
        )
    try:
        check_overlaps(opts.forwards)
    except ValueError as exc:
        raise UserConfigError(str(exc)) from None
    return UserConfig(
        v4=v4,
        v6=v6,
        guest_mac=opts.guest_mac,
        our_mac=OUR_MAC,
        mtu=opts.mtu,
        dns_upstreams=upstreams,
        search=host.resolv.search,
        forwards=opts.forwards,
        udp_timeout=opts.udp_timeout,
        udp_stream_timeout=opts.udp_stream_timeout,
    )


def _refuse_disabled(opts: UserOptions) -> None:
    for off, flag, values in (
        (opts.ipv6_only, "--ipv6-only", (opts.address4, opts.gateway4, opts.map_host_loopback4)),
        (opts.ipv4_only, "--ipv4-only", (opts.address6, opts.gateway6, opts.map_host_loopback6)),
    ):
        given = [str(v) for v in values if v is not None]
        if off and given:
            raise UserConfigError(f"{', '.join(given)}: that address family is off ({flag})")


def _derive_v4(host: HostV4 | None, opts: UserOptions) -> V4Config:
    if host is not None and host.gateway is not None and host.address is not None:
        address, gateway = host.address, host.gateway
    else:
        address, gateway = LOCAL_V4, LOCAL_GW4
    if opts.address4 is not None:
        address = opts.address4
    if opts.gateway4 is not None:
        gateway = opts.gateway4
    if address.ip == gateway:
        raise UserConfigError(f"IPv4 address {address.ip} is also the gateway")
    mapped = opts.map_host_loopback4
    if mapped is None and not opts.no_map_gw:
        mapped = gateway
    if mapped == address.ip:
        raise UserConfigError(f"--map-host-loopback {mapped} is the guest's own address")
    dns = opts.dns4 if opts.dns4 is not None else (gateway,)
    return V4Config(address.ip, address.network.prefixlen, gateway, mapped, dns)


def _derive_v6(host: HostV6 | None, opts: UserOptions) -> V6Config:
    address, gateway = NO_ADDRESS6, LOCAL_GW6
    if host is not None and host.address is not None:
        address = IPv6Interface((host.address.ip, V6_PREFIX_LEN))
        gateway = LOCAL_GW6 if host.gateway is None else host.gateway
    if opts.address6 is not None:
        address = opts.address6
    if opts.gateway6 is not None:
        gateway = opts.gateway6
    if address.ip == gateway:
        raise UserConfigError(f"IPv6 address {address.ip} is also the gateway")
    link_local = gateway if gateway.is_link_local else LOCAL_GW6
    mapped = opts.map_host_loopback6
    if mapped is None and not opts.no_map_gw:
        mapped = gateway
    if mapped == address.ip:
        raise UserConfigError(f"--map-host-loopback {mapped} is the guest's own address")
    dns = opts.dns6 if opts.dns6 is not None else (gateway,)
    return V6Config(address.ip, address.network.prefixlen, gateway, link_local, mapped, dns)


# ----------------------------------------------------------------------------
# small parsers (ValueError on bad input)


def parse_mac(text: str) -> bytes:
    """``aa:bb:cc:dd:ee:ff`` (or with ``-``) as 6 bytes; a unicast, non-zero MAC."""
    parts = text.replace("-", ":").split(":")
    if len(parts) != 6 or not all(
        len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p) for p in parts
    ):
        raise ValueError(f"{text!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
    mac = bytes(int(p, 16) for p in parts)
    if mac[0] & 1 or mac == bytes(6):
        raise ValueError(f"{text!r} is not a unicast MAC address")
    return mac


def parse_dns_upstream(text: str) -> tuple[str, int]:
    """``ADDR[:PORT]`` (IPv6 with a port: ``[ADDR]:PORT``) as ``(address, port)``."""
    host, port = text, DNS_PORT
    if text.startswith("["):
        inner, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r}: expected [IPv6]:PORT")
        host = inner
        if rest:
            port = _port(rest[1:], text)
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = _port(port_text, text)
    try:
        addr = ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
    if text.startswith("[") and addr.version != 6:
        raise ValueError(f"{text!r}: brackets are for IPv6 addresses")
    if addr.is_unspecified or addr.is_multicast:
        raise ValueError(f"{text!r}: not a unicast address")
    return str(addr), port


def _port(text: str, whole: str) -> int:
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= 65535):
        raise ValueError(f"{whole!r}: port must be 1..65535")
    return int(text)


def _unicast(text: str, what: str) -> IPAddress:
    try:
        addr = ip_address(text)
    except ValueError:
        raise ValueError(f"{what} {text}: not an IP address") from None
    if addr.is_unspecified or addr.is_multicast or addr.is_loopback or addr == _BROADCAST:
        raise ValueError(f"{what} {text}: not a usable unicast address")
    return addr


_BROADCAST = IPv4Address("255.255.255.255")


def _guest_address(text: str) -> IPv4Interface | IPv6Interface:
    """``ADDR[/PREFIX]``; without a prefix IPv4 takes its class's, IPv6 /64."""
    addr_text, sep, prefix_text = text.partition("/")
    addr = _unicast(addr_text, "--address")
    if not sep:
        if addr.version == 6:
            prefix = V6_PREFIX_LEN
        else:
            first = int(addr) >> 24
            prefix = 8 if first < 128 else 16 if first < 192 else 24 if first < 224 else 32
    elif prefix_text.isascii() and prefix_text.isdigit() and int(prefix_text) <= addr.max_prefixlen:
        prefix = int(prefix_text)
    else:
        raise ValueError(f"--address {text}: prefix must be 0..{addr.max_prefixlen}")
    iface = ip_interface((addr, prefix))
    if (
        addr.version == 4
        and prefix < 31
        and addr
        in (
            iface.network.network_address,
            iface.network.broadcast_address,
        )
    ):
        raise ValueError(f"--address {text}: that is the subnet's network or broadcast address")
    return iface


# ----------------------------------------------------------------------------
# command line


def add_user_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the user-mode stack's options (everything but ``--mtu``)."""
    g = parser.add_argument_group("user-mode network (--backend user)")
    g.add_argument(
        "--address",
        action="append",
        default=[],
        metavar="ADDR/PREFIX",
        help="the guest's address (once per family; default: the host's)",
    )
    g.add_argument(
        "--gateway",
        action="append",
        default=[],
        metavar="ADDR",
        help="the gateway trionet answers as (once per family; default: the host's)",
    )
    g.add_argument(
        "--dns",
        action="append",
        default=[],
        metavar="ADDR",
        help="DNS server to advertise (repeatable; 'none': none; default: gateway)",
    )
    g.add_argument(
        "--dns-upstream",
        action="append",
        default=[],
        metavar="ADDR[:PORT]",
        help="where queries to an advertised DNS address go ([IPv6]:PORT; "
        "default: the nameservers of /etc/resolv.conf)",
    )
    g.add_argument("--mac", metavar="MAC", help="the guest's MAC (default: learned)")
    g.add_argument(
        "--map-host-loopback",
        action="append",
        default=[],
        metavar="ADDR",
        help="address that reaches the host's loopback (once per family; "
        "'none': none; default: the gateway)",
    )
    g.add_argument(
        "--no-map-gw", action="store_true", help="do not map the gateway to the host's loopback"
    )
    family = g.add_mutually_exclusive_group()
    family.add_argument("-4", "--ipv4-only", action="store_true", help="IPv4 only")
    family.add_argument("-6", "--ipv6-only", action="store_true", help="IPv6 only")
    g.add_argument(
        "-u",
        "--udp-ports",
        action="append",
        default=[],
        metavar="SPEC",
        help="forward host UDP ports to the guest (passt syntax, e.g. "
        "127.0.0.1/5000-5010:6000-6010,~5005)",
    )
    g.add_argument(
        "-t",
        "--tcp-ports",
        action="append",
        default=[],
        metavar="SPEC",
        help="forward host TCP ports to the guest (same syntax)",
    )
    g.add_argument(
        "--udp-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="idle timeout of a UDP flow (default 30)",
    )
    g.add_argument(
        "--udp-stream-timeout",
        type=float,
        default=180.0,
        metavar="SECONDS",
        help="idle timeout of a UDP flow once both sides spoke (default 180)",
    )


def options_from_args(args: argparse.Namespace, mtu: int) -> UserOptions:
    """The ``UserOptions`` in parsed arguments; raises ``UserConfigError``."""
    try:
        return _options(args, mtu)
    except ValueError as exc:
        raise UserConfigError(str(exc)) from None


def _options(args: argparse.Namespace, mtu: int) -> UserOptions:
    addresses = [_guest_address(a) for a in args.address]
    gateways = [_unicast(a, "--gateway") for a in args.gateway]
    mapped = [_unicast(a, "--map-host-loopback") for a in args.map_host_loopback if a != "none"]
    dns4: tuple[IPv4Address, ...] | None = None
    dns6: tuple[IPv6Address, ...] | None = None
    if args.dns:
        if "none" in args.dns and len(args.dns) > 1:
            raise ValueError("--dns none excludes other --dns addresses")
        servers = [] if args.dns == ["none"] else [_dns_address(a) for a in args.dns]
        dns4 = tuple(a for a in servers if isinstance(a, IPv4Address))
        dns6 = tuple(a for a in servers if isinstance(a, IPv6Address))
    upstreams = tuple(parse_dns_upstream(u) for u in args.dns_upstream) or None
    no_map_gw = bool(args.no_map_gw) or "none" in args.map_host_loopback
    forwards: list[Forward] = []
    for proto, specs in (("udp", args.udp_ports), ("tcp", args.tcp_ports)):
        if "none" in specs and len(specs) > 1:
            raise ValueError(f"{proto} forward spec 'none' excludes other specs")
        for spec in specs:
            forwards.extend(parse_forward(spec, proto))
    check_overlaps(forwards)
    return UserOptions(
        address4=_only_one("--address", 4, [a for a in addresses if isinstance(a, IPv4Interface)]),
        address6=_only_one("--address", 6, [a for a in addresses if isinstance(a, IPv6Interface)]),
        gateway4=_only_one("--gateway", 4, [a for a in gateways if isinstance(a, IPv4Address)]),
        gateway6=_only_one("--gateway", 6, [a for a in gateways if isinstance(a, IPv6Address)]),
        dns4=dns4,
        dns6=dns6,
        dns_upstreams=upstreams,
        map_host_loopback4=_only_one(
            "--map-host-loopback", 4, [a for a in mapped if isinstance(a, IPv4Address)]
        ),
        map_host_loopback6=_only_one(
            "--map-host-loopback", 6, [a for a in mapped if isinstance(a, IPv6Address)]
        ),
        no_map_gw=no_map_gw,
        ipv4_only=bool(args.ipv4_only),
        ipv6_only=bool(args.ipv6_only),
        guest_mac=parse_mac(args.mac) if args.mac is not None else None,
        mtu=mtu,
        forwards=tuple(forwards),
        udp_timeout=float(args.udp_timeout),
        udp_stream_timeout=float(args.udp_stream_timeout),
    )


def _dns_address(text: str) -> IPAddress:
    try:
        addr = ip_address(text)
    except ValueError:
        raise ValueError(f"--dns {text}: not an IP address") from None
    if addr.is_unspecified or addr.is_multicast:
        raise ValueError(f"--dns {text}: not a unicast address")
    return addr


def _only_one(option: str, version: int, values: Sequence[_T]) -> _T | None:
    if len(values) > 1:
        raise ValueError(f"{option} given twice for IPv{version}")
    return values[0] if values else None


async def user_config_from_args(
    args: argparse.Namespace,
    mtu: int,
    *,
    host: HostView | None = None,
    resolv_conf: Path | str = RESOLV_CONF,
) -> UserConfig:
    """The ``UserConfig`` for parsed arguments: reads the host (netlink on a
    worker thread, and ``resolv_conf``) unless ``host`` is given.  Raises
    ``UserConfigError`` for anything invalid."""
    opts = options_from_args(args, mtu)
    if host is None:
        host = await read_host_view(resolv_conf)
    return derive_config(host, opts)
