"""The DHCP server: exchanges as busybox udhcpc, ISC dhclient and
systemd-networkd send them, option contents, NAKs, where replies go, lease
state, and malformed input that only ever drops."""

from __future__ import annotations

import logging
import struct
from ipaddress import IPv4Address
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from tests.unit.user_frames import (
    DNS4,
    G_MAC,
    GUEST4,
    GUEST_MAC,
    GW4,
    O_MAC,
    SEARCH,
    checked,
    config,
    dns_names,
    fuzz_one,
    parse,
)
from trionet.backends.user import packets as P
from trionet.backends.user.config import V4Config
from trionet.backends.user.dhcp import (
    DhcpServer,
    Lease,
    LeaseState,
    encode_name,
    encode_names,
)

BCAST = "ff:ff:ff:ff:ff:ff"
UDHCPC: list[Any] = [
    ("client_id", b"\x01" + GUEST_MAC),
    ("max_dhcp_size", 576),
    ("param_req_list", [1, 3, 6, 12, 15, 28, 42, 119, 121]),
    ("vendor_class_id", b"udhcp 1.36.1"),
]
DHCLIENT: list[Any] = [
    ("hostname", b"guest"),
    ("param_req_list", [1, 28, 2, 3, 15, 6, 119, 12, 44, 47, 26, 121, 42]),
]
NETWORKD: list[Any] = [
    ("max_dhcp_size", 1472),
    ("client_id", b"\xff\x00\x00\x00\x01\x00\x04" + bytes(range(16))),
    ("param_req_list", [1, 3, 6, 12, 15, 26, 42, 119, 121, 108]),
]
CLIENTS: dict[str, list[Any]] = {"udhcpc": UDHCPC, "dhclient": DHCLIENT, "networkd": NETWORKD}


def dhcp(
    kind: str, extra: list[Any] = (), *, ciaddr: str = "0.0.0.0", flags: int = 0,  # type: ignore[assignment]
    src: str = "0.0.0.0", dst: str = "255.255.255.255", eth_dst: str = BCAST, xid: int = 0x1234ABCD,
    chaddr: bytes = GUEST_MAC,
) -> Ether:  # fmt: skip
    """A client message, the way the clients above build it."""
    return (
        Ether(src=G_MAC, dst=eth_dst) / IP(src=src, dst=dst) / UDP(sport=68, dport=67)
        / BOOTP(chaddr=chaddr, xid=xid, ciaddr=ciaddr, flags=flags)
        / DHCP(options=[("message-type", kind), *extra, "end"])
    )  # fmt: skip


def options(reply: Ether) -> dict[Any, Any]:
    return {
        o[0]: o[1] if len(o) == 2 else o[1:] for o in reply[DHCP].options if isinstance(o, tuple)
    }


def codes(reply: Ether) -> list[Any]:
    return [o[0] for o in reply[DHCP].options if isinstance(o, tuple)]


def answer(server: DhcpServer, frame: Ether) -> Ether:
    return checked(server.handle(parse(frame)))


def assert_broadcast(reply: Ether) -> None:
    assert reply.dst == BCAST and reply[IP].dst == "255.255.255.255"
    assert reply.src == O_MAC and reply[IP].src == str(GW4)
    assert (reply[UDP].sport, reply[UDP].dport) == (67, 68)


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_discover_request_exchange(client: str) -> None:
    server = DhcpServer(config())
    extra = CLIENTS[client]
    offer = answer(server, dhcp("discover", extra))
    assert_broadcast(offer)
    boot = offer[BOOTP]
    assert (boot.op, boot.xid, boot.yiaddr, boot.ciaddr) == (2, 0x1234ABCD, str(GUEST4), "0.0.0.0")
    assert boot.chaddr == GUEST_MAC + bytes(10)
    assert (boot.htype, boot.hlen, boot.hops, boot.giaddr) == (1, 6, 0, "0.0.0.0")
    assert len(offer[BOOTP]) >= 300
    opts = options(offer)
    assert codes(offer)[:2] == ["message-type", "server_id"]
    assert opts["message-type"] == 2
    assert opts["server_id"] == str(GW4)
    assert opts["subnet_mask"] == "255.255.255.0"
    assert opts["router"] == str(GW4)
    assert opts["name_server"] == (str(GW4), str(DNS4))
    assert opts["domain"] == b"example.com"
    assert opts["interface-mtu"] == 65520
    assert (opts["lease_time"], opts["renewal_time"], opts["rebinding_time"]) == (3600, 1800, 3150)
    assert dns_names(opts[119]) == list(SEARCH)
    assert "classless_static_routes" not in opts  # the gateway is on the subnet
    assert server.lease(GUEST_MAC) == Lease(GUEST4, LeaseState.OFFERED)
    if client != "dhclient":
        assert opts["client_id"] == dict(extra)["client_id"]  # RFC 6842

    request = dhcp("request", [("requested_addr", str(GUEST4)), ("server_id", str(GW4)), *extra])
    ack = answer(server, request)
    assert_broadcast(ack)
    assert options(ack)["message-type"] == 5
    assert ack[BOOTP].yiaddr == str(GUEST4) and ack[BOOTP].xid == 0x1234ABCD
    assert options(ack)["interface-mtu"] == 65520
    assert server.lease(GUEST_MAC) == Lease(GUEST4, LeaseState.BOUND)


