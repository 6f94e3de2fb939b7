"""Pure ACKs a later ACK of the same connection supersedes in one batch of
guest frames (``tcp_segment.superseded_acks``): only the last is handled, never a
duplicate ACK, never across another segment of the connection."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt
from scapy.layers.l2 import Ether

from trionet.backends.user.tcp_segment import superseded_acks

GUEST, GW = "10.0.2.15", "10.0.2.2"
GUEST6, GW6 = "fd00::15", "fd00::2"


def seg(
    ack: int, *, seq: int = 1000, flags: str = "A", sport: int = 40000, payload: bytes = b"",
    v6: bool = False, options: Any = None, ext: bool = False,
) -> bytes:  # fmt: skip
    tcp = TCP(sport=sport, dport=80, seq=seq, ack=ack, flags=flags, window=500)
    if options:
        tcp.options = options
    if v6:
        ip: Any = IPv6(src=GUEST6, dst=GW6)
        if ext:
            ip = ip / IPv6ExtHdrDestOpt()
    else:
        ip = IP(src=GUEST, dst=GW)
    return bytes(Ether(src="52:54:00:12:34:56", dst="52:55:0a:00:02:02") / ip / tcp / payload)


def test_later_higher_acks_supersede_earlier_ones() -> None:
    frames = [seg(100), seg(200), seg(300)]
    assert superseded_acks(frames) == {0, 1}


def test_ipv6_acks_coalesce_too() -> None:
    assert superseded_acks([seg(100, v6=True), seg(300, v6=True)]) == {0}


def test_duplicate_acks_are_all_kept() -> None:
    """Fast retransmit counts them: three equal ACKs stay three."""
    assert superseded_acks([seg(100), seg(100), seg(100), seg(100)]) == set()
    assert superseded_acks([seg(100), seg(100), seg(200)]) == {0, 1}


def test_a_data_segment_in_between_keeps_the_earlier_ack() -> None:
    frames = [seg(100), seg(150, payload=b"x" * 10), seg(200, seq=1010)]
    assert superseded_acks(frames) == set()


def test_an_ack_is_not_superseded_by_a_different_sequence_number() -> None:
    """The later ACK follows guest data the batch does not show: keep both."""
    assert superseded_acks([seg(100), seg(200, seq=2000)]) == set()


def test_wrapping_ack_numbers_compare_as_sequence_numbers() -> None:
    assert superseded_acks([seg(0xFFFFFF00), seg(0x10)]) == {0}
    assert superseded_acks([seg(0x10), seg(0xFFFFFF00)]) == set()


def test_connections_are_coalesced_apart() -> None:
    frames = [seg(100, sport=1), seg(100, sport=2), seg(200, sport=1), seg(200, sport=2)]
    assert superseded_acks(frames) == {0, 1}


def test_only_plain_acks_are_dropped_or_supersede() -> None:
    for flags in ("FA", "RA", "PA", "SA", "UA"):
        assert superseded_acks([seg(100, flags=flags), seg(200)]) == set(), flags
        assert superseded_acks([seg(100), seg(200, flags=flags)]) == set(), flags
    options = [("NOP", None), ("NOP", None), ("Timestamp", (1, 2))]
    assert superseded_acks([seg(100, options=options), seg(200)]) == set()
    assert superseded_acks([seg(100), seg(200, options=options)]) == set()


def test_a_tcp_frame_the_scan_cannot_read_ends_coalescing() -> None:
    """An IPv4 header with options or an IPv6 extension header hides which
    connection the frame belongs to: nothing before it is dropped."""
    v4_opts = bytearray(seg(150))
    ip_opts = Ether(bytes(v4_opts))
    ip_opts[IP].options = [b"\x01\x01\x01\x00"]  # NOPs and an end of list
    del ip_opts[IP].ihl, ip_opts[IP].len, ip_opts[IP].chksum, ip_opts[TCP].chksum
    assert superseded_acks([seg(100), bytes(ip_opts), seg(200)]) == set()
    v6 = [seg(100, v6=True), seg(150, v6=True, ext=True), seg(200, v6=True)]
    assert superseded_acks(v6) == set()


def test_frames_other_than_tcp_are_passed_over() -> None:
    from scapy.layers.inet import UDP
    from scapy.layers.l2 import ARP

    udp = bytes(Ether() / IP(src=GUEST, dst=GW) / UDP(sport=1, dport=2) / b"x")
    arp = bytes(Ether() / ARP(psrc=GUEST, pdst=GW))
    assert superseded_acks([seg(100), udp, arp, b"\x00" * 20, seg(200)]) == {0}


@given(
    st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 3), st.sampled_from(["A", "PA", "FA"])),
        max_size=12,
    )
)
def test_every_connection_keeps_its_last_frame_and_its_highest_ack(
    spec: list[tuple[int, int, str]],
) -> None:
    """Whatever the batch: the last frame of each connection is kept, every
    frame with a payload or other flags is kept, and a dropped ACK is
    followed, in its connection, by dropped ACKs only up to a kept ACK
    acknowledging more."""
    frames = [seg(100 * a, sport=c, flags=f) for c, a, f in spec]
    skip = superseded_acks(frames)
    for i, (c, a, f) in enumerate(spec):
        if i not in skip:
            continue
        assert f == "A"
        kept = [j for j, s in enumerate(spec) if j > i and s[0] == c and j not in skip]
        assert kept, "the connection's last frame was dropped"
        _, a2, f2 = spec[kept[0]]
        assert f2 == "A" and a2 > a
