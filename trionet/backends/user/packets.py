"""Frames of the user-mode stack: parse what the guest sends, build what it gets.

Sans-IO and allocation-light.  ``parse`` turns one Ethernet frame (no
virtio-net header) into a ``Packet``: the link, network and transport fields
the stack dispatches on, with every length and checksum checked.  Anything
malformed, or that the stack does not take (IP options, fragments, IPv6
extension headers, oversize frames), raises ``Drop`` with a short reason that
ends up as a counter in ``trionet status``.

The builders produce whole frames with correct checksums, padded to the
60-byte Ethernet minimum.  Addresses are ``ipaddress`` objects at the API and
packed bytes on the wire.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from trionet.native import ffi, lib

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58

ETH_HLEN = 14
ETH_ZLEN = 60  # minimum frame, without FCS
BROADCAST = b"\xff" * 6
MAX_FRAME = 65535 + ETH_HLEN

IPAddress = IPv4Address | IPv6Address


class Drop(Exception):
    """A frame the stack does not take; ``reason`` names the counter."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Packet:
    """One parsed frame.

    ``version`` is 4 or 6 for IP, 0 for ARP.  For ARP, ``src``/``dst`` are the
    sender and target protocol addresses, ``proto`` is the ARP opcode and
    ``payload`` holds the whole ARP body.  For UDP/TCP, ``sport``/``dport`` are
    the ports and ``payload`` the transport payload; for ICMP/ICMPv6,
    ``sport`` is the type, ``dport`` the code and ``payload`` the message
    after its 4-byte header.  ``l4`` is the whole transport segment.
    """

    eth_dst: bytes
    eth_src: bytes
    ethertype: int
    version: int
    src: IPAddress
    dst: IPAddress
    proto: int
    ttl: int
    sport: int
    dport: int
    l4: bytes
    payload: bytes

    @property
    def is_multicast_dst(self) -> bool:
        return bool(self.eth_dst[0] & 1)


# ---- checksums -------------------------------------------------------------------


def checksum(data: bytes, initial: int = 0) -> int:
    """Internet checksum (RFC 1071) of ``data``, folded, complemented."""
    be = int(lib.tn_sum16(ffi.from_buffer("uint8_t[]", data), len(data)))
    total = initial + ((be & 0xFF) << 8 | be >> 8)  # native (little-endian) order
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    # the sum above is over native-endian words: swap to network order
    value = ~total & 0xFFFF
    return int.from_bytes(value.to_bytes(2, "little"), "big")


def pseudo_sum(src: IPAddress, dst: IPAddress, proto: int, length: int) -> int:
    """Unfolded native-endian sum of the pseudo-header, for ``checksum(initial=)``."""
    if src.version == 4:
        head = src.packed + dst.packed + struct.pack("!BBH", 0, proto, length)
    else:
        head = src.packed + dst.packed + struct.pack("!IxxxB", length, proto)
    return sum(memoryview(head).cast("H"))


def l4_checksum(src: IPAddress, dst: IPAddress, proto: int, segment: bytes) -> int:
    """Checksum of a transport segment whose checksum field is zero."""
    return checksum(segment, pseudo_sum(src, dst, proto, len(segment)))


# ---- parsing ---------------------------------------------------------------------


def parse(frame: bytes, *, csum_trusted: bool = False) -> Packet:
    """Parse one frame from the guest.  ``csum_trusted``: the virtio-net header
    said NEEDS_CSUM or the checksum was offloaded, so transport checksums are
    not verified (the IPv4 header checksum always is)."""
    if len(frame) < ETH_HLEN:
        raise Drop("short_frame")
    if len(frame) > MAX_FRAME:
        raise Drop("oversize")
    dst, src = frame[0:6], frame[6:12]
    (ethertype,) = struct.unpack_from("!H", frame, 12)
    body = frame[ETH_HLEN:]
    if ethertype == ETH_P_ARP:
        return _parse_arp(dst, src, body)
    if ethertype == ETH_P_IP:
        return _parse_ipv4(dst, src, body, csum_trusted)
    if ethertype == ETH_P_IPV6:
        return _parse_ipv6(dst, src, body, csum_trusted)
    raise Drop("ethertype")