def test_options_follow_the_parameter_request_list() -> None:
    offer = answer(DhcpServer(config()), dhcp("discover", DHCLIENT))
    # 53, 54 first; then 1, 3, 15, 6, 119, 26 in the client's order; the rest after
    assert codes(offer)[:8] == [
        "message-type", "server_id", "subnet_mask", "router", "domain", "name_server", 119,
        "interface-mtu",
    ]  # fmt: skip
    assert set(codes(offer)[8:]) == {"lease_time", "renewal_time", "rebinding_time"}


def test_broadcast_flag_is_honoured() -> None:
    offer = answer(DhcpServer(config()), dhcp("discover", UDHCPC, flags=0x8000))
    assert_broadcast(offer)
    assert offer[BOOTP].flags == 0x8000


def test_renewal_is_unicast_to_ciaddr() -> None:
    server = DhcpServer(config())
    renew = dhcp(
        "request", UDHCPC, ciaddr=str(GUEST4), src=str(GUEST4), dst=str(GW4), eth_dst=O_MAC
    )
    ack = answer(server, renew)
    assert ack.dst == G_MAC and ack[IP].dst == str(GUEST4)
    assert ack[BOOTP].ciaddr == str(GUEST4) and ack[BOOTP].yiaddr == str(GUEST4)
    assert options(ack)["message-type"] == 5
    assert server.lease(GUEST_MAC) == Lease(GUEST4, LeaseState.BOUND)


def test_rebinding_broadcast_request_with_ciaddr_is_unicast_too() -> None:
    ack = answer(
        DhcpServer(config()), dhcp("request", DHCLIENT, ciaddr=str(GUEST4), src=str(GUEST4))
    )
    assert ack.dst == G_MAC and ack[IP].dst == str(GUEST4)


def test_init_reboot_with_our_address_is_acked() -> None:
    ack = answer(
        DhcpServer(config()), dhcp("request", [("requested_addr", str(GUEST4)), *DHCLIENT])
    )
    assert options(ack)["message-type"] == 5


@pytest.mark.parametrize(
    "extra",
    [
        [("requested_addr", "10.0.2.99"), ("server_id", str(GW4))],  # selecting, wrong address
        [("requested_addr", "192.168.1.50")],  # init-reboot after moving networks
        [("server_id", str(GW4))],  # selecting without any address
    ],
)
def test_request_for_another_address_is_nakked(extra: list[Any]) -> None:
    server = DhcpServer(config())
    answer(server, dhcp("discover", UDHCPC))
    nak = answer(server, dhcp("request", [*extra, *UDHCPC]))
    assert_broadcast(nak)
    opts = options(nak)
    assert opts["message-type"] == 6
    assert opts["server_id"] == str(GW4)
    assert "lease_time" not in opts and "router" not in opts
    assert nak[BOOTP].yiaddr == "0.0.0.0" and nak[BOOTP].ciaddr == "0.0.0.0"
    assert server.lease(GUEST_MAC) is None


def test_renewal_of_a_foreign_address_is_nakked_by_broadcast() -> None:
    frame = dhcp("request", UDHCPC, ciaddr="192.168.1.50", src="192.168.1.50", eth_dst=O_MAC)
    nak = answer(DhcpServer(config()), frame)
    assert_broadcast(nak)
    assert options(nak)["message-type"] == 6


def test_request_for_another_servers_offer_is_ignored() -> None:
    server = DhcpServer(config())
    answer(server, dhcp("discover", UDHCPC))
    other = dhcp("request", [("requested_addr", "10.0.2.77"), ("server_id", "10.0.2.1")])
    assert server.handle(parse(other)) is None
    assert server.lease(GUEST_MAC) is None  # our offer is withdrawn


