"""Neighbour Discovery responder of the user-mode stack (sans-IO).

``handle_ndp`` answers the two solicitations a guest sends (RFC 4861):

* **Router Solicitation -> Router Advertisement**, from trionet's link-local
  address and MAC: unicast to the soliciting address, or to all-nodes
  (ff02::1) when the guest solicits from ``::``.  The RA sets Managed and
  Other (DHCPv6 works too: ``dhcpv6.py``), a router lifetime of 65535 s
  (RFC 8319) and carries the source link-layer address, the guest's prefix
  (on-link + autonomous, infinite lifetimes, as passt), the MTU, the DNS
  servers (RDNSS) and search list (DNSSL) of RFC 8106.  In local mode (the
  guest was given no address, ``::``) the RA carries no prefix and clears
  Managed.
* **Neighbour Solicitation -> Neighbour Advertisement** with trionet's MAC for
  every target that is not the guest's own address (the gateway and our
  link-local included, as passt: all the guest's traffic goes to the stack),
  with the Router, Solicited and Override flags.  Duplicate address
  detection probes (source ``::``) are not answered -- the guest's addresses,
  link-local ones included, must pass DAD -- except for trionet's own
  addresses, which are defended with an NA to all-nodes.

Solicitations fail RFC 4861 §6.1 / §7.1.1 validation -- and raise ``Drop`` --
when the hop limit is not 255, the code is not 0, the message is short, an
option has length 0 or runs past the end, the NS target is multicast, or a
message from ``::`` carries a source link-layer address (or, for NS, is not
sent to a solicited-node address).

``unsolicited_ra`` is the RA to all-nodes the stack sends when the guest
shows up.  It should be repeated well within the router lifetime (passt
sends one every few minutes), or the guest's default route expires.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from ipaddress import IPv6Address, IPv6Network

from trionet.backends.user import packets as P
from trionet.backends.user.config import UserConfig, V6Config
from trionet.backends.user.dhcp import encode_names

__all__ = [
    "ALL_NODES",
    "NDP_HOP_LIMIT",
    "ROUTER_LIFETIME",
    "handle_ndp",
    "neighbour_advertisement",
    "router_advertisement",
    "unsolicited_ra",
]

ROUTER_SOLICITATION = 133
ROUTER_ADVERTISEMENT = 134
NEIGHBOUR_SOLICITATION = 135
NEIGHBOUR_ADVERTISEMENT = 136

NDP_HOP_LIMIT = 255
ALL_NODES = IPv6Address("ff02::1")
UNSPECIFIED = IPv6Address("::")
ROUTER_LIFETIME = 65535  # seconds, RFC 8319
INFINITE = 0xFFFFFFFF
MIN_MTU6 = 1280

OPT_SOURCE_LL = 1
OPT_TARGET_LL = 2
OPT_PREFIX_INFO = 3
OPT_MTU = 5
OPT_RDNSS = 25
OPT_DNSSL = 31

RA_MANAGED, RA_OTHER = 0x80, 0x40
PREFIX_ON_LINK, PREFIX_AUTONOMOUS = 0x80, 0x40
NA_ROUTER, NA_SOLICITED, NA_OVERRIDE = 0x80, 0x40, 0x20
_MAX_OPTION = 255 * 8  # an option's length is counted in 8-byte units


def handle_ndp(cfg: UserConfig, guest_mac: bytes, pkt: P.Packet) -> bytes | None:
    """The reply frame to one RS or NS from the guest, or ``None``.

    ``guest_mac`` is where unicast replies go when neither a source
    link-layer option nor the frame's source MAC is a usable unicast address.
    """
    if pkt.version != 6 or pkt.proto != P.IPPROTO_ICMPV6:
        raise P.Drop("ndp_not_icmpv6")
    kind = pkt.sport
    if kind not in (ROUTER_SOLICITATION, NEIGHBOUR_SOLICITATION):
        return None
    if pkt.ttl != NDP_HOP_LIMIT:
        raise P.Drop("ndp_hop_limit")
    if pkt.dport != 0:
        raise P.Drop("ndp_code")
    src = pkt.src
    assert isinstance(src, IPv6Address) and isinstance(pkt.dst, IPv6Address)
    if kind == ROUTER_SOLICITATION:
        options = dict(_options(pkt.l4, 8))
    else:
        if len(pkt.l4) < 24:
            raise P.Drop("ndp_short")
        options = dict(_options(pkt.l4, 24))
    source_ll = options.get(OPT_SOURCE_LL)
    if src == UNSPECIFIED and source_ll is not None:
        raise P.Drop("ndp_source_ll")
    if cfg.v6 is None:
        return None
    dst_mac = _unicast(source_ll[:6] if source_ll else b"") or _unicast(pkt.eth_src) or guest_mac
    if kind == ROUTER_SOLICITATION:
        if src == UNSPECIFIED:
            return unsolicited_ra(cfg)
        return router_advertisement(cfg, src, dst_mac)
    target = IPv6Address(pkt.l4[8:24])
    if target.is_multicast or target == UNSPECIFIED:
        raise P.Drop("ndp_target")
    ours = (cfg.v6.gateway, cfg.v6.link_local)
    if src == UNSPECIFIED:  # duplicate address detection
        if pkt.dst != P.solicited_node(target):
            raise P.Drop("ndp_dad_destination")
        if target not in ours:
            return None
        return neighbour_advertisement(cfg, target, ALL_NODES, P.multicast_mac(ALL_NODES), False)
    if target == cfg.v6.address and target not in ours:
        return None  # the guest's own: never claim it
    return neighbour_advertisement(cfg, target, src, dst_mac, True)


def unsolicited_ra(cfg: UserConfig) -> bytes:
    """A Router Advertisement to all-nodes (ff02::1, 33:33:00:00:00:01)."""
    return router_advertisement(cfg, ALL_NODES, P.multicast_mac(ALL_NODES))


def router_advertisement(cfg: UserConfig, dst: IPv6Address, dst_mac: bytes) -> bytes:
    """The whole RA frame for ``dst``, from our link-local address and MAC."""
    v6 = _v6(cfg)
    assigned = v6.address != UNSPECIFIED
    flags = RA_OTHER | (RA_MANAGED if assigned else 0)
    # cur hop limit 0: unspecified, the guest keeps its default; reachable and
    # retransmission timers 0: unspecified too
    rest = struct.pack("!BBHII", 0, flags, ROUTER_LIFETIME, 0, 0)
    rest += _option(OPT_SOURCE_LL, cfg.our_mac)
    if assigned:
        net = IPv6Network(f"{v6.address}/{v6.prefix_len}", strict=False)
        rest += _option(
            OPT_PREFIX_INFO,
            struct.pack(
                "!BBIII16s", net.prefixlen, PREFIX_ON_LINK | PREFIX_AUTONOMOUS, INFINITE,
                INFINITE, 0, net.network_address.packed,
            ),
        )  # fmt: skip
    if cfg.mtu >= MIN_MTU6:
        rest += _option(OPT_MTU, struct.pack("!HI", 0, min(cfg.mtu, INFINITE)))
    if v6.dns:
        servers = b"".join(a.packed for a in v6.dns[:127])
        rest += _option(OPT_RDNSS, struct.pack("!HI", 0, INFINITE) + servers)
    names = encode_names(cfg.search, _MAX_OPTION - 8)
    if names:
        rest += _option(OPT_DNSSL, struct.pack("!HI", 0, INFINITE) + names)
    return P.icmp_frame(
        dst_mac, cfg.our_mac, v6.link_local, dst, ROUTER_ADVERTISEMENT, 0, rest, NDP_HOP_LIMIT
    )


def neighbour_advertisement(
    cfg: UserConfig, target: IPv6Address, dst: IPv6Address, dst_mac: bytes, solicited: bool
) -> bytes:
    """The whole NA frame saying ``target`` is at our MAC (Router and
    Override set; Solicited when answering an NS from a unicast address)."""
    flags = NA_ROUTER | NA_OVERRIDE | (NA_SOLICITED if solicited else 0)
    rest = struct.pack("!B3x16s", flags, target.packed) + _option(OPT_TARGET_LL, cfg.our_mac)
    return P.icmp_frame(
        dst_mac, cfg.our_mac, _v6(cfg).link_local, dst, NEIGHBOUR_ADVERTISEMENT, 0, rest,
        NDP_HOP_LIMIT,
    )  # fmt: skip


# ---- helpers ---------------------------------------------------------------------


def _options(message: bytes, offset: int) -> Iterator[tuple[int, bytes]]:
    """The (type, body) options of an ICMPv6 ND ``message`` from ``offset``;
    a short message or a malformed option raises ``Drop``."""
    if len(message) < offset:
        raise P.Drop("ndp_short")
    i = offset
    while i < len(message):
        if i + 2 > len(message):
            raise P.Drop("ndp_option")
        kind, units = message[i], message[i + 1]
        if units == 0 or i + units * 8 > len(message):
            raise P.Drop("ndp_option")
        yield kind, message[i + 2 : i + units * 8]
        i += units * 8


def _option(kind: int, body: bytes) -> bytes:
    """One ND option: type, length in 8-byte units, ``body`` zero-padded."""
    size = -(-(len(body) + 2) // 8) * 8
    return bytes([kind, size // 8]) + body + bytes(size - 2 - len(body))


def _unicast(mac: bytes) -> bytes | None:
    if len(mac) != 6 or mac[0] & 1 or mac == bytes(6):
        return None
    return mac


def _v6(cfg: UserConfig) -> V6Config:
    if cfg.v6 is None:
        raise ValueError("no IPv6 configuration")
    return cfg.v6