def _parse_arp(dst: bytes, src: bytes, body: bytes) -> Packet:
    if len(body) < 28:
        raise Drop("short_arp")
    htype, ptype, hlen, plen, op = struct.unpack_from("!HHBBH", body)
    if (htype, ptype, hlen, plen) != (1, ETH_P_IP, 6, 4):
        raise Drop("arp_format")
    spa, tpa = IPv4Address(body[14:18]), IPv4Address(body[24:28])
    return Packet(dst, src, ETH_P_ARP, 0, spa, tpa, op, 0, 0, 0, body[:28], body[:28])


def _parse_ipv4(dst: bytes, src: bytes, body: bytes, trusted: bool) -> Packet:
    if len(body) < 20:
        raise Drop("short_ip")
    vihl, _tos, total, _ident, frag, ttl, proto, _csum = struct.unpack_from("!BBHHHBBH", body)
    if vihl >> 4 != 4:
        raise Drop("ip_version")
    if vihl & 0xF != 5:
        raise Drop("ip_options")
    if total < 20 or total > len(body):
        raise Drop("ip_length")
    if frag & 0x3FFF:  # MF or a fragment offset
        raise Drop("ip_fragment")
    if checksum(body[:20]) != 0:
        raise Drop("ip_checksum")
    s, d = IPv4Address(body[12:16]), IPv4Address(body[16:20])
    seg = body[20:total]
    return _transport(dst, src, ETH_P_IP, 4, s, d, proto, ttl, seg, trusted)


def _parse_ipv6(dst: bytes, src: bytes, body: bytes, trusted: bool) -> Packet:
    if len(body) < 40:
        raise Drop("short_ip")
    if body[0] >> 4 != 6:
        raise Drop("ip_version")
    plen, nh, hlim = struct.unpack_from("!HBB", body, 4)
    if 40 + plen > len(body):
        raise Drop("ip_length")
    if nh not in (IPPROTO_UDP, IPPROTO_TCP, IPPROTO_ICMPV6):
        raise Drop("ipv6_next_header")
    s, d = IPv6Address(body[8:24]), IPv6Address(body[24:40])
    seg = body[40 : 40 + plen]
    return _transport(dst, src, ETH_P_IPV6, 6, s, d, nh, hlim, seg, trusted)


def _transport(
    edst: bytes,
    esrc: bytes,
    ethertype: int,
    version: int,
    s: IPAddress,
    d: IPAddress,
    proto: int,
    ttl: int,
    seg: bytes,
    trusted: bool,
) -> Packet:
    if proto == IPPROTO_UDP:
        if len(seg) < 8:
            raise Drop("short_udp")
        sport, dport, ulen, csum = struct.unpack_from("!HHHH", seg)
        if ulen < 8 or ulen > len(seg):
            raise Drop("udp_length")
        seg = seg[:ulen]
        if version == 6 and csum == 0 and not trusted:
            raise Drop("udp_checksum")
        if csum and not trusted and l4_checksum(s, d, proto, seg) != 0:
            raise Drop("udp_checksum")
        return Packet(edst, esrc, ethertype, version, s, d, proto, ttl, sport, dport, seg, seg[8:])
    if proto == IPPROTO_TCP:
        if len(seg) < 20:
            raise Drop("short_tcp")
        sport, dport = struct.unpack_from("!HH", seg)
        off = (seg[12] >> 4) * 4
        if off < 20 or off > len(seg):
            raise Drop("tcp_header")
        if not trusted and l4_checksum(s, d, proto, seg) != 0:
            raise Drop("tcp_checksum")
        return Packet(
            edst, esrc, ethertype, version, s, d, proto, ttl, sport, dport, seg, seg[off:]
        )
    if proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
        if (proto == IPPROTO_ICMP) != (version == 4):
            raise Drop("icmp_family")
        if len(seg) < 8:
            raise Drop("short_icmp")
        if proto == IPPROTO_ICMP:
            bad = checksum(seg) != 0
        else:
            bad = not trusted and l4_checksum(s, d, proto, seg) != 0
        if bad:
            raise Drop("icmp_checksum")
        icmp_type, code = seg[0], seg[1]
        return Packet(
            edst, esrc, ethertype, version, s, d, proto, ttl, icmp_type, code, seg, seg[4:]
        )
    raise Drop("ip_protocol")