def test_rapid_commit_discover_is_acked() -> None:
    server = DhcpServer(config())
    ack = answer(server, dhcp("discover", [("rapid_commit", b""), *NETWORKD]))
    opts = options(ack)
    assert opts["message-type"] == 5 and "rapid_commit" in opts
    assert ack[BOOTP].yiaddr == str(GUEST4)
    assert server.lease(GUEST_MAC) == Lease(GUEST4, LeaseState.BOUND)


def test_inform_gets_configuration_without_an_address() -> None:
    inform = dhcp("inform", DHCLIENT, ciaddr=str(GUEST4), src=str(GUEST4), eth_dst=O_MAC)
    ack = answer(DhcpServer(config()), inform)
    assert ack.dst == G_MAC and ack[IP].dst == str(GUEST4)
    assert ack[BOOTP].yiaddr == "0.0.0.0" and ack[BOOTP].ciaddr == str(GUEST4)
    opts = options(ack)
    assert opts["message-type"] == 5 and opts["router"] == str(GW4)
    assert opts["server_id"] == str(GW4)
    assert not {"lease_time", "renewal_time", "rebinding_time"} & set(opts)


def test_release_forgets_the_client() -> None:
    server = DhcpServer(config())
    answer(server, dhcp("discover", UDHCPC))
    answer(server, dhcp("request", [("requested_addr", str(GUEST4)), ("server_id", str(GW4))]))
    release = dhcp("release", [("server_id", str(GW4))], ciaddr=str(GUEST4), src=str(GUEST4))
    assert server.handle(parse(release)) is None
    assert server.lease(GUEST_MAC) is None


def test_decline_is_logged_and_forgets_the_client(caplog: pytest.LogCaptureFixture) -> None:
    server = DhcpServer(config())
    answer(server, dhcp("discover", UDHCPC))
    decline = dhcp("decline", [("requested_addr", str(GUEST4)), ("server_id", str(GW4))])
    with caplog.at_level(logging.WARNING, "trionet.backends.user.dhcp"):
        assert server.handle(parse(decline)) is None
    assert "declined 10.0.2.15" in caplog.text
    assert server.lease(GUEST_MAC) is None


def test_gateway_off_the_subnet_gets_a_classless_route() -> None:
    v4 = V4Config(GUEST4, 24, IPv4Address("192.0.2.1"), None, (DNS4,))
    offer = answer(DhcpServer(config(v4=v4)), dhcp("discover", UDHCPC))
    routes = options(offer)["classless_static_routes"]
    assert routes == ["192.0.2.1/32:0.0.0.0", "0.0.0.0/0:192.0.2.1"]
    assert options(offer)["router"] == "192.0.2.1"


def test_no_dns_and_no_search_leave_their_options_out() -> None:
    v4 = V4Config(GUEST4, 24, GW4, GW4, ())
    offer = answer(DhcpServer(config(v4=v4, search=())), dhcp("discover", UDHCPC))
    assert not {"name_server", "domain", 119} & set(options(offer))


def test_lease_time_and_mtu_follow_the_config() -> None:
    offer = answer(DhcpServer(config(lease_time=86400, mtu=1500)), dhcp("discover", UDHCPC))
    opts = options(offer)
    assert (opts["lease_time"], opts["renewal_time"], opts["rebinding_time"]) == (
        86400,
        43200,
        75600,
    )
    assert opts["interface-mtu"] == 1500


def test_long_search_list_is_cut_to_the_clients_size() -> None:
    search = tuple(f"sub{i:02d}.department.example.org" for i in range(20))  # 29 bytes each
    server = DhcpServer(config(search=search))
    small = answer(server, dhcp("discover", UDHCPC))  # max size 576
    assert len(small[IP]) <= 576
    names = dns_names(options(small)[119])
    assert 0 < len(names) < len(search) and names == list(search[: len(names)])
    big = answer(server, dhcp("discover", NETWORKD))  # max size 1472: the option's 255 bytes
    assert dns_names(options(big)[119]) == list(search[:8])


def test_dhcp_without_ipv4_is_not_answered() -> None:
    assert DhcpServer(config(v4=None)).handle(parse(dhcp("discover", UDHCPC))) is None


