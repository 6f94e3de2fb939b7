"""Shared by the responder tests (ARP, DHCP, NDP, DHCPv6): the addressing
they run with, checksum checks of reply frames done by scapy, and the
dispatch of a scapy-built guest frame through ``packets.parse``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from ipaddress import IPv4Address, IPv6Address

from scapy.layers.dns import dns_get_str
from scapy.layers.l2 import Ether
from scapy.packet import Packet as ScapyPacket

from trionet.backends.user import packets as P
from trionet.backends.user.config import UserConfig, V4Config, V6Config

GUEST_MAC = bytes.fromhex("525400123456")
OUR_MAC = bytes.fromhex("9a559a559a55")
G_MAC, O_MAC = GUEST_MAC.hex(":"), OUR_MAC.hex(":")
GUEST4, GW4, DNS4 = IPv4Address("10.0.2.15"), IPv4Address("10.0.2.2"), IPv4Address("10.0.2.3")
GUEST6, GW6 = IPv6Address("fd00:2::15"), IPv6Address("fd00:2::2")
OUR_LL, GUEST_LL = IPv6Address("fe80::1"), IPv6Address("fe80::5054:ff:fe12:3456")
DNS6 = IPv6Address("fd00:2::3")
SEARCH = ("example.com", "corp.example.net")


def config(**kw: object) -> UserConfig:
    """10.0.2.15/24 and fd00:2::15/64 behind 10.0.2.2 / fd00:2::2, MTU 65520."""
    cfg = UserConfig(
        v4=V4Config(GUEST4, 24, GW4, GW4, (GW4, DNS4)),
        v6=V6Config(GUEST6, 64, GW6, OUR_LL, GW6, (GW6, DNS6)),
        guest_mac=None,
        our_mac=OUR_MAC,
        mtu=65520,
        search=SEARCH,
        lease_time=3600,
    )
    return replace(cfg, **kw)  # type: ignore[arg-type]


def parse(frame: ScapyPacket | bytes) -> P.Packet:
    """A guest frame (built with scapy) as the stack sees it."""
    return P.parse(bytes(frame))


def checked(frame: bytes | None) -> Ether:
    """``frame`` parsed by scapy, after checking that it exists, is at least
    60 bytes, that trionet's own parser takes it and that every checksum in
    it (IP, UDP, ICMPv6; ARP has none) equals the one scapy computes afresh."""
    assert frame is not None
    assert len(frame) >= P.ETH_ZLEN
    P.parse(frame)  # lengths and checksums, as the guest's stack would check them
    got = Ether(frame)
    fresh: ScapyPacket = got.copy()
    layer = fresh
    names = []
    while layer:
        for name in ("chksum", "cksum"):
            if name in layer.fields:
                del layer.fields[name]
                names.append((type(layer), name))
        layer = layer.payload
    fresh = Ether(bytes(fresh))
    assert names or got.type == P.ETH_P_ARP, "no checksum in an IP reply"
    for cls, name in names:
        assert getattr(got[cls], name) == getattr(fresh[cls], name), (cls.__name__, name)
    return got


Handler = Callable[[P.Packet], bytes | None]


def fuzz_one(handler: Handler, frame: bytes) -> None:
    """``frame`` through ``packets.parse`` into ``handler``: it may raise
    ``Drop`` or return a checked reply or nothing -- never raise anything else."""
    try:
        pkt = P.parse(frame)
    except P.Drop:
        return
    try:
        reply = handler(pkt)
    except P.Drop:
        return
    if reply is not None:
        checked(reply)


def dns_names(data: bytes) -> list[str]:
    """Uncompressed RFC 1035 names one after the other, decoded by scapy."""
    names = []
    rest = data
    while rest:
        name, rest = dns_get_str(rest, full=data)[:2]  # type: ignore[no-untyped-call]
        names.append(name.decode().rstrip("."))
    return names