# ---- building --------------------------------------------------------------------


def ethernet(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    frame = dst + src + struct.pack("!H", ethertype) + payload
    if len(frame) < ETH_ZLEN:
        frame += bytes(ETH_ZLEN - len(frame))
    return frame


def ipv4(
    src: IPv4Address, dst: IPv4Address, proto: int, payload: bytes, ttl: int = 64, ident: int = 0
) -> bytes:
    head = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0x4000, ttl, proto, 0,
        src.packed, dst.packed,
    )  # fmt: skip
    csum = checksum(head)
    return head[:10] + struct.pack("!H", csum) + head[12:] + payload


def ipv6(src: IPv6Address, dst: IPv6Address, nh: int, payload: bytes, hlim: int = 64) -> bytes:
    head = struct.pack("!IHBB16s16s", 6 << 28, len(payload), nh, hlim, src.packed, dst.packed)
    return head + payload


def ip_packet(src: IPAddress, dst: IPAddress, proto: int, segment: bytes, ttl: int = 64) -> bytes:
    """An IPv4 or IPv6 packet, by the addresses' family."""
    if isinstance(src, IPv4Address) and isinstance(dst, IPv4Address):
        return ipv4(src, dst, proto, segment, ttl)
    assert isinstance(src, IPv6Address) and isinstance(dst, IPv6Address)
    return ipv6(src, dst, proto, segment, ttl)


def udp(src: IPAddress, dst: IPAddress, sport: int, dport: int, data: bytes) -> bytes:
    """A UDP segment with its checksum (never 0: 0xffff stands for 0)."""
    seg = struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data
    csum = l4_checksum(src, dst, IPPROTO_UDP, seg) or 0xFFFF
    return seg[:6] + struct.pack("!H", csum) + seg[8:]


def icmpv4(icmp_type: int, code: int, rest: bytes) -> bytes:
    """An ICMP message: ``rest`` is everything after the 4-byte type/code/checksum."""
    msg = struct.pack("!BBH", icmp_type, code, 0) + rest
    return msg[:2] + struct.pack("!H", checksum(msg)) + msg[4:]


def icmpv6(src: IPv6Address, dst: IPv6Address, icmp_type: int, code: int, rest: bytes) -> bytes:
    msg = struct.pack("!BBH", icmp_type, code, 0) + rest
    csum = l4_checksum(src, dst, IPPROTO_ICMPV6, msg)
    return msg[:2] + struct.pack("!H", csum) + msg[4:]


def ip_frame(
    dst_mac: bytes, src_mac: bytes, src: IPAddress, dst: IPAddress, proto: int, segment: bytes,
    ttl: int = 64,
) -> bytes:  # fmt: skip
    """A whole Ethernet frame carrying ``segment`` (checksum already in it)."""
    ethertype = ETH_P_IP if src.version == 4 else ETH_P_IPV6
    return ethernet(dst_mac, src_mac, ethertype, ip_packet(src, dst, proto, segment, ttl))


def udp_frame(
    dst_mac: bytes, src_mac: bytes, src: IPAddress, dst: IPAddress, sport: int, dport: int,
    data: bytes, ttl: int = 64,
) -> bytes:  # fmt: skip
    return ip_frame(dst_mac, src_mac, src, dst, IPPROTO_UDP, udp(src, dst, sport, dport, data), ttl)


