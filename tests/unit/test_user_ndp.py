"""The NDP responder: RS -> RA with the prefix, MTU, RDNSS and DNSSL; NS ->
NA with our MAC for everything but the guest's own address; DAD probes left
alone; RFC 4861 validation failures and random input only ever drop."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv6Address
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet6 import (
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6ND_RA,
    ICMPv6ND_RS,
    ICMPv6NDOptDNSSL,
    ICMPv6NDOptDstLLAddr,
    ICMPv6NDOptMTU,
    ICMPv6NDOptPrefixInfo,
    ICMPv6NDOptRDNSS,
    ICMPv6NDOptSrcLLAddr,
    ICMPv6Unknown,
    IPv6,
)
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from tests.unit.user_frames import (
    DNS6,
    G_MAC,
    GUEST6,
    GUEST_LL,
    GUEST_MAC,
    GW6,
    O_MAC,
    OUR_LL,
    SEARCH,
    checked,
    config,
    fuzz_one,
    parse,
)
from trionet.backends.user import packets as P
from trionet.backends.user.ndp import handle_ndp, unsolicited_ra

CFG = config()
ALL_ROUTERS, ALL_NODES = "ff02::2", "ff02::1"
INFINITE = 0xFFFFFFFF


def frame(
    src: IPv6Address | str, dst: str, msg: Packet, *, hlim: int = 255, eth_dst: str = ""
) -> Ether:
    eth_dst = eth_dst or P.multicast_mac(IPv6Address(dst)).hex(":")
    return Ether(src=G_MAC, dst=eth_dst) / IPv6(src=str(src), dst=dst, hlim=hlim) / msg


def rs(src: IPv6Address | str = GUEST_LL, **kw: int) -> Ether:
    msg = ICMPv6ND_RS()
    if src != "::":
        msg /= ICMPv6NDOptSrcLLAddr(lladdr=G_MAC)
    return frame(src, ALL_ROUTERS, msg, **kw)  # type: ignore[arg-type]


def ns(
    target: IPv6Address | str, src: IPv6Address | str = GUEST6, *, sll: bool = True, **kw: int
) -> Ether:
    msg = ICMPv6ND_NS(tgt=str(target))
    if sll:
        msg /= ICMPv6NDOptSrcLLAddr(lladdr=G_MAC)
    dst = str(P.solicited_node(IPv6Address(target)))
    return frame(src, dst, msg, **kw)  # type: ignore[arg-type]


def answer(pkt: Ether, cfg: object = CFG) -> Ether:
    return checked(handle_ndp(cfg, GUEST_MAC, parse(pkt)))  # type: ignore[arg-type]


def assert_ra(reply: Ether, dst: str, eth_dst: str) -> Any:
    assert (reply.src, reply.dst) == (O_MAC, eth_dst)
    ip = reply[IPv6]
    assert (ip.src, ip.dst, ip.hlim) == (str(OUR_LL), dst, 255)
    ra = reply[ICMPv6ND_RA]
    assert ra.code == 0 and ra.routerlifetime == 65535
    assert reply[ICMPv6NDOptSrcLLAddr].lladdr == O_MAC
    return ra


# ---- router solicitation ---------------------------------------------------------


def test_rs_gets_a_full_ra_unicast_to_the_solicitor() -> None:
    reply = answer(rs())
    ra = assert_ra(reply, str(GUEST_LL), G_MAC)
    assert (ra.M, ra.O) == (1, 1)
    prefix = reply[ICMPv6NDOptPrefixInfo]
    assert (prefix.prefix, prefix.prefixlen, prefix.L, prefix.A) == ("fd00:2::", 64, 1, 1)
    assert (prefix.validlifetime, prefix.preferredlifetime) == (INFINITE, INFINITE)
    assert reply[ICMPv6NDOptMTU].mtu == 65520
    assert reply[ICMPv6NDOptRDNSS].dns == [str(GW6), str(DNS6)]
    assert reply[ICMPv6NDOptRDNSS].lifetime == INFINITE
    assert [n.rstrip(".") for n in reply[ICMPv6NDOptDNSSL].searchlist] == list(SEARCH)


def test_rs_from_the_unspecified_address_gets_a_multicast_ra() -> None:
    assert_ra(answer(rs("::")), ALL_NODES, "33:33:00:00:00:01")


def test_unsolicited_ra_goes_to_all_nodes() -> None:
    reply = checked(unsolicited_ra(CFG))
    assert_ra(reply, ALL_NODES, "33:33:00:00:00:01")
    assert reply[ICMPv6NDOptPrefixInfo].prefix == "fd00:2::"


def test_rs_without_source_link_layer_option_answers_the_frame_source() -> None:
    pkt = frame(GUEST_LL, ALL_ROUTERS, ICMPv6ND_RS())
    assert_ra(answer(pkt), str(GUEST_LL), G_MAC)


def test_local_mode_ra_has_no_prefix_and_no_managed_flag() -> None:
    v6 = replace(CFG.v6, address=IPv6Address("::"))  # type: ignore[type-var]
    reply = answer(rs(), config(v6=v6))
    ra = assert_ra(reply, str(GUEST_LL), G_MAC)
    assert (ra.M, ra.O) == (0, 1)
    assert ICMPv6NDOptPrefixInfo not in reply


def test_ra_options_left_out_when_there_is_nothing_to_say() -> None:
    v6 = replace(CFG.v6, dns=())  # type: ignore[type-var]
    reply = answer(rs(), config(v6=v6, search=(), mtu=1000))
    for opt in (ICMPv6NDOptRDNSS, ICMPv6NDOptDNSSL, ICMPv6NDOptMTU):
        assert opt not in reply


def test_other_prefix_lengths_are_advertised_as_configured() -> None:
    v6 = replace(CFG.v6, address=IPv6Address("2001:db8:1:2::99"), prefix_len=56)  # type: ignore[type-var]
    prefix = answer(rs(), config(v6=v6))[ICMPv6NDOptPrefixInfo]
    assert (prefix.prefix, prefix.prefixlen) == ("2001:db8:1::", 56)


# ---- neighbour solicitation ------------------------------------------------------


@pytest.mark.parametrize(
    "target", [GW6, OUR_LL, IPv6Address("2001:db8::1"), IPv6Address("fe80::99"), DNS6]
)
@pytest.mark.parametrize("src", [GUEST6, GUEST_LL])
def test_ns_gets_an_na_with_our_mac(target: IPv6Address, src: IPv6Address) -> None:
    reply = answer(ns(target, src))
    assert (reply.src, reply.dst) == (O_MAC, G_MAC)
    ip = reply[IPv6]
    assert (ip.src, ip.dst, ip.hlim) == (str(OUR_LL), str(src), 255)
    na = reply[ICMPv6ND_NA]
    assert (na.R, na.S, na.O, na.tgt) == (1, 1, 1, str(target))
    assert reply[ICMPv6NDOptDstLLAddr].lladdr == O_MAC


def test_unicast_nud_probe_without_source_option_is_answered() -> None:
    pkt = frame(GUEST6, str(GW6), ICMPv6ND_NS(tgt=str(GW6)), eth_dst=O_MAC)
    reply = answer(pkt)
    assert reply.dst == G_MAC and reply[ICMPv6ND_NA].S == 1


def test_ns_for_the_guests_own_address_is_not_answered() -> None:
    assert handle_ndp(CFG, GUEST_MAC, parse(ns(GUEST6, GUEST_LL))) is None


@pytest.mark.parametrize("target", [GUEST6, GUEST_LL, IPv6Address("fd00:2::1234")])
def test_dad_probes_of_guest_addresses_are_left_alone(target: IPv6Address) -> None:
    assert handle_ndp(CFG, GUEST_MAC, parse(ns(target, "::", sll=False))) is None


@pytest.mark.parametrize("target", [GW6, OUR_LL])
def test_dad_probes_of_our_addresses_are_defended(target: IPv6Address) -> None:
    reply = answer(ns(target, "::", sll=False))
    assert reply.dst == "33:33:00:00:00:01" and reply[IPv6].dst == ALL_NODES
    na = reply[ICMPv6ND_NA]
    assert (na.R, na.S, na.O, na.tgt) == (1, 0, 1, str(target))


def test_other_icmpv6_types_are_not_answered() -> None:
    na = frame(GUEST_LL, ALL_NODES, ICMPv6ND_NA(tgt=str(GUEST6)))
    ra = frame(GUEST_LL, ALL_NODES, ICMPv6ND_RA())
    for pkt in (na, ra):
        assert handle_ndp(CFG, GUEST_MAC, parse(pkt)) is None


def test_without_ipv6_nothing_is_answered() -> None:
    cfg = config(v6=None)
    assert handle_ndp(cfg, GUEST_MAC, parse(rs())) is None
    assert handle_ndp(cfg, GUEST_MAC, parse(ns(GW6))) is None


# ---- validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pkt", "reason"),
    [
        (rs(hlim=64), "ndp_hop_limit"),
        (ns(GW6, hlim=1), "ndp_hop_limit"),
        (frame(GUEST_LL, ALL_ROUTERS, ICMPv6ND_RS(code=1)), "ndp_code"),
        (frame(GUEST6, "ff02::1:ff00:2", ICMPv6ND_NS(tgt=str(GW6), code=3)), "ndp_code"),
        (frame(GUEST6, "ff02::1:ff00:1", ICMPv6ND_NS(tgt="ff02::1")), "ndp_target"),
        (frame(GUEST6, "ff02::1:ff00:0", ICMPv6ND_NS(tgt="::")), "ndp_target"),
        (frame(GUEST6, ALL_ROUTERS, ICMPv6Unknown(type=135, msgbody=bytes(4))), "ndp_short"),
        (frame(GUEST_LL, ALL_ROUTERS, ICMPv6ND_RS() / ICMPv6NDOptSrcLLAddr(len=0)), "ndp_option"),
        (frame(GUEST_LL, ALL_ROUTERS, ICMPv6ND_RS() / ICMPv6NDOptSrcLLAddr(len=2)), "ndp_option"),
        (frame(GUEST_LL, ALL_ROUTERS, ICMPv6ND_RS() / Raw(b"\x01")), "ndp_option"),
        (
            frame("::", ALL_ROUTERS, ICMPv6ND_RS() / ICMPv6NDOptSrcLLAddr(lladdr=G_MAC)),
            "ndp_source_ll",
        ),
        (ns(GW6, "::", sll=True), "ndp_source_ll"),
        (frame("::", str(GW6), ICMPv6ND_NS(tgt=str(GW6))), "ndp_dad_destination"),
    ],
)
def test_invalid_solicitations_drop(pkt: Ether, reason: str) -> None:
    with pytest.raises(P.Drop) as exc:
        handle_ndp(CFG, GUEST_MAC, parse(pkt))
    assert exc.value.reason == reason


@settings(max_examples=400, deadline=None)
@given(
    kind=st.sampled_from([133, 135]), tail=st.binary(max_size=120), code=st.sampled_from([0, 0, 1])
)
def test_random_solicitation_bodies_only_drop(kind: int, tail: bytes, code: int) -> None:
    msg = ICMPv6ND_RS(code=code) if kind == 133 else ICMPv6ND_NS(code=code, tgt=str(GW6))
    for src in (GUEST_LL, "::"):
        dst = ALL_ROUTERS if kind == 133 else str(P.solicited_node(GW6))
        fuzz_one(lambda p: handle_ndp(CFG, GUEST_MAC, p), bytes(frame(src, dst, msg / Raw(tail))))


@settings(max_examples=300, deadline=None)
@given(kind=st.integers(128, 255), code=st.integers(0, 255), body=st.binary(max_size=80))
def test_random_icmpv6_only_drops(kind: int, code: int, body: bytes) -> None:
    pkt = frame(GUEST_LL, ALL_ROUTERS, ICMPv6Unknown(type=kind, code=code, msgbody=body))
    fuzz_one(lambda p: handle_ndp(CFG, GUEST_MAC, p), bytes(pkt))
