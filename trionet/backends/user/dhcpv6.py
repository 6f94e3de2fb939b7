"""DHCPv6 server of the user-mode stack (sans-IO, stateless).

``handle_dhcpv6`` takes a parsed UDP packet the guest sent to port 547
(All_DHCP_Relay_Agents_and_Servers ff02::1:2, or unicast) and returns the
reply frame, if any, from trionet's link-local address, port 547, to the
client's address, port 546 (RFC 8415).

There is one address to give (``UserConfig.v6.address``), so every answer is
computed from the configuration and the message alone:

* SOLICIT -> ADVERTISE (preference 255, so the client need not wait for
  others), or REPLY when the client asked for Rapid Commit and gets an
  address;
* REQUEST, RENEW, REBIND -> REPLY with the bindings: the first IA_NA gets the
  address with preferred = valid lifetime = the lease time and T1/T2 at 0.5
  and 0.8 of it; other addresses a client renews get lifetimes 0 so it drops
  them; further IA_NAs and any IA_TA get NoAddrsAvail, IA_PD NoPrefixAvail
  (in local mode, no address assigned, every IA_NA gets NoAddrsAvail);
* CONFIRM -> REPLY with Success when every address listed is inside the
  guest's prefix, NotOnLink otherwise (no reply when it lists none);
* INFORMATION-REQUEST -> REPLY with the configuration options only;
* RELEASE, DECLINE -> REPLY with Success (a DECLINE is logged).

Every reply carries our server identifier (DUID-LL of ``cfg.our_mac``), the
client identifier echoed, and the DNS servers (23) and domain search list
(24, RFC 1035 names uncompressed) when there are any.  Messages meant for
another server (its identifier) get no answer; malformed ones -- truncated
options, a missing client identifier, a server identifier where RFC 8415
§16 forbids one, a relay or server message type -- raise ``Drop``.
"""

from __future__ import annotations

import enum
import logging
import struct
from dataclasses import dataclass
from ipaddress import IPv6Address, IPv6Network

from trionet.backends.user import packets as P
from trionet.backends.user.config import UserConfig, V6Config
from trionet.backends.user.dhcp import encode_names

__all__ = [
    "ALL_DHCP_SERVERS",
    "DHCPV6_CLIENT_PORT",
    "DHCPV6_SERVER_PORT",
    "Dhcpv6Message",
    "MessageType",
    "Status",
    "handle_dhcpv6",
    "parse_dhcpv6",
    "server_duid",
]

log = logging.getLogger(__name__)

DHCPV6_CLIENT_PORT = 546
DHCPV6_SERVER_PORT = 547
ALL_DHCP_SERVERS = IPv6Address("ff02::1:2")
UNSPECIFIED = IPv6Address("::")
INFINITE = 0xFFFFFFFF
MAX_DUID = 130  # type + up to 128 bytes (RFC 8415 §11.1)
DUID_LL, HWTYPE_ETHERNET = 3, 1

OPT_CLIENTID, OPT_SERVERID, OPT_IA_NA, OPT_IA_TA, OPT_IAADDR = 1, 2, 3, 4, 5
OPT_PREFERENCE, OPT_STATUS_CODE, OPT_RAPID_COMMIT = 7, 13, 14
OPT_DNS_SERVERS, OPT_DOMAIN_LIST, OPT_IA_PD = 23, 24, 25
IA_OPTIONS = (OPT_IA_NA, OPT_IA_TA, OPT_IA_PD)
RELAY_TYPES = (12, 13)  # RELAY-FORW, RELAY-REPL


class MessageType(enum.IntEnum):
    SOLICIT = 1
    ADVERTISE = 2
    REQUEST = 3
    CONFIRM = 4
    RENEW = 5
    REBIND = 6
    REPLY = 7
    RELEASE = 8
    DECLINE = 9
    INFORMATION_REQUEST = 11


class Status(enum.IntEnum):
    SUCCESS = 0
    UNSPEC_FAIL = 1
    NO_ADDRS_AVAIL = 2
    NO_BINDING = 3
    NOT_ON_LINK = 4
    USE_MULTICAST = 5
    NO_PREFIX_AVAIL = 6


# client message -> (client id required, server id: "required" | "forbidden" | "optional")
_RULES: dict[int, tuple[bool, str]] = {
    MessageType.SOLICIT: (True, "forbidden"),
    MessageType.REQUEST: (True, "required"),
    MessageType.CONFIRM: (True, "forbidden"),
    MessageType.RENEW: (True, "required"),
    MessageType.REBIND: (True, "forbidden"),
    MessageType.RELEASE: (True, "required"),
    MessageType.DECLINE: (True, "required"),
    MessageType.INFORMATION_REQUEST: (False, "optional"),
}


