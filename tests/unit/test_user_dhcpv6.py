"""The DHCPv6 server: exchanges as ISC dhclient and systemd-networkd send
them (with and without Rapid Commit), CONFIRM on- and off-link,
INFORMATION-REQUEST, RELEASE / DECLINE, the IA corner cases, and malformed
input that only ever drops."""

from __future__ import annotations

import logging
import struct
from dataclasses import replace
from ipaddress import IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.dhcp6 import (
    DHCP6,
    DUID_EN,
    DUID_LL,
    DUID_LLT,
    DHCP6_Advertise,
    DHCP6_Confirm,
    DHCP6_Decline,
    DHCP6_InfoRequest,
    DHCP6_Rebind,
    DHCP6_Release,
    DHCP6_Renew,
    DHCP6_Reply,
    DHCP6_Request,
    DHCP6_Solicit,
    DHCP6OptClientId,
    DHCP6OptDNSDomains,
    DHCP6OptDNSServers,
    DHCP6OptElapsedTime,
    DHCP6OptIA_NA,
    DHCP6OptIA_PD,
    DHCP6OptIA_TA,
    DHCP6OptIAAddress,
    DHCP6OptOptReq,
    DHCP6OptPref,
    DHCP6OptRapidCommit,
    DHCP6OptServerId,
    DHCP6OptStatusCode,
)
from scapy.layers.inet import UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import NoPayload, Packet, Raw

from tests.unit.user_frames import (
    DNS6,
    G_MAC,
    GUEST6,
    GUEST_LL,
    GUEST_MAC,
    GW6,
    O_MAC,
    OUR_LL,
    OUR_MAC,
    SEARCH,
    checked,
    config,
    fuzz_one,
    parse,
)
from trionet.backends.user import packets as P
from trionet.backends.user.dhcpv6 import Status, handle_dhcpv6, server_duid

CFG = config()
CLIENT_DUID = DUID_LLT(lladdr=G_MAC, timeval=700000000)
NETWORKD_DUID = DUID_EN(enterprisenum=43793, id=bytes(range(8)))
SERVER_DUID = DUID_LL(lladdr=O_MAC)
XID = 0xABCDEF
IAID = 0x0C0FFEE0


def dhcpv6(msg: Packet, *, src: str = str(GUEST_LL), dst: str = "ff02::1:2") -> Ether:
    eth_dst = P.multicast_mac(IPv6Address(dst)).hex(":") if dst.startswith("ff") else O_MAC
    return Ether(src=G_MAC, dst=eth_dst) / IPv6(src=src, dst=dst) / UDP(sport=546, dport=547) / msg


def dhclient(kind: type[Packet], *, server: bool = False, address: str | None = None) -> Ether:
    """A message as ISC dhclient -6 builds it."""
    ia = DHCP6OptIA_NA(iaid=IAID, T1=0, T2=0)
    if address is not None:
        ia.ianaopts = [DHCP6OptIAAddress(addr=address, preflft=7200, validlft=7500)]
    msg = kind(trid=XID) / DHCP6OptClientId(duid=CLIENT_DUID)
    if server:
        msg /= DHCP6OptServerId(duid=SERVER_DUID)
    return dhcpv6(msg / DHCP6OptElapsedTime() / ia / DHCP6OptOptReq(reqopts=[23, 24]))


def options(reply: Ether) -> list[Packet]:
    """The top-level options of a reply message."""
    out = []
    layer = message(reply).payload
    while not isinstance(layer, NoPayload) and not isinstance(layer, Raw):
        out.append(layer)
        layer = layer.payload
    return out


def message(reply: Ether) -> Packet:
    """The DHCPv6 message of a reply frame (a ``DHCP6`` subclass)."""
    msg = reply[UDP].payload
    assert isinstance(msg, DHCP6)
    return msg


def top(reply: Ether, cls: type[Packet]) -> Packet | None:
    return next((o for o in options(reply) if type(o) is cls), None)


def answer(pkt: Ether, cfg: object = CFG) -> Ether:
    reply = checked(handle_dhcpv6(cfg, GUEST_MAC, parse(pkt)))  # type: ignore[arg-type]
    assert (reply.src, reply.dst) == (O_MAC, G_MAC)
    assert (reply[IPv6].src, reply[IPv6].dst) == (str(OUR_LL), str(GUEST_LL))
    assert (reply[UDP].sport, reply[UDP].dport) == (547, 546)
    assert message(reply).trid == XID
    assert bytes(reply[DHCP6OptServerId].duid) == bytes(SERVER_DUID)
    return reply


