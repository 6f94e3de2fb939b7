"""The ARP responder: who-has for the gateway and any other address gets our
MAC, unicast to the asker; the guest's own address, announcements and
replies get nothing; random input only ever drops."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from tests.unit.user_frames import G_MAC, GUEST4, GUEST_MAC, GW4, O_MAC, checked, config, parse
from tests.unit.user_frames import fuzz_one as fuzz
from trionet.backends.user import packets as P
from trionet.backends.user.arp import handle_arp

CFG = config()


def who_has(target: str, sender: str = str(GUEST4), *, op: int = 1, dst: str = "ff:ff:ff:ff:ff:ff"):  # type: ignore[no-untyped-def]
    return Ether(src=G_MAC, dst=dst) / ARP(op=op, hwsrc=G_MAC, psrc=sender, pdst=target)


@pytest.mark.parametrize(
    "target", [str(GW4), "10.0.2.3", "10.0.2.200", "192.0.2.7", "8.8.8.8", "169.254.1.1"]
)
def test_request_for_any_other_address_answered_with_our_mac(target: str) -> None:
    reply = checked(handle_arp(CFG, GUEST_MAC, parse(who_has(target))))
    assert reply.dst == G_MAC and reply.src == O_MAC
    arp = reply[ARP]
    assert arp.op == 2
    assert (arp.hwsrc, arp.psrc) == (O_MAC, target)
    assert (arp.hwdst, arp.pdst) == (G_MAC, str(GUEST4))
    assert (arp.hwtype, arp.ptype, arp.hwlen, arp.plen) == (1, 0x0800, 6, 4)


def test_unicast_refresh_is_answered_too() -> None:
    reply = checked(handle_arp(CFG, GUEST_MAC, parse(who_has(str(GW4), dst=O_MAC))))
    assert reply[ARP].psrc == str(GW4)


def test_probe_for_another_address_is_answered_to_the_zero_sender() -> None:
    """RFC 5227 probe (sender 0.0.0.0) for an address in use: the reply says so."""
    reply = checked(handle_arp(CFG, GUEST_MAC, parse(who_has(str(GW4), sender="0.0.0.0"))))
    assert reply.dst == G_MAC
    assert reply[ARP].pdst == "0.0.0.0" and reply[ARP].psrc == str(GW4)


@pytest.mark.parametrize(
    ("target", "sender"),
    [
        (str(GUEST4), "0.0.0.0"),  # the guest's conflict-detection probe for its own address
        (str(GUEST4), str(GUEST4)),  # gratuitous ARP / announcement
        (str(GUEST4), "10.0.2.99"),  # someone asking for the guest's address
        ("10.0.2.77", "10.0.2.77"),  # an announcement of another address
        ("0.0.0.0", str(GUEST4)),
        ("255.255.255.255", str(GUEST4)),
        ("224.0.0.1", str(GUEST4)),
    ],
)
def test_not_answered(target: str, sender: str) -> None:
    assert handle_arp(CFG, GUEST_MAC, parse(who_has(target, sender))) is None


def test_replies_from_the_guest_are_ignored() -> None:
    assert handle_arp(CFG, GUEST_MAC, parse(who_has(str(GW4), op=2))) is None


def test_other_operations_drop() -> None:
    with pytest.raises(P.Drop) as exc:
        handle_arp(CFG, GUEST_MAC, parse(who_has(str(GW4), op=8)))
    assert exc.value.reason == "arp_op"


def test_without_ipv4_nothing_is_answered() -> None:
    assert handle_arp(config(v4=None), GUEST_MAC, parse(who_has(str(GW4)))) is None


def test_multicast_source_mac_falls_back_to_sender_hardware_address() -> None:
    req = Ether(src="01:00:5e:00:00:01", dst="ff:ff:ff:ff:ff:ff") / ARP(
        op=1, hwsrc=G_MAC, psrc=str(GUEST4), pdst=str(GW4)
    )
    reply = checked(handle_arp(CFG, GUEST_MAC, parse(req)))
    assert reply.dst == G_MAC


def test_short_arp_drops_in_the_parser() -> None:
    frame = bytes(Ether(src=G_MAC, dst="ff:ff:ff:ff:ff:ff", type=0x0806) / Raw(b"\x00\x01"))
    with pytest.raises(P.Drop):
        parse(frame[:20])


@settings(max_examples=300, deadline=None)
@given(
    op=st.integers(0, 0xFFFF),
    sender=st.integers(0, 2**32 - 1),
    target=st.integers(0, 2**32 - 1),
    tail=st.binary(max_size=64),
)
def test_random_arp_only_drops(op: int, sender: int, target: int, tail: bytes) -> None:
    req = Ether(src=G_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(
        op=op, hwsrc=G_MAC, psrc=str(IPv4Address(sender)), pdst=str(IPv4Address(target))
    )
    fuzz(lambda p: handle_arp(CFG, GUEST_MAC, p), bytes(req / Raw(tail)))


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=80))
def test_random_bytes_after_the_ethernet_header_only_drop(body: bytes) -> None:
    frame = Ether(src=G_MAC, dst="ff:ff:ff:ff:ff:ff", type=0x0806) / Raw(body)
    fuzz(lambda p: handle_arp(CFG, GUEST_MAC, p), bytes(frame))