@dataclass(frozen=True, slots=True)
class Dhcpv6Message:
    """A client message: its type, transaction id and top-level options."""

    type: int
    xid: int
    options: tuple[tuple[int, bytes], ...]

    def first(self, code: int) -> bytes | None:
        return next((body for c, body in self.options if c == code), None)

    def has(self, code: int) -> bool:
        return any(c == code for c, _ in self.options)


def parse_dhcpv6(data: bytes) -> Dhcpv6Message:
    """Parse a client/server message; ``Drop`` when it is malformed."""
    if len(data) < 4:
        raise P.Drop("dhcpv6_short")
    if data[0] in RELAY_TYPES:
        raise P.Drop("dhcpv6_type")  # relay messages: another layout, never from a client
    (head,) = struct.unpack_from("!I", data)
    return Dhcpv6Message(head >> 24, head & 0xFFFFFF, _parse_options(data[4:]))


def _parse_options(data: bytes) -> tuple[tuple[int, bytes], ...]:
    out: list[tuple[int, bytes]] = []
    i = 0
    while i < len(data):
        if i + 4 > len(data):
            raise P.Drop("dhcpv6_option")
        code, size = struct.unpack_from("!HH", data, i)
        if i + 4 + size > len(data):
            raise P.Drop("dhcpv6_option")
        out.append((code, data[i + 4 : i + 4 + size]))
        i += 4 + size
    return tuple(out)


def server_duid(mac: bytes) -> bytes:
    """Our DUID-LL (RFC 8415 §11.4) from the gateway's MAC."""
    return struct.pack("!HH", DUID_LL, HWTYPE_ETHERNET) + mac


def handle_dhcpv6(cfg: UserConfig, guest_mac: bytes, pkt: P.Packet) -> bytes | None:
    """The reply frame to one DHCPv6 message from the guest, or ``None``.

    ``guest_mac`` is where the reply goes when the frame's source MAC is not
    a unicast address.
    """
    if pkt.version != 6 or pkt.proto != P.IPPROTO_UDP:
        raise P.Drop("dhcpv6_not_udp6")
    if pkt.src == UNSPECIFIED or pkt.src.is_multicast:
        raise P.Drop("dhcpv6_source")
    if cfg.v6 is None:
        return None
    msg = parse_dhcpv6(pkt.payload)
    rule = _RULES.get(msg.type)
    if rule is None:
        raise P.Drop("dhcpv6_type")
    client_id, server_id = msg.first(OPT_CLIENTID), msg.first(OPT_SERVERID)
    needs_client, server_rule = rule
    if client_id is not None and not 2 <= len(client_id) <= MAX_DUID:
        raise P.Drop("dhcpv6_client_id")
    if needs_client and client_id is None:
        raise P.Drop("dhcpv6_client_id")
    if server_rule == "forbidden" and server_id is not None:
        raise P.Drop("dhcpv6_server_id")
    if server_rule == "required" and server_id is None:
        raise P.Drop("dhcpv6_server_id")
    if server_id is not None and server_id != server_duid(cfg.our_mac):
        return None  # for another server
    ias = [_IA.parse(code, body) for code, body in msg.options if code in IA_OPTIONS]
    body = _answer(cfg, cfg.v6, msg, ias)
    if body is None:
        return None
    dst_mac = pkt.eth_src if not pkt.eth_src[0] & 1 else guest_mac
    src, dst = cfg.v6.link_local, pkt.src
    assert isinstance(dst, IPv6Address)
    return P.udp_frame(dst_mac, cfg.our_mac, src, dst, DHCPV6_SERVER_PORT, DHCPV6_CLIENT_PORT, body)


# ---- answers ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _IA:
    """One identity association of a client message, with its addresses."""

    code: int
    iaid: int
    addresses: tuple[IPv6Address, ...]

    @classmethod
    def parse(cls, code: int, body: bytes) -> _IA:
        head = 4 if code == OPT_IA_TA else 12
        if len(body) < head:
            raise P.Drop("dhcpv6_ia")
        (iaid,) = struct.unpack_from("!I", body)
        addresses = []
        for sub, value in _parse_options(body[head:]):
            if sub == OPT_IAADDR and code != OPT_IA_PD:
                if len(value) < 24:
                    raise P.Drop("dhcpv6_iaaddr")
                addresses.append(IPv6Address(value[:16]))
        return cls(code, iaid, tuple(addresses))