def assert_binding(reply: Ether, address: IPv6Address = GUEST6) -> None:
    ia = top(reply, DHCP6OptIA_NA)
    assert ia is not None and (ia.iaid, ia.T1, ia.T2) == (IAID, 1800, 2880)
    addr = ia.ianaopts[0]
    assert isinstance(addr, DHCP6OptIAAddress)
    assert (addr.addr, addr.preflft, addr.validlft) == (str(address), 3600, 3600)


def assert_dns(reply: Ether) -> None:
    assert reply[DHCP6OptDNSServers].dnsservers == [str(GW6), str(DNS6)]
    assert [d.rstrip(".") for d in reply[DHCP6OptDNSDomains].dnsdomains] == list(SEARCH)


def test_dhclient_exchange() -> None:
    adv = answer(dhclient(DHCP6_Solicit))
    assert isinstance(message(adv), DHCP6_Advertise)
    assert bytes(top(adv, DHCP6OptClientId).duid) == bytes(CLIENT_DUID)  # type: ignore[union-attr]
    assert adv[DHCP6OptPref].prefval == 255
    assert_binding(adv)
    assert_dns(adv)

    for kind, server in ((DHCP6_Request, True), (DHCP6_Renew, True), (DHCP6_Rebind, False)):
        reply = answer(dhclient(kind, server=server, address=str(GUEST6)))
        assert isinstance(message(reply), DHCP6_Reply)
        assert_binding(reply)
        assert_dns(reply)
        assert len(top(reply, DHCP6OptIA_NA).ianaopts) == 1  # type: ignore[union-attr]


def test_networkd_rapid_commit_gets_a_reply() -> None:
    msg = (
        DHCP6_Solicit(trid=XID) / DHCP6OptClientId(duid=NETWORKD_DUID) / DHCP6OptRapidCommit()
        / DHCP6OptIA_NA(iaid=IAID) / DHCP6OptOptReq(reqopts=[23, 24, 56])
    )  # fmt: skip
    reply = answer(dhcpv6(msg))
    assert isinstance(message(reply), DHCP6_Reply)
    assert top(reply, DHCP6OptRapidCommit) is not None
    assert_binding(reply)


def test_server_duid_is_duid_ll_of_our_mac() -> None:
    assert server_duid(OUR_MAC) == bytes(SERVER_DUID)


def test_unicast_request_is_answered_alike() -> None:
    msg = dhclient(DHCP6_Request, server=True, address=str(GUEST6))[UDP].payload
    assert_binding(answer(dhcpv6(msg, dst=str(OUR_LL))))


def test_renewing_an_old_address_expires_it() -> None:
    reply = answer(dhclient(DHCP6_Renew, server=True, address="fd00:2::99"))
    addrs = {(a.addr, a.preflft, a.validlft) for a in top(reply, DHCP6OptIA_NA).ianaopts}  # type: ignore[union-attr]
    assert addrs == {(str(GUEST6), 3600, 3600), ("fd00:2::99", 0, 0)}


def test_request_for_another_server_is_ignored() -> None:
    msg = DHCP6_Request(trid=XID) / DHCP6OptClientId(duid=CLIENT_DUID)
    msg /= DHCP6OptServerId(duid=DUID_LL(lladdr="02:00:00:00:00:01")) / DHCP6OptIA_NA(iaid=IAID)
    assert handle_dhcpv6(CFG, GUEST_MAC, parse(dhcpv6(msg))) is None


def test_more_ias_than_addresses() -> None:
    msg = (
        DHCP6_Solicit(trid=XID) / DHCP6OptClientId(duid=CLIENT_DUID) / DHCP6OptIA_NA(iaid=IAID)
        / DHCP6OptIA_NA(iaid=2) / DHCP6OptIA_TA(iaid=3) / DHCP6OptIA_PD(iaid=4)
    )  # fmt: skip
    reply = answer(dhcpv6(msg))
    assert_binding(reply)
    ias = [
        o for o in options(reply) if isinstance(o, DHCP6OptIA_NA | DHCP6OptIA_TA | DHCP6OptIA_PD)
    ]
    assert [ia.iaid for ia in ias] == [IAID, 2, 3, 4]
    inner = [ias[1].ianaopts, ias[2].iataopts, ias[3].iapdopt]
    got = [o[0].statuscode for o in inner]
    assert got == [Status.NO_ADDRS_AVAIL, Status.NO_ADDRS_AVAIL, Status.NO_PREFIX_AVAIL]


