"""DHCP server of the user-mode stack (sans-IO), and DNS name encoding.

``DhcpServer.handle`` takes a parsed UDP packet the guest sent to port 67 and
returns the reply frame, if any.  There is one address to give (the guest's,
from ``UserConfig.v4``), so the server is authoritative: DISCOVER gets an
OFFER of it (or an ACK with Rapid Commit, RFC 4039, when asked), REQUEST an
ACK -- or a NAK when the client asks for another address -- INFORM an ACK
with the configuration but no address; RELEASE and DECLINE forget the client
(a DECLINE is logged: the guest saw the address in use).  A REQUEST naming
another server's identifier means the client chose that server: it is not
answered (RFC 2131 §4.3.2).

Where replies go (RFC 2131 §4.1): to ``ciaddr`` by unicast when the client
has an address; otherwise broadcast to ff:ff:ff:ff:ff:ff / 255.255.255.255,
whether or not the client set the broadcast flag -- every client takes a
broadcast reply before it has an address, and the link holds only the guest
(QEMU's user network does the same).  NAKs are always broadcast.

Options: message type first, server identifier, then what the client's
parameter request list names in its order, then the rest: subnet mask (1),
router (3), DNS (6), domain name (15, the first search domain), interface
MTU (26), lease time (51), renewal T1 (58) and rebinding T2 (59) times,
domain search (119, RFC 3397, names uncompressed, truncated at a whole name
to fit), a classless static route to the gateway (121, RFC 3442) when the
gateway is off the guest's subnet, and the client identifier echoed (61,
RFC 6842).  Replies respect the client's maximum message size (57; 576 bytes
by default) and are at least 300 bytes long as BOOTP requires.

The lease state (offered / bound) is kept per client hardware address, in
memory, for a bounded number of clients.

``encode_name`` / ``encode_names`` (RFC 1035 §3.1 wire format) serve the
domain search options of DHCP, DHCPv6 and NDP alike.
"""

from __future__ import annotations

import enum
import logging
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from trionet.backends.user import packets as P
from trionet.backends.user.config import UserConfig, V4Config

__all__ = [
    "DHCP_CLIENT_PORT",
    "DHCP_SERVER_PORT",
    "DhcpMessage",
    "DhcpServer",
    "Lease",
    "LeaseState",
    "MessageType",
    "encode_name",
    "encode_names",
    "parse_dhcp",
]

log = logging.getLogger(__name__)

DHCP_SERVER_PORT = 67
DHCP_CLIENT_PORT = 68
MAGIC = 0x63825363
BOOTREQUEST, BOOTREPLY = 1, 2
FLAG_BROADCAST = 0x8000
_FIXED = struct.Struct("!BBBBIHHIIII16s64s128sI")  # BOOTP header + magic cookie: 240 bytes
MIN_BOOTP = 300  # RFC 951: the vendor area is at least 64 bytes
MIN_MAX_SIZE = 576  # RFC 2131: every client takes a 576-byte datagram
MAX_CLIENTS = 256
INFINITE = 0xFFFFFFFF
BROADCAST4 = IPv4Address("255.255.255.255")
ZERO4 = IPv4Address(0)

# option codes
OPT_PAD, OPT_END = 0, 255
OPT_SUBNET_MASK, OPT_ROUTER, OPT_DNS, OPT_DOMAIN_NAME = 1, 3, 6, 15
OPT_MTU, OPT_REQUESTED_IP, OPT_LEASE_TIME, OPT_MESSAGE_TYPE = 26, 50, 51, 53
OPT_SERVER_ID, OPT_PARAMS, OPT_MESSAGE, OPT_MAX_SIZE = 54, 55, 56, 57
OPT_T1, OPT_T2, OPT_CLIENT_ID, OPT_RAPID_COMMIT = 58, 59, 61, 80
OPT_DOMAIN_SEARCH, OPT_CLASSLESS_ROUTES = 119, 121


class MessageType(enum.IntEnum):
    DISCOVER = 1
    OFFER = 2
    REQUEST = 3
    DECLINE = 4
    ACK = 5
    NAK = 6
    RELEASE = 7
    INFORM = 8


class LeaseState(enum.Enum):
    OFFERED = "offered"
    BOUND = "bound"


@dataclass(frozen=True, slots=True)
class Lease:
    address: IPv4Address
    state: LeaseState


# ---- DNS names -------------------------------------------------------------------