def _answer(cfg: UserConfig, v6: V6Config, msg: Dhcpv6Message, ias: list[_IA]) -> bytes | None:
    """The reply message (header and options), or ``None`` for no reply."""
    kind = msg.type
    reply = MessageType.REPLY
    top: list[bytes] = []
    if kind in (MessageType.SOLICIT, MessageType.REQUEST, MessageType.RENEW, MessageType.REBIND):
        assigned, bindings = _bindings(cfg, v6, ias, renewing=kind != MessageType.REQUEST)
        top += bindings
        if kind == MessageType.SOLICIT:
            if assigned and msg.has(OPT_RAPID_COMMIT):
                top.append(_opt(OPT_RAPID_COMMIT, b""))
            else:
                reply = MessageType.ADVERTISE
                top.append(_opt(OPT_PREFERENCE, b"\xff"))
        log.debug("dhcpv6: %s -> %s", MessageType(kind).name, reply.name)
    elif kind == MessageType.CONFIRM:
        listed = [a for ia in ias if ia.code != OPT_IA_PD for a in ia.addresses]
        if not listed:
            return None  # RFC 8415 §18.3.3: nothing to confirm, no reply
        net = IPv6Network(f"{v6.address}/{v6.prefix_len}", strict=False)
        on_link = v6.address != UNSPECIFIED and all(a in net for a in listed)
        if on_link:
            top.append(_status(Status.SUCCESS, "all addresses on link"))
        else:
            top.append(_status(Status.NOT_ON_LINK, "prefix not appropriate for link"))
    elif kind == MessageType.INFORMATION_REQUEST:
        if ias:
            raise P.Drop("dhcpv6_ia")  # RFC 8415 §16.12
    else:  # RELEASE, DECLINE
        if kind == MessageType.DECLINE:
            log.warning(
                "dhcpv6: the guest declined %s: it found it in use",
                ", ".join(str(a) for ia in ias for a in ia.addresses) or "an address",
            )
        top.append(_status(Status.SUCCESS, "released" if kind == MessageType.RELEASE else "ok"))
    return _message(cfg, v6, reply, msg, top)


def _bindings(
    cfg: UserConfig, v6: V6Config, ias: list[_IA], *, renewing: bool
) -> tuple[bool, list[bytes]]:
    """The IA options of a reply, and whether the address went to one of them."""
    lease = max(0, min(cfg.lease_time, INFINITE))
    t1, t2 = (lease // 2, lease * 4 // 5) if lease != INFINITE else (INFINITE, INFINITE)
    assigned = False
    out: list[bytes] = []
    for ia in ias:
        iaid = struct.pack("!I", ia.iaid)
        if ia.code == OPT_IA_PD:
            out.append(_opt(OPT_IA_PD, iaid + bytes(8) + _status(Status.NO_PREFIX_AVAIL, "none")))
        elif ia.code == OPT_IA_NA and not assigned and v6.address != UNSPECIFIED:
            assigned = True
            inner = _opt(OPT_IAADDR, v6.address.packed + struct.pack("!II", lease, lease))
            if renewing:  # addresses we no longer lease: lifetimes 0 (RFC 8415 §18.3.4)
                for old in dict.fromkeys(a for a in ia.addresses if a != v6.address):
                    inner += _opt(OPT_IAADDR, old.packed + bytes(8))
            out.append(_opt(OPT_IA_NA, iaid + struct.pack("!II", t1, t2) + inner))
        else:
            no_addrs = _status(Status.NO_ADDRS_AVAIL, "no addresses available")
            head = iaid if ia.code == OPT_IA_TA else iaid + bytes(8)
            out.append(_opt(ia.code, head + no_addrs))
    return assigned, out


def _message(
    cfg: UserConfig, v6: V6Config, kind: int, msg: Dhcpv6Message, top: list[bytes]
) -> bytes:
    body = struct.pack("!I", kind << 24 | msg.xid)
    body += _opt(OPT_SERVERID, server_duid(cfg.our_mac))
    client_id = msg.first(OPT_CLIENTID)
    if client_id is not None:
        body += _opt(OPT_CLIENTID, client_id)
    body += b"".join(top)
    if msg.type in (MessageType.RELEASE, MessageType.DECLINE, MessageType.CONFIRM):
        return body
    if v6.dns:
        body += _opt(OPT_DNS_SERVERS, b"".join(a.packed for a in v6.dns))
    names = encode_names(cfg.search, 1024)
    if names:
        body += _opt(OPT_DOMAIN_LIST, names)
    return body


def _opt(code: int, value: bytes) -> bytes:
    return struct.pack("!HH", code, len(value)) + value


def _status(code: Status, text: str) -> bytes:
    return _opt(OPT_STATUS_CODE, struct.pack("!H", code) + text.encode("utf-8"))