def test_local_mode_offers_no_address_and_no_rapid_commit() -> None:
    cfg = config(v6=replace(CFG.v6, address=IPv6Address("::")))  # type: ignore[type-var]
    msg = dhclient(DHCP6_Solicit)[UDP].payload
    reply = answer(dhcpv6(msg / DHCP6OptRapidCommit()), cfg)
    assert isinstance(message(reply), DHCP6_Advertise)
    ia = top(reply, DHCP6OptIA_NA)
    assert ia is not None and ia.ianaopts[0].statuscode == Status.NO_ADDRS_AVAIL
    assert_dns(reply)


@pytest.mark.parametrize(
    ("addresses", "status"),
    [
        ([str(GUEST6)], Status.SUCCESS),
        (["fd00:2::1234"], Status.SUCCESS),  # on the link's prefix
        ([str(GUEST6), "2001:db8::5"], Status.NOT_ON_LINK),
        (["2001:db8::5"], Status.NOT_ON_LINK),
    ],
)
def test_confirm(addresses: list[str], status: int) -> None:
    ia = DHCP6OptIA_NA(iaid=IAID, ianaopts=[DHCP6OptIAAddress(addr=a) for a in addresses])
    msg = DHCP6_Confirm(trid=XID) / DHCP6OptClientId(duid=CLIENT_DUID) / ia
    reply = answer(dhcpv6(msg))
    assert isinstance(message(reply), DHCP6_Reply)
    assert top(reply, DHCP6OptStatusCode).statuscode == status  # type: ignore[union-attr]
    assert top(reply, DHCP6OptIA_NA) is None


def test_confirm_without_addresses_is_not_answered() -> None:
    msg = DHCP6_Confirm(trid=XID) / DHCP6OptClientId(duid=CLIENT_DUID) / DHCP6OptIA_NA(iaid=IAID)
    assert handle_dhcpv6(CFG, GUEST_MAC, parse(dhcpv6(msg))) is None


@pytest.mark.parametrize("with_client_id", [True, False])
def test_information_request(with_client_id: bool) -> None:
    msg = DHCP6_InfoRequest(trid=XID) / DHCP6OptElapsedTime()
    if with_client_id:
        msg /= DHCP6OptClientId(duid=CLIENT_DUID)
    reply = answer(dhcpv6(msg / DHCP6OptOptReq(reqopts=[23, 24])))
    assert isinstance(message(reply), DHCP6_Reply)
    assert_dns(reply)
    assert top(reply, DHCP6OptIA_NA) is None
    assert (top(reply, DHCP6OptClientId) is not None) == with_client_id


def test_no_dns_and_no_search_leave_their_options_out() -> None:
    cfg = config(v6=replace(CFG.v6, dns=()), search=())  # type: ignore[type-var]
    reply = answer(dhclient(DHCP6_Solicit), cfg)
    assert DHCP6OptDNSServers not in reply and DHCP6OptDNSDomains not in reply


def test_release_is_acknowledged() -> None:
    reply = answer(dhclient(DHCP6_Release, server=True, address=str(GUEST6)))
    assert top(reply, DHCP6OptStatusCode).statuscode == Status.SUCCESS  # type: ignore[union-attr]


def test_decline_is_acknowledged_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "trionet.backends.user.dhcpv6"):
        reply = answer(dhclient(DHCP6_Decline, server=True, address=str(GUEST6)))
    assert top(reply, DHCP6OptStatusCode).statuscode == Status.SUCCESS  # type: ignore[union-attr]
    assert str(GUEST6) in caplog.text


def test_without_ipv6_nothing_is_answered() -> None:
    assert handle_dhcpv6(config(v6=None), GUEST_MAC, parse(dhclient(DHCP6_Solicit))) is None


# ---- malformed input -------------------------------------------------------------