def encode_name(name: str) -> bytes | None:
    """``name`` in DNS wire format (RFC 1035 §3.1), or ``None`` when it is not
    a valid ASCII domain name (empty or long labels, over 255 bytes)."""
    name = name.rstrip(".")
    if not name:
        return None
    try:
        labels = [label.encode("ascii") for label in name.split(".")]
    except UnicodeEncodeError:
        return None
    if any(not 0 < len(label) < 64 for label in labels):
        return None
    wire = b"".join(bytes([len(label)]) + label for label in labels) + b"\0"
    return wire if len(wire) <= 255 else None


def encode_names(names: Iterable[str], limit: int = 255) -> bytes:
    """Valid ``names`` encoded one after the other, uncompressed, keeping the
    longest prefix of whole names that fits ``limit`` bytes."""
    out = b""
    for name in names:
        wire = encode_name(name)
        if wire is None:
            continue
        if len(out) + len(wire) > limit:
            break
        out += wire
    return out


# ---- the request -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DhcpMessage:
    """The fields of a client's BOOTREQUEST the server looks at.  Repeated
    options are concatenated (RFC 3396)."""

    htype: int
    hlen: int
    xid: int
    flags: int
    ciaddr: IPv4Address
    giaddr: IPv4Address
    chaddr: bytes  # all 16 bytes, as mirrored in the reply
    options: dict[int, bytes]

    @property
    def client(self) -> bytes:
        """The client hardware address: the lease key."""
        return self.chaddr[: self.hlen]

    @property
    def msg_type(self) -> int:
        return self.options[OPT_MESSAGE_TYPE][0]

    def address_option(self, code: int) -> IPv4Address | None:
        value = self.options.get(code)
        return None if value is None else IPv4Address(value)


def parse_dhcp(data: bytes) -> DhcpMessage:
    """Parse a BOOTREQUEST carrying a DHCP message type; ``Drop`` otherwise."""
    if len(data) < _FIXED.size:
        raise P.Drop("dhcp_short")
    op, htype, hlen, _hops, xid, _secs, flags, ciaddr, _yiaddr, _siaddr, giaddr, chaddr, \
        _sname, _file, magic = _FIXED.unpack_from(data)  # fmt: skip
    if op != BOOTREQUEST:
        raise P.Drop("dhcp_op")
    if hlen > 16:
        raise P.Drop("dhcp_hlen")
    if magic != MAGIC:
        raise P.Drop("dhcp_magic")
    options = _parse_options(data[_FIXED.size :])
    if OPT_MESSAGE_TYPE not in options:
        raise P.Drop("dhcp_bootp")  # plain BOOTP: not served
    for code, size in ((OPT_MESSAGE_TYPE, 1), (OPT_REQUESTED_IP, 4), (OPT_SERVER_ID, 4)):
        if code in options and len(options[code]) != size:
            raise P.Drop("dhcp_option")
    if OPT_MAX_SIZE in options and len(options[OPT_MAX_SIZE]) != 2:
        raise P.Drop("dhcp_option")
    return DhcpMessage(
        htype, hlen, xid, flags, IPv4Address(ciaddr), IPv4Address(giaddr), chaddr, options
    )


def _parse_options(data: bytes) -> dict[int, bytes]:
    options: dict[int, bytes] = {}
    i = 0
    while i < len(data):
        code = data[i]
        if code == OPT_END:
            break
        if code == OPT_PAD:
            i += 1
            continue
        if i + 2 > len(data) or i + 2 + data[i + 1] > len(data):
            raise P.Drop("dhcp_option")
        size = data[i + 1]
        options[code] = options.get(code, b"") + data[i + 2 : i + 2 + size]
        i += 2 + size
    return options


# ---- the server ------------------------------------------------------------------


