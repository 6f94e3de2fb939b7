"""Inbound port forwards of the user-mode stack, and the ``-t``/``-u`` spec parser.

A ``Forward`` says: connections or datagrams arriving at the host on
``host_first..host_last`` (bound to ``bind``, or to any address) go to the
guest on ``guest_first..``, port by port.

``parse_forward`` reads the port specifications of passt's ``-t``/``-u``
options (the syntax of its man page; the code is ours)::

    SPEC   := "none" | [BIND "/"] ITEM ("," ITEM)*
    BIND   := IPv4 | IPv6 | "[" IPv6 "]" | "*"          ("*": any address)
    ITEM   := PORTS [":" PORTS]                         host side [":" guest side]
            | "~" PORTS                                 excluded host ports
    PORTS  := PORT | PORT "-" PORT                      PORT: 1..65535

``HOST:GUEST`` ranges must be of the same length.  Exclusions apply to every
include item of the spec: a range is split around them, each piece keeping its
offset to the guest side.  Not supported (refused with a message): ``all``,
a spec made of exclusions only (passt reads it as "all but these"), ``auto``,
``%IFNAME`` interface binding and a target address after ``:``.

Every mistake raises ``ValueError`` naming the spec.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

__all__ = ["PROTOCOLS", "Forward", "check_overlaps", "parse_forward"]

PROTOCOLS = ("udp", "tcp")
MAX_PORT = 65535

IPAddress = IPv4Address | IPv6Address
_Bad = Callable[[str], ValueError]  # turns a reason into the error to raise


@dataclass(frozen=True, slots=True)
class Forward:
    """One inbound port range, host side -> guest side."""

    proto: str  # "udp" | "tcp"
    bind: IPv4Address | IPv6Address | None  # None: any address (both families)
    host_first: int
    host_last: int
    guest_first: int  # host port p maps to guest port guest_first + (p - host_first)

    def __post_init__(self) -> None:
        if self.proto not in PROTOCOLS:
            raise ValueError(f"forward protocol must be udp or tcp, not {self.proto!r}")
        if not 1 <= self.host_first <= self.host_last <= MAX_PORT:
            raise ValueError(f"bad host port range {self.host_first}-{self.host_last}")
        if self.guest_first < 1 or self.guest_last > MAX_PORT:
            raise ValueError(f"bad guest port range {self.guest_first}-{self.guest_last}")

    @property
    def guest_last(self) -> int:
        return self.guest_first + (self.host_last - self.host_first)

    def guest_port(self, host_port: int) -> int:
        """The guest port for ``host_port`` (which must be in the host range)."""
        if not self.host_first <= host_port <= self.host_last:
            raise ValueError(f"port {host_port} is not forwarded by {self}")
        return self.guest_first + (host_port - self.host_first)

    def __str__(self) -> str:
        bind = "*" if self.bind is None else str(self.bind)
        return (
            f"{self.proto} {bind} {self.host_first}-{self.host_last}"
            f" -> {self.guest_first}-{self.guest_last}"
        )


def parse_forward(spec: str, proto: str) -> tuple[Forward, ...]:
    """The forwards of one ``-t``/``-u`` ``spec`` for ``proto`` ("udp" or "tcp").

    ``none`` gives no forwards.  Raises ``ValueError`` naming ``spec``.
    """
    if proto not in PROTOCOLS:
        raise ValueError(f"forward protocol must be udp or tcp, not {proto!r}")
    if spec == "none":
        return ()

    def bad(why: str) -> ValueError:
        return ValueError(f"bad {proto} forward spec {spec!r}: {why}")

    if not spec:
        raise bad("empty")
    if any(c.isspace() for c in spec):
        raise bad("no spaces allowed")
    bind: IPAddress | None = None
    ports = spec
    if "/" in spec:
        head, ports = spec.split("/", 1)
        bind = _parse_bind(head, bad)
        if "/" in ports:
            raise bad("forwarding to another target address is not supported")

    includes: list[tuple[int, int, int]] = []  # host first, host last, guest first
    excluded: list[tuple[int, int]] = []
    for item in ports.split(","):
        if item in ("all", "auto", "none") or item.startswith("all:"):
            word = item.split(":", 1)[0]
            why = {
                "all": "'all' is not supported yet; list the ports to forward",
                "auto": "'auto' is not supported (a passt/pasta namespace feature)",
                "none": "'none' must be the whole spec",
            }[word]
            raise bad(why)
        if item.startswith("~"):
            excluded.append(_parse_range(item[1:], bad))
            continue
        host_part, sep, guest_part = item.partition(":")
        hfirst, hlast = _parse_range(host_part, bad)
        gfirst = hfirst
        if sep:
            try:
                gfirst, glast = _parse_range(guest_part, lambda why: ValueError(why))
            except ValueError:
                raise bad(
                    f"guest side {guest_part!r} of {item!r} must be PORT or FIRST-LAST"
                    " (forwarding to another address is not supported)"
                ) from None
            if glast - gfirst != hlast - hfirst:
                raise bad(f"{item!r}: host and guest ranges differ in length")
        includes.append((hfirst, hlast, gfirst))
    if not includes:
        raise bad("only exclusions: forwarding all other ports is not supported yet")

    forwards: list[Forward] = []
    for hfirst, hlast, gfirst in includes:
        for first, last in _split_around(hfirst, hlast, excluded):
            forwards.append(Forward(proto, bind, first, last, gfirst + (first - hfirst)))
    if not forwards:
        raise bad("every port is excluded")
    try:
        check_overlaps(forwards)
    except ValueError as exc:
        raise bad(str(exc)) from None
    return tuple(forwards)


def check_overlaps(forwards: Iterable[Forward]) -> None:
    """Raise ``ValueError`` if two forwards would listen on the same host port.

    Two binds collide when either is ``None`` (any address), when they are
    equal, or when one is the unspecified address of the other's family.
    """
    seen: list[Forward] = []
    for fwd in forwards:
        for other in seen:
            if (
                fwd.proto == other.proto
                and fwd.host_first <= other.host_last
                and other.host_first <= fwd.host_last
                and _binds_collide(fwd.bind, other.bind)
            ):
                raise ValueError(f"forwards overlap: {other} and {fwd}")
        seen.append(fwd)


def _binds_collide(a: IPAddress | None, b: IPAddress | None) -> bool:
    if a is None or b is None or a == b:
        return True
    if a.version != b.version:
        return False
    return a.is_unspecified or b.is_unspecified


def _parse_bind(text: str, bad: _Bad) -> IPAddress | None:
    if "%" in text:
        raise bad("binding to an interface (%IFNAME) is not supported")
    if text == "*":
        return None
    inner = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        addr = ip_address(inner)
    except ValueError:
        raise bad(
            f"{text!r} before '/' is not an IPv4 or IPv6 address"
            " (forwarding to another target address is not supported)"
        ) from None
    if inner is not text and addr.version != 6:
        raise bad(f"brackets are for IPv6 addresses, not {text!r}")
    if addr.is_multicast:
        raise bad(f"cannot bind to multicast address {addr}")
    return addr


def _parse_port(text: str, bad: _Bad) -> int:
    if not text.isascii() or not text.isdigit():
        raise bad(f"{text!r} is not a port number")
    port = int(text)
    if not 1 <= port <= MAX_PORT:
        raise bad(f"port {port} is out of 1..{MAX_PORT}")
    return port


def _parse_range(text: str, bad: _Bad) -> tuple[int, int]:
    first_text, sep, last_text = text.partition("-")
    first = _parse_port(first_text, bad)
    last = _parse_port(last_text, bad) if sep else first
    if last < first:
        raise bad(f"range {text!r} ends before it starts")
    return first, last


def _split_around(first: int, last: int, excluded: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The pieces of ``first..last`` that no excluded range covers."""
    pieces = [(first, last)]
    for xfirst, xlast in excluded:
        kept: list[tuple[int, int]] = []
        for a, b in pieces:
            if xlast < a or xfirst > b:
                kept.append((a, b))
                continue
            if a < xfirst:
                kept.append((a, xfirst - 1))
            if xlast < b:
                kept.append((xlast + 1, b))
        pieces = kept
    return sorted(pieces)