def icmp_frame(
    dst_mac: bytes, src_mac: bytes, src: IPAddress, dst: IPAddress, icmp_type: int, code: int,
    rest: bytes, ttl: int = 64,
) -> bytes:  # fmt: skip
    """An ICMP (v4) or ICMPv6 message in a frame, by the addresses' family."""
    if isinstance(src, IPv4Address):
        msg4 = icmpv4(icmp_type, code, rest)
        return ip_frame(dst_mac, src_mac, src, dst, IPPROTO_ICMP, msg4, ttl)
    assert isinstance(dst, IPv6Address)
    msg = icmpv6(src, dst, icmp_type, code, rest)
    return ip_frame(dst_mac, src_mac, src, dst, IPPROTO_ICMPV6, msg, ttl)


def arp(
    op: int, sender_mac: bytes, sender_ip: IPv4Address, target_mac: bytes, target_ip: IPv4Address
) -> bytes:
    """An ARP body (Ethernet/IPv4)."""
    return struct.pack(
        "!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, op, sender_mac, sender_ip.packed, target_mac,
        target_ip.packed,
    )  # fmt: skip


def udp_template(
    dst_mac: bytes, src_mac: bytes, src: IPAddress, dst: IPAddress, sport: int, dport: int
) -> bytes:
    """Ethernet + IP + UDP headers of a host->guest datagram with zero lengths
    and checksums: the native path fills them per datagram."""
    if isinstance(src, IPv4Address) and isinstance(dst, IPv4Address):
        iph = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 0, 0, 0x4000, 64, IPPROTO_UDP, 0, src.packed, dst.packed
        )
        eth = dst_mac + src_mac + struct.pack("!H", ETH_P_IP)
    else:
        assert isinstance(src, IPv6Address) and isinstance(dst, IPv6Address)
        iph = struct.pack("!IHBB16s16s", 6 << 28, 0, IPPROTO_UDP, 64, src.packed, dst.packed)
        eth = dst_mac + src_mac + struct.pack("!H", ETH_P_IPV6)
    return eth + iph + struct.pack("!HHHH", sport, dport, 0, 0)


def mac_text(mac: bytes) -> str:
    return mac.hex(":")


def solicited_node(addr: IPv6Address) -> IPv6Address:
    """The solicited-node multicast address of ``addr`` (RFC 4291)."""
    return IPv6Address(b"\xff\x02" + bytes(9) + b"\x01\xff" + addr.packed[13:])


def multicast_mac(addr: IPv6Address) -> bytes:
    return b"\x33\x33" + addr.packed[12:]


# ---- TCP -------------------------------------------------------------------------

TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10


def sum16(data: bytes) -> int:
    """Ones'-complement sum of ``data`` as big-endian 16-bit words, folded,
    not complemented (0..0xffff; 0 only for all-zero data), computed natively."""
    return int(lib.tn_sum16(ffi.from_buffer("uint8_t[]", data), len(data)))


def add16(a: int, b: int) -> int:
    """Ones'-complement addition of two folded sums."""
    s = a + b
    return s - 0xFFFF if s > 0xFFFF else s


def tcp(
    src: IPAddress, dst: IPAddress, sport: int, dport: int, seq: int, ack: int, flags: int,
    window: int, data: bytes = b"", options: bytes = b"",
) -> bytes:  # fmt: skip
    """A TCP segment with its checksum; ``options`` must be padded to 4 bytes."""
    off = (20 + len(options)) // 4
    head = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, off << 4, flags, window, 0, 0)
    seg = head + options + data
    csum = l4_checksum(src, dst, IPPROTO_TCP, seg)
    return seg[:16] + struct.pack("!H", csum) + seg[18:]


def tcp_frame(
    dst_mac: bytes, src_mac: bytes, src: IPAddress, dst: IPAddress, sport: int, dport: int,
    seq: int, ack: int, flags: int, window: int, data: bytes = b"", options: bytes = b"",
) -> bytes:  # fmt: skip
    seg = tcp(src, dst, sport, dport, seq, ack, flags, window, data, options)
    return ip_frame(dst_mac, src_mac, src, dst, IPPROTO_TCP, seg)