class DhcpServer:
    """DHCP for the one guest; ``leases`` holds the state per client MAC."""

    def __init__(self, cfg: UserConfig, max_clients: int = MAX_CLIENTS) -> None:
        self.cfg = cfg
        self.max_clients = max_clients
        self.leases: dict[bytes, Lease] = {}

    def handle(self, pkt: P.Packet) -> bytes | None:
        """The reply frame to one DHCP message from the guest, or ``None``."""
        if pkt.version != 4 or pkt.proto != P.IPPROTO_UDP:
            raise P.Drop("dhcp_not_udp4")
        if self.cfg.v4 is None:
            return None
        msg = parse_dhcp(pkt.payload)
        kind = msg.msg_type
        if kind == MessageType.DISCOVER:
            return self._discover(pkt, msg)
        if kind == MessageType.REQUEST:
            return self._request(pkt, msg)
        if kind == MessageType.INFORM:
            return self._inform(pkt, msg)
        if kind in (MessageType.RELEASE, MessageType.DECLINE):
            self._forget(msg, kind)
            return None
        raise P.Drop("dhcp_type")

    def lease(self, client: bytes) -> Lease | None:
        return self.leases.get(client)

    # ---- messages ------------------------------------------------------------------

    def _discover(self, pkt: P.Packet, msg: DhcpMessage) -> bytes:
        v4 = self._v4
        if OPT_RAPID_COMMIT in msg.options:
            self._record(msg, LeaseState.BOUND)
            log.info("dhcp: ack (rapid commit) %s to %s", v4.address, msg.client.hex(":"))
            return self._reply(pkt, msg, MessageType.ACK, v4.address, rapid=True)
        self._record(msg, LeaseState.OFFERED)
        log.debug("dhcp: offer %s to %s", v4.address, msg.client.hex(":"))
        return self._reply(pkt, msg, MessageType.OFFER, v4.address)

    def _request(self, pkt: P.Packet, msg: DhcpMessage) -> bytes | None:
        v4 = self._v4
        server_id = msg.address_option(OPT_SERVER_ID)
        requested = msg.address_option(OPT_REQUESTED_IP)
        if server_id is not None and server_id != v4.gateway:
            # SELECTING, and the client took another server's offer
            if self.leases.get(msg.client, None) == Lease(v4.address, LeaseState.OFFERED):
                del self.leases[msg.client]
            return None
        if requested is None and server_id is None:
            wanted = msg.ciaddr  # RENEWING / REBINDING
            if wanted == ZERO4:
                raise P.Drop("dhcp_request")
        else:
            wanted = requested if requested is not None else msg.ciaddr  # SELECTING / INIT-REBOOT
        if wanted != v4.address:
            log.info("dhcp: nak %s for %s (ours: %s)", msg.client.hex(":"), wanted, v4.address)
            self.leases.pop(msg.client, None)
            return self._reply(pkt, msg, MessageType.NAK, ZERO4)
        self._record(msg, LeaseState.BOUND)
        log.debug("dhcp: ack %s to %s", v4.address, msg.client.hex(":"))
        return self._reply(pkt, msg, MessageType.ACK, v4.address)

    def _inform(self, pkt: P.Packet, msg: DhcpMessage) -> bytes:
        return self._reply(pkt, msg, MessageType.ACK, ZERO4, inform=True)

    def _forget(self, msg: DhcpMessage, kind: int) -> None:
        server_id = msg.address_option(OPT_SERVER_ID)
        if server_id is not None and server_id != self._v4.gateway:
            return
        self.leases.pop(msg.client, None)
        if kind == MessageType.DECLINE:
            log.warning(
                "dhcp: %s declined %s: the guest found it in use",
                msg.client.hex(":"), msg.address_option(OPT_REQUESTED_IP),
            )  # fmt: skip

    def _record(self, msg: DhcpMessage, state: LeaseState) -> None:
        self.leases.pop(msg.client, None)
        while len(self.leases) >= self.max_clients:
            del self.leases[next(iter(self.leases))]  # the oldest client
        self.leases[msg.client] = Lease(self._v4.address, state)

    @property
    def _v4(self) -> V4Config:
        assert self.cfg.v4 is not None
        return self.cfg.v4

    # ---- the reply -----------------------------------------------------------------

    def _reply(
        self, pkt: P.Packet, msg: DhcpMessage, kind: MessageType, yiaddr: IPv4Address,
        *, rapid: bool = False, inform: bool = False,
    ) -> bytes:  # fmt: skip
        v4 = self._v4
        options: dict[int, bytes] = {
            OPT_MESSAGE_TYPE: bytes([kind]),
            OPT_SERVER_ID: v4.gateway.packed,
        }
        if kind == MessageType.NAK:
            options[OPT_MESSAGE] = b"requested address is not on this link"
        else:
            options.update(self._config_options(lease=not inform))
            if rapid:
                options[OPT_RAPID_COMMIT] = b""
        if OPT_CLIENT_ID in msg.options:
            options[OPT_CLIENT_ID] = msg.options[OPT_CLIENT_ID][:255]
        wanted = msg.options.get(OPT_PARAMS, b"")
        body = _encode_options(options, wanted, _option_room(msg), self.cfg.search)
        ciaddr = msg.ciaddr if kind == MessageType.ACK else ZERO4
        head = _FIXED.pack(
            BOOTREPLY, msg.htype, msg.hlen, 0, msg.xid, 0, msg.flags, int(ciaddr),
            int(yiaddr), 0, int(msg.giaddr), msg.chaddr, b"", b"", MAGIC,
        )  # fmt: skip
        data = head + body
        if len(data) < MIN_BOOTP:
            data += bytes(MIN_BOOTP - len(data))
        dst_mac, dst_ip = _destination(pkt, msg, kind)
        return P.udp_frame(
            dst_mac, self.cfg.our_mac, v4.gateway, dst_ip, DHCP_SERVER_PORT, DHCP_CLIENT_PORT, data
        )

    def _config_options(self, *, lease: bool) -> dict[int, bytes]:
        """Options of an OFFER or ACK, minus message type and server id."""
        cfg, v4 = self.cfg, self._v4
        net = IPv4Network(f"{v4.address}/{v4.prefix_len}", strict=False)
        out: dict[int, bytes] = {OPT_SUBNET_MASK: net.netmask.packed}
        if v4.gateway not in net:
            # RFC 3442: the gateway on-link, then the default route through it
            gw = v4.gateway.packed
            out[OPT_CLASSLESS_ROUTES] = bytes([32]) + gw + ZERO4.packed + bytes([0]) + gw
        out[OPT_ROUTER] = v4.gateway.packed
        if v4.dns:
            out[OPT_DNS] = b"".join(a.packed for a in v4.dns[:63])
        domain = encode_name(cfg.search[0]) if cfg.search else None
        if domain is not None:
            out[OPT_DOMAIN_NAME] = cfg.search[0].rstrip(".").encode("ascii")
        out[OPT_MTU] = struct.pack("!H", max(68, min(cfg.mtu, 0xFFFF)))
        if lease:
            seconds = max(0, min(cfg.lease_time, INFINITE))
            t1 = t2 = INFINITE
            if seconds != INFINITE:
                t1, t2 = seconds // 2, seconds * 7 // 8
            out[OPT_LEASE_TIME] = struct.pack("!I", seconds)
            out[OPT_T1] = struct.pack("!I", t1)
            out[OPT_T2] = struct.pack("!I", t2)
        if cfg.search:
            out[OPT_DOMAIN_SEARCH] = b""  # filled to fit by _encode_options
        return out