def raw(payload: bytes, src: str = str(GUEST_LL)) -> Ether:
    return dhcpv6(Raw(payload), src=src)


def opt(code: int, value: bytes) -> bytes:
    return struct.pack("!HH", code, len(value)) + value


CLIENT = opt(1, bytes(CLIENT_DUID))
SERVER = opt(2, bytes(SERVER_DUID))


@pytest.mark.parametrize(
    ("pkt", "reason"),
    [
        (raw(b"\x01\x00\x00"), "dhcpv6_short"),
        (raw(b"\x01\x00\x00\x01" + CLIENT + b"\x00\x03\x00"), "dhcpv6_option"),
        (raw(b"\x01\x00\x00\x01" + CLIENT + b"\x00\x03\x00\x10" + bytes(8)), "dhcpv6_option"),
        (dhcpv6(DHCP6_Solicit(trid=1) / DHCP6OptIA_NA()), "dhcpv6_client_id"),
        (raw(b"\x01\x00\x00\x01" + opt(1, b"")), "dhcpv6_client_id"),
        (raw(b"\x01\x00\x00\x01" + opt(1, bytes(131))), "dhcpv6_client_id"),
        (dhclient(DHCP6_Solicit, server=True), "dhcpv6_server_id"),
        (dhclient(DHCP6_Rebind, server=True), "dhcpv6_server_id"),
        (dhclient(DHCP6_Request), "dhcpv6_server_id"),
        (dhclient(DHCP6_Release), "dhcpv6_server_id"),
        (dhcpv6(DHCP6_Advertise(trid=1) / DHCP6OptClientId(duid=CLIENT_DUID)), "dhcpv6_type"),
        (raw(b"\x0c" + bytes(33)), "dhcpv6_type"),  # relay-forward
        (raw(b"\x01\x00\x00\x01" + CLIENT + opt(3, bytes(11))), "dhcpv6_ia"),
        (raw(b"\x01\x00\x00\x01" + CLIENT + opt(4, bytes(3))), "dhcpv6_ia"),
        (
            raw(b"\x01\x00\x00\x01" + CLIENT + opt(3, bytes(12) + opt(5, bytes(23)))),
            "dhcpv6_iaaddr",
        ),
        (raw(b"\x01\x00\x00\x01" + CLIENT + opt(3, bytes(12) + b"\x00\x05")), "dhcpv6_option"),
        (raw(b"\x0b\x00\x00\x01" + opt(3, bytes(12))), "dhcpv6_ia"),  # IA in information-request
        (
            dhcpv6(DHCP6_Solicit(trid=1) / DHCP6OptClientId(duid=CLIENT_DUID), src="::"),
            "dhcpv6_source",
        ),
    ],
)
def test_malformed_messages_drop(pkt: Ether, reason: str) -> None:
    with pytest.raises(P.Drop) as exc:
        handle_dhcpv6(CFG, GUEST_MAC, parse(pkt))
    assert exc.value.reason == reason


@settings(max_examples=400, deadline=None)
@given(kind=st.integers(0, 255), tail=st.binary(max_size=300))
def test_random_messages_only_drop(kind: int, tail: bytes) -> None:
    handler = lambda p: handle_dhcpv6(CFG, GUEST_MAC, p)  # noqa: E731
    fuzz_one(handler, bytes(raw(bytes([kind]) + tail)))
    fuzz_one(handler, bytes(raw(bytes([kind, 0, 0, 1]) + CLIENT + tail)))
    fuzz_one(handler, bytes(raw(bytes([kind, 0, 0, 1]) + CLIENT + SERVER + tail)))


@settings(max_examples=400, deadline=None)
@given(
    kind=st.sampled_from([1, 3, 4, 5, 6, 8, 9, 11]),
    ia=st.sampled_from([3, 4, 25]),
    body=st.binary(max_size=120),
)
def test_random_ia_contents_only_drop(kind: int, ia: int, body: bytes) -> None:
    handler = lambda p: handle_dhcpv6(CFG, GUEST_MAC, p)  # noqa: E731
    msg = bytes([kind, 0, 0, 1]) + CLIENT + (SERVER if kind in (3, 5, 8, 9) else b"")
    fuzz_one(handler, bytes(raw(msg + opt(ia, body))))
    fuzz_one(handler, bytes(raw(msg + opt(ia, bytes(12) + opt(5, body)))))
