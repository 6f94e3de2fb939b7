"""ARP responder of the user-mode stack (sans-IO).

The guest sits alone on a virtual link with trionet as its only neighbour, so
trionet answers, with its own MAC, every ARP request for an IPv4 address that
is not the guest's: the gateway, addresses on the guest's subnet and off it
(as passt does).  Everything the guest sends elsewhere thereby reaches the
stack, which decides where it goes on the host.

Not answered: ARP replies, gratuitous ARP / announcements (sender address ==
target address), requests for the guest's own assigned address (ACD probes
from 0.0.0.0 included: answering would make the guest believe its address is
taken), and requests for the unspecified, broadcast or multicast addresses.
Probes from 0.0.0.0 for any *other* address are answered, so the guest's
conflict detection learns that the address is in use on the link.

Replies are unicast to the requester's MAC and carry its sender address as
the target (RFC 826).
"""

from __future__ import annotations

from ipaddress import IPv4Address

from trionet.backends.user import packets as P
from trionet.backends.user.config import UserConfig

__all__ = ["ARP_REPLY", "ARP_REQUEST", "arp_target", "handle_arp"]

ARP_REQUEST = 1
ARP_REPLY = 2
_LIMITED_BROADCAST = IPv4Address("255.255.255.255")


def handle_arp(cfg: UserConfig, guest_mac: bytes, pkt: P.Packet) -> bytes | None:
    """The reply frame to one parsed ARP packet from the guest, or ``None``.

    ``guest_mac`` is where the reply goes when the frame's own source MAC is
    not a unicast address (a malformed frame; the sender hardware address is
    preferred then).  Raises ``Drop`` for an ARP operation that is neither a
    request nor a reply.
    """
    if pkt.version != 0 or len(pkt.payload) < 28:
        raise P.Drop("arp_format")
    op = pkt.proto
    if op == ARP_REPLY:
        return None  # the guest answering someone: nothing for us to do
    if op != ARP_REQUEST:
        raise P.Drop("arp_op")
    if cfg.v4 is None:
        return None
    sender_ip, target_ip = pkt.src, pkt.dst
    assert isinstance(sender_ip, IPv4Address) and isinstance(target_ip, IPv4Address)
    if not arp_target(cfg, sender_ip, target_ip):
        return None
    sender_mac = pkt.payload[8:14]
    dst_mac = _unicast(pkt.eth_src) or _unicast(sender_mac) or guest_mac
    body = P.arp(ARP_REPLY, cfg.our_mac, target_ip, sender_mac, sender_ip)
    return P.ethernet(dst_mac, cfg.our_mac, P.ETH_P_ARP, body)


def arp_target(cfg: UserConfig, sender: IPv4Address, target: IPv4Address) -> bool:
    """Whether trionet answers a request from ``sender`` asking for ``target``."""
    if cfg.v4 is None:
        return False
    if not sender.is_unspecified and sender == target:
        return False  # gratuitous ARP / announcement
    if target == cfg.v4.address:
        return False  # the guest's own: never claim it, nor fail its probes
    return not (target.is_unspecified or target.is_multicast or target == _LIMITED_BROADCAST)


def _unicast(mac: bytes) -> bytes | None:
    """``mac`` if it is a usable unicast address, else ``None``."""
    if len(mac) != 6 or mac[0] & 1 or mac == bytes(6):
        return None
    return mac