def _option_room(msg: DhcpMessage) -> int:
    """Bytes available for options before the end option."""
    max_size = MIN_MAX_SIZE
    if OPT_MAX_SIZE in msg.options:
        (asked,) = struct.unpack("!H", msg.options[OPT_MAX_SIZE])
        max_size = max(MIN_MAX_SIZE, asked)
    return max_size - 20 - 8 - _FIXED.size - 1


def _encode_options(
    options: dict[int, bytes], wanted: bytes, room: int, search: tuple[str, ...]
) -> bytes:
    """Options in wire order: message type, server id, the client's parameter
    request list order, the rest.  The domain search list (an empty
    placeholder in ``options``) gets what room the others leave, cut at a
    whole name; any other option that does not fit is left out."""
    order = [OPT_MESSAGE_TYPE, OPT_SERVER_ID]
    order += [c for c in wanted if c in options and c not in order]
    order += [c for c in options if c not in order]
    others = sum(2 + len(v) for c, v in options.items() if c != OPT_DOMAIN_SEARCH)
    out = bytearray()
    for code in order:
        value = options[code]
        if code == OPT_DOMAIN_SEARCH:
            value = encode_names(search, min(255, room - others - 2))
            if not value:
                continue
        if len(out) + 2 + len(value) > room:
            log.debug("dhcp: option %d left out: no room", code)
            continue
        out += bytes([code, len(value)]) + value
    return bytes(out) + bytes([OPT_END])


def _destination(pkt: P.Packet, msg: DhcpMessage, kind: int) -> tuple[bytes, IPv4Address]:
    """RFC 2131 §4.1: unicast to a client that has an address (``ciaddr``),
    broadcast otherwise and for every NAK."""
    if kind != MessageType.NAK and msg.ciaddr != ZERO4 and not pkt.eth_src[0] & 1:
        return pkt.eth_src, msg.ciaddr
    return P.BROADCAST, BROADCAST4
