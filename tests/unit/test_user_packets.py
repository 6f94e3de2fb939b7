"""The user stack's frame parser and builders, against scapy and random bytes."""

from __future__ import annotations

import contextlib
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from tests.fakes.userguest import GUEST4, GUEST6, GW4, GW6, make_config
from trionet.backends.user import packets as P
from trionet.backends.user.stack import UserStack

MAC_A, MAC_B = "52:54:00:12:34:56", "9a:55:9a:55:9a:55"
MAC_A_BYTES, MAC_B_BYTES = bytes.fromhex("525400123456"), bytes.fromhex("9a559a559a55")


@given(st.binary(max_size=200))
@settings(max_examples=400, deadline=None)
def test_random_bytes_only_ever_drop(data: bytes) -> None:
    try:
        P.parse(data)
    except P.Drop as drop:
        assert drop.reason


@given(st.binary(max_size=120), st.sampled_from([0x0800, 0x86DD, 0x0806]))
@settings(max_examples=400, deadline=None)
def test_random_bodies_after_an_ethernet_header_only_ever_drop(body: bytes, ethertype: int) -> None:
    frame = bytes(Ether(src=MAC_A, dst=MAC_B, type=ethertype)) + body
    with contextlib.suppress(P.Drop):
        P.parse(frame)


@given(st.binary(max_size=1500), st.integers(1, 65535), st.integers(1, 65535))
@settings(max_examples=100, deadline=None)
def test_udp_frames_match_scapy(payload: bytes, sport: int, dport: int) -> None:
    refs = (
        (GW4, GUEST4, IP(src=str(GW4), dst=str(GUEST4), ttl=64)),
        (GW6, GUEST6, IPv6(src=str(GW6), dst=str(GUEST6), hlim=64)),
    )
    for src, dst, ip in refs:
        built = P.udp_frame(MAC_A_BYTES, MAC_B_BYTES, src, dst, sport, dport, payload)
        ref = Ether(src=MAC_B, dst=MAC_A) / ip / UDP(sport=sport, dport=dport) / Raw(payload)
        parsed = Ether(built)
        assert parsed[UDP].chksum == Ether(bytes(ref))[UDP].chksum != 0
        assert len(built) >= 60
        pkt = P.parse(built)
        assert (pkt.sport, pkt.dport, pkt.payload) == (sport, dport, payload)


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (
            Ether() / IP(src="10.0.2.15", dst="10.0.2.2", flags="MF") / UDP() / Raw(b"x"),
            "ip_fragment",
        ),
        (Ether() / IP(src="10.0.2.15", dst="10.0.2.2", frag=8) / UDP() / Raw(b"x"), "ip_fragment"),
        (
            Ether() / IP(src="10.0.2.15", dst="10.0.2.2", options=b"\x01\x01\x01\x00") / UDP(),
            "ip_options",
        ),
        (Ether() / IP(src="10.0.2.15", dst="10.0.2.2", proto=132) / Raw(b"sctp"), "ip_protocol"),
        (Ether(type=0x88B5) / Raw(b"x" * 50), "ethertype"),
    ],
)
def test_what_the_stack_does_not_take_is_named(frame: Ether, reason: str) -> None:
    with pytest.raises(P.Drop) as exc:
        P.parse(bytes(frame))
    assert exc.value.reason == reason


def test_oversize_frames_dropped() -> None:
    with pytest.raises(P.Drop, match="oversize"):
        P.parse(bytes(P.MAX_FRAME + 1))


@given(st.binary(max_size=300), st.integers(0, 15))
@settings(max_examples=300, deadline=None)
def test_the_stack_never_raises_on_guest_frames(body: bytes, pair_bits: int) -> None:
    """Whatever the guest sends, the stack drops and counts it or answers it;
    nothing raises and nothing counts as an internal error."""
    stack = UserStack(make_config(), 2)
    try:
        for ethertype in (0x0800, 0x86DD, 0x0806):
            frame = bytes(Ether(src=MAC_A, dst=MAC_B, type=ethertype)) + body
            stack.guest_frame(frame, pair_bits % 2)
        assert stack.drops["internal_error"] == 0
    finally:
        stack.close()


def test_builders_keep_addresses() -> None:
    f = Ether(
        P.udp_frame(
            b"\x02" * 6, b"\x04" * 6, IPv4Address("1.2.3.4"), IPv4Address("5.6.7.8"), 1, 2, b""
        )
    )
    assert (f[IP].src, f[IP].dst, f[IP].ttl) == ("1.2.3.4", "5.6.7.8", 64)
    f6 = Ether(
        P.udp_frame(b"\x02" * 6, b"\x04" * 6, IPv6Address("::1"), IPv6Address("::2"), 1, 2, b"")
    )
    assert (f6[IPv6].src, f6[IPv6].dst) == ("::1", "::2")