def test_lease_table_is_bounded() -> None:
    server = DhcpServer(config(), max_clients=4)
    for i in range(10):
        mac = bytes([2, 0, 0, 0, 0, i])
        answer(server, dhcp("discover", chaddr=mac))
    assert len(server.leases) == 4
    assert bytes([2, 0, 0, 0, 0, 9]) in server.leases


def test_checked_notices_a_bad_checksum() -> None:
    frame = bytearray(DhcpServer(config()).handle(parse(dhcp("discover", UDHCPC))) or b"")
    frame[14 + 20 + 6] ^= 0x01  # the UDP checksum
    with pytest.raises((AssertionError, P.Drop)):
        checked(bytes(frame))


# ---- malformed input -------------------------------------------------------------


def raw_dhcp(payload: bytes) -> bytes:
    frame = Ether(src=G_MAC, dst=BCAST) / IP(src="0.0.0.0", dst="255.255.255.255")
    return bytes(frame / UDP(sport=68, dport=67) / Raw(payload))


def bootp_head(op: int = 1, hlen: int = 6) -> bytes:
    """The fixed BOOTP fields and the magic cookie, no options."""
    return bytes(BOOTP(op=op, hlen=hlen, chaddr=GUEST_MAC, xid=1) / DHCP(options=[]))


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "dhcp_short"),
        (bytes(BOOTP(chaddr=GUEST_MAC))[:200], "dhcp_short"),
        (bootp_head(op=2) + bytes(DHCP(options=[("message-type", "discover"), "end"])), "dhcp_op"),
        (bootp_head(hlen=17) + bytes(DHCP(options=[("message-type", "discover")])), "dhcp_hlen"),
        (bootp_head()[:236] + b"\x00\x00\x00\x00" + b"\x35\x01\x01\xff", "dhcp_magic"),
        (bootp_head() + b"\xff", "dhcp_bootp"),
        (bootp_head() + b"\x35\x01\x01\x32\x08\x0a", "dhcp_option"),  # truncated option
        (bootp_head() + b"\x35\x01\x01\x32", "dhcp_option"),  # no length byte
        (bootp_head() + b"\x35\x02\x01\x01\xff", "dhcp_option"),  # message type of 2 bytes
        (bootp_head() + b"\x35\x01\x03\x32\x03\x0a\x00\x02\xff", "dhcp_option"),  # short address
        (bootp_head() + bytes(DHCP(options=[("message-type", "offer"), "end"])), "dhcp_type"),
        (bootp_head() + bytes(DHCP(options=[("message-type", "request"), "end"])), "dhcp_request"),
    ],
)
def test_malformed_messages_drop(payload: bytes, reason: str) -> None:
    with pytest.raises(P.Drop) as exc:
        DhcpServer(config()).handle(P.parse(raw_dhcp(payload)))
    assert exc.value.reason == reason


def test_missing_end_option_is_tolerated() -> None:
    payload = bootp_head() + bytes(DHCP(options=[("message-type", "discover")]))
    offer = checked(DhcpServer(config()).handle(P.parse(raw_dhcp(payload))))
    assert options(offer)["message-type"] == 2


@settings(max_examples=400, deadline=None)
@given(tail=st.binary(max_size=400))
def test_random_options_only_drop(tail: bytes) -> None:
    server = DhcpServer(config())
    fuzz_one(server.handle, raw_dhcp(bootp_head() + tail))
    fuzz_one(server.handle, raw_dhcp(bootp_head() + b"\x35\x01" + tail))


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=600), kind=st.integers(0, 255))
def test_random_payloads_only_drop(payload: bytes, kind: int) -> None:
    server = DhcpServer(config())
    fuzz_one(server.handle, raw_dhcp(payload))
    head = struct.pack("!BB", 53, 1) + bytes([kind])
    fuzz_one(server.handle, raw_dhcp(bootp_head() + head + payload[:300]))


def test_name_encoding() -> None:
    assert encode_name("example.com.") == b"\x07example\x03com\x00"
    assert encode_name("") is None and encode_name(".") is None
    assert encode_name("a..b") is None and encode_name("x" * 64 + ".com") is None
    assert encode_name("exämple.com") is None
    assert encode_name(".".join(["abcdefghi"] * 30)) is None  # over 255 bytes
    assert encode_names(["a.b", "", "c.d"], limit=10) == b"\x01a\x01b\x00\x01c\x01d\x00"
    assert encode_names(["a.b", "c.d"], limit=9) == b"\x01a\x01b\x00"
