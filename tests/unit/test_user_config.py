"""User-mode stack configuration: host view -> addressing, resolv.conf, forward specs, CLI."""

from __future__ import annotations

import argparse
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface, ip_address
from pathlib import Path

import pytest
import trio

from trionet.backends.user.config import (
    OUR_MAC,
    DefaultRoute,
    Forward,
    HostV4,
    HostV6,
    HostView,
    ResolvConf,
    UserConfigError,
    UserOptions,
    add_user_arguments,
    derive_config,
    parse_dns_upstream,
    parse_mac,
    parse_resolv_conf,
    pick_default_route,
    read_host_routes,
    read_host_view,
    user_config_from_args,
)
from trionet.backends.user.forwards import check_overlaps, parse_forward

A4 = IPv4Address
A6 = IPv6Address

# what a typical dual-stack host looks like (recorded shapes, not read live)
HOST4 = HostV4("eth0", A4("192.0.2.1"), IPv4Interface("192.0.2.2/24"))
HOST6 = HostV6("eth0", A6("fe80::1:1"), IPv6Interface("2001:db8::2/128"))
RESOLV = ResolvConf((A4("127.0.0.53"), A6("2001:db8::53"), A6("fe80::53")), ("example.org",))
DUAL = HostView(HOST4, HOST6, RESOLV)


# ----------------------------------------------------------------------------
# derive_config


def test_dual_stack_host() -> None:
    cfg = derive_config(DUAL, UserOptions())
    assert cfg.v4 is not None and cfg.v6 is not None
    assert (cfg.v4.address, cfg.v4.prefix_len, cfg.v4.gateway) == (
        A4("192.0.2.2"),
        24,
        A4("192.0.2.1"),
    )
    assert cfg.v4.map_host_loopback == A4("192.0.2.1")
    assert cfg.v4.dns == (A4("192.0.2.1"),)
    # IPv6 always /64 (as passt), the link-local gateway is our link-local too
    assert (cfg.v6.address, cfg.v6.prefix_len) == (A6("2001:db8::2"), 64)
    assert cfg.v6.gateway == cfg.v6.link_local == A6("fe80::1:1")
    assert cfg.v6.map_host_loopback == A6("fe80::1:1")
    assert cfg.v6.dns == (A6("fe80::1:1"),)
    assert cfg.our_mac == OUR_MAC == bytes.fromhex("9a559a559a55")
    assert cfg.guest_mac is None
    # every resolv.conf nameserver on port 53 (loopback too; scope-less link-local not)
    assert cfg.dns_upstreams == (("127.0.0.53", 53), ("2001:db8::53", 53))
    assert cfg.search == ("example.org",)
    assert cfg.mtu == 65520 and cfg.forwards == ()
    assert (cfg.udp_timeout, cfg.udp_stream_timeout, cfg.lease_time) == (30.0, 180.0, 3600)


def test_global_ipv6_gateway_keeps_fe80_1_as_our_link_local() -> None:
    host = HostView(None, HostV6("eth0", A6("fd00::1"), IPv6Interface("fd00::2/64")))
    cfg = derive_config(host, UserOptions())
    assert cfg.v6 is not None
    assert cfg.v6.gateway == A6("fd00::1")
    assert cfg.v6.link_local == A6("fe80::1")


def test_no_default_routes_is_local_mode() -> None:
    cfg = derive_config(HostView(), UserOptions())
    assert cfg.v4 is not None and cfg.v6 is not None
    assert (cfg.v4.address, cfg.v4.prefix_len, cfg.v4.gateway) == (
        A4("169.254.2.1"),
        16,
        A4("169.254.2.2"),
    )
    assert cfg.v4.map_host_loopback == A4("169.254.2.2")
    assert cfg.v6.address == A6("::")  # nothing assigned: the guest keeps its link-local
    assert cfg.v6.gateway == cfg.v6.link_local == cfg.v6.map_host_loopback == A6("fe80::1")
    assert cfg.dns_upstreams == () and cfg.search == ()


def test_routes_without_gateway_or_address() -> None:
    host = HostView(
        HostV4("ppp0", None, IPv4Interface("198.51.100.7/32")),  # no gateway: local mode
        HostV6("wg0", None, IPv6Interface("2001:db8:5::9/128")),  # v6 keeps the address
    )
    cfg = derive_config(host, UserOptions())
    assert cfg.v4 is not None and cfg.v6 is not None
    assert cfg.v4.address == A4("169.254.2.1")
    assert (cfg.v6.address, cfg.v6.gateway) == (A6("2001:db8:5::9"), A6("fe80::1"))
    no_addr = HostView(HostV4("eth0", A4("192.0.2.1"), None), HostV6("eth0", A6("fe80::9"), None))
    cfg = derive_config(no_addr, UserOptions())
    assert cfg.v4 is not None and cfg.v6 is not None
    assert cfg.v4.gateway == A4("169.254.2.2")
    assert (cfg.v6.address, cfg.v6.gateway) == (A6("::"), A6("fe80::1"))


def test_v4_only_host_and_v6_only_host() -> None:
    cfg = derive_config(HostView(HOST4, None), UserOptions())
    assert cfg.v4 is not None and cfg.v4.address == A4("192.0.2.2")
    assert cfg.v6 is not None and cfg.v6.address == A6("::")
    cfg = derive_config(HostView(None, HOST6), UserOptions())
    assert cfg.v4 is not None and cfg.v4.address == A4("169.254.2.1")
    assert cfg.v6 is not None and cfg.v6.address == A6("2001:db8::2")


def test_ipv4_only_and_ipv6_only() -> None:
    cfg = derive_config(DUAL, UserOptions(ipv4_only=True))
    assert cfg.v4 is not None and cfg.v6 is None
    cfg = derive_config(DUAL, UserOptions(ipv6_only=True))
    assert cfg.v4 is None and cfg.v6 is not None
    with pytest.raises(UserConfigError, match="exclude"):
        derive_config(DUAL, UserOptions(ipv4_only=True, ipv6_only=True))
    with pytest.raises(UserConfigError, match="family is off"):
        derive_config(DUAL, UserOptions(ipv4_only=True, gateway6=A6("fe80::7")))


def test_options_override_per_family_and_field() -> None:
    opts = UserOptions(
        address4=IPv4Interface("10.0.2.15/24"),
        gateway6=A6("fe80::2"),
        dns4=(A4("10.0.2.3"),),
        dns6=(),
        dns_upstreams=(("::1", 5353),),
        guest_mac=bytes.fromhex("525400123456"),
        mtu=9000,
    )
    cfg = derive_config(DUAL, opts)
    assert cfg.v4 is not None and cfg.v6 is not None
    assert (cfg.v4.address, cfg.v4.prefix_len) == (A4("10.0.2.15"), 24)
    assert cfg.v4.gateway == A4("192.0.2.1")  # still the host's
    assert cfg.v4.dns == (A4("10.0.2.3"),)
    assert cfg.v6.address == A6("2001:db8::2")
    assert cfg.v6.gateway == cfg.v6.link_local == cfg.v6.map_host_loopback == A6("fe80::2")
    assert cfg.v6.dns == ()
    assert cfg.dns_upstreams == (("::1", 5353),)
    assert cfg.guest_mac == bytes.fromhex("525400123456")
    assert cfg.mtu == 9000


def test_map_host_loopback_and_no_map_gw() -> None:
    cfg = derive_config(DUAL, UserOptions(no_map_gw=True))
    assert cfg.v4 is not None and cfg.v6 is not None
    assert cfg.v4.map_host_loopback is None and cfg.v6.map_host_loopback is None
    cfg = derive_config(DUAL, UserOptions(no_map_gw=True, map_host_loopback4=A4("192.0.2.9")))
    assert cfg.v4 is not None and cfg.v6 is not None
    assert cfg.v4.map_host_loopback == A4("192.0.2.9")
    assert cfg.v6.map_host_loopback is None
    with pytest.raises(UserConfigError, match="own address"):
        derive_config(DUAL, UserOptions(map_host_loopback4=A4("192.0.2.2")))


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        (UserOptions(address4=IPv4Interface("192.0.2.1/24")), "also the gateway"),
        (UserOptions(gateway6=A6("2001:db8::2")), "also the gateway"),
        (UserOptions(mtu=67), "--mtu 67"),
        (UserOptions(mtu=65536), "--mtu 65536"),
        (UserOptions(mtu=1000), "IPv6 needs"),
        (UserOptions(udp_timeout=0), "--udp-timeout"),
        (UserOptions(udp_stream_timeout=float("inf")), "--udp-stream-timeout"),
        (
            UserOptions(forwards=(Forward("udp", None, 5, 9, 5), Forward("udp", None, 9, 9, 1))),
            "overlap",
        ),
    ],
)
def test_derive_config_errors(opts: UserOptions, match: str) -> None:
    with pytest.raises(UserConfigError, match=match):
        derive_config(DUAL, opts)


def test_small_mtu_is_fine_without_ipv6() -> None:
    assert derive_config(DUAL, UserOptions(mtu=576, ipv4_only=True)).mtu == 576


def test_pick_default_route_prefers_lowest_metric() -> None:
    routes = [
        DefaultRoute(3, "192.0.2.1", 600),
        DefaultRoute(4, "198.51.100.1", 100),
        DefaultRoute(5, "203.0.113.1", 100),
    ]
    assert pick_default_route(routes) == routes[1]
    assert pick_default_route([]) is None


# ----------------------------------------------------------------------------
# resolv.conf


def test_resolv_conf(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    path.write_text(
        "# generated\n"
        "; also a comment\n"
        "nameserver 127.0.0.53\n"
        "nameserver fe80::1%eth0\n"
        "nameserver 2001:db8::53\n"
        "nameserver 127.0.0.53\n"
        "nameserver not-an-address\n"
        "options edns0 trust-ad\n"
        "search one.example two.example\n"
        "\n"
        "nameserver\n"
    )
    rc = parse_resolv_conf(path)
    assert rc.nameservers == (A4("127.0.0.53"), A6("fe80::1"), A6("2001:db8::53"))
    assert all(getattr(ns, "scope_id", None) is None for ns in rc.nameservers)
    assert rc.search == ("one.example", "two.example")


def test_resolv_conf_last_search_or_domain_wins(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    path.write_text("search a.example b.example\ndomain c.example\n")
    assert parse_resolv_conf(path).search == ("c.example",)
    path.write_text("domain c.example\nsearch a.example .\n")
    assert parse_resolv_conf(str(path)).search == ("a.example",)


def test_missing_resolv_conf_is_empty(tmp_path: Path) -> None:
    assert parse_resolv_conf(tmp_path / "nope") == ResolvConf()


# ----------------------------------------------------------------------------
# forward specs


def fwd(first: int, last: int, guest: int, bind: str | None = None) -> Forward:
    return Forward("udp", None if bind is None else ip_address(bind), first, last, guest)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("22", [fwd(22, 22, 22)]),
        ("22-80", [fwd(22, 80, 22)]),
        ("22:23", [fwd(22, 22, 23)]),
        ("22-80:32-90", [fwd(22, 80, 32)]),
        ("22,25", [fwd(22, 22, 22), fwd(25, 25, 25)]),
        ("2000-5000,~3000-3010", [fwd(2000, 2999, 2000), fwd(3011, 5000, 3011)]),
        ("~25,20-30", [fwd(20, 24, 20), fwd(26, 30, 26)]),
        ("1-65535,~1", [fwd(2, 65535, 2)]),
        ("100-110:200-210,~100,~105-106,~110", [fwd(101, 104, 201), fwd(107, 109, 207)]),
        (
            "127.0.0.1/5000-5010:6000-6010,~5005",
            [
                fwd(5000, 5004, 6000, "127.0.0.1"),
                fwd(5006, 5010, 6006, "127.0.0.1"),
            ],
        ),
        ("192.0.2.1/20-30,~25", [fwd(20, 24, 20, "192.0.2.1"), fwd(26, 30, 26, "192.0.2.1")]),
        ("::1/8080", [fwd(8080, 8080, 8080, "::1")]),
        ("[::1]/8080:80", [fwd(8080, 8080, 80, "::1")]),
        ("[2001:db8::1]/53", [fwd(53, 53, 53, "2001:db8::1")]),
        ("0.0.0.0/5000", [fwd(5000, 5000, 5000, "0.0.0.0")]),
        ("*/5000", [fwd(5000, 5000, 5000)]),
        ("none", []),
    ],
)
def test_parse_forward(spec: str, expected: list[Forward]) -> None:
    assert parse_forward(spec, "udp") == tuple(expected)


def test_parse_forward_tcp_and_guest_ports() -> None:
    (f,) = parse_forward("10-19:110-119", "tcp")
    assert f.proto == "tcp" and f.guest_last == 119 and f.guest_port(15) == 115
    with pytest.raises(ValueError):
        f.guest_port(20)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("", "empty"),
        ("all", "'all' is not supported"),
        ("::1/all", "'all' is not supported"),
        ("all:192.0.2.5", "'all' is not supported"),
        ("auto", "'auto'"),
        ("22,none", "whole spec"),
        ("~20000-20010", "only exclusions"),
        ("22-80:32-91", "differ in length"),
        ("0", "out of 1..65535"),
        ("65536", "out of 1..65535"),
        ("80-22", "ends before"),
        ("22,,25", "not a port"),
        ("22,", "not a port"),
        ("+22", "not a port"),
        ("22-", "not a port"),
        ("2 2", "spaces"),
        ("x", "not a port"),
        ("~x", "not a port"),
        ("%eth0/22", "interface"),
        ("192.0.2.1%eth0/22", "interface"),
        ("0.0.0.0/5000:192.0.2.5/6000", "target address"),
        ("22:192.0.2.5", "another address"),
        ("host/22", "not an IPv4 or IPv6 address"),
        ("[192.0.2.1]/22", "brackets"),
        ("224.0.0.1/22", "multicast"),
        ("22,22", "overlap"),
        ("20-30,25:1025", "overlap"),
        ("25,~25", "every port is excluded"),
    ],
)
def test_parse_forward_errors(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        parse_forward(spec, "tcp")
    assert repr(spec) in str(info.value)


def test_parse_forward_refuses_unknown_protocol() -> None:
    with pytest.raises(ValueError, match="udp or tcp"):
        parse_forward("22", "sctp")


def test_forward_validates_itself() -> None:
    with pytest.raises(ValueError, match="guest port range"):
        Forward("udp", None, 10, 20, 65530)
    with pytest.raises(ValueError, match="host port range"):
        Forward("tcp", None, 0, 1, 1)


def test_overlaps_consider_bind_addresses() -> None:
    v4 = parse_forward("127.0.0.1/80", "tcp") + parse_forward("192.0.2.1/80", "tcp")
    check_overlaps(v4 + parse_forward("::1/80", "tcp") + parse_forward("80", "udp"))
    for other in ("80", "0.0.0.0/80", "127.0.0.1/80"):
        with pytest.raises(ValueError, match="overlap"):
            check_overlaps(v4 + parse_forward(other, "tcp"))
    check_overlaps(parse_forward("::/80", "tcp") + parse_forward("0.0.0.0/80", "tcp"))


# ----------------------------------------------------------------------------
# small parsers


def test_parse_mac() -> None:
    assert parse_mac("52:54:00:12:34:56") == bytes.fromhex("525400123456")
    assert parse_mac("52-54-00-AB-cd-EF") == bytes.fromhex("525400abcdef")
    for bad in ("52:54:00:12:34", "52:54:00:12:34:5", "zz:54:00:12:34:56", "01:00:5e:00:00:01"):
        with pytest.raises(ValueError):
            parse_mac(bad)
    with pytest.raises(ValueError, match="unicast"):
        parse_mac("00:00:00:00:00:00")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.53", ("192.0.2.53", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("::1", ("::1", 53)),
        ("2001:db8:0::53", ("2001:db8::53", 53)),
        ("[::1]:5353", ("::1", 5353)),
        ("[::1]", ("::1", 53)),
    ],
)
def test_parse_dns_upstream(text: str, expected: tuple[str, int]) -> None:
    assert parse_dns_upstream(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "[::1]5353",
        "[::1",
        "[127.0.0.1]:53",
        "192.0.2.53:0",
        "192.0.2.53:x",
        "dns",
        "0.0.0.0",
        "[::1]:",
    ],
)
def test_parse_dns_upstream_errors(text: str) -> None:
    with pytest.raises(ValueError):
        parse_dns_upstream(text)


# ----------------------------------------------------------------------------
# command line


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_user_arguments(parser)
    return parser.parse_args(argv)


async def test_cli_defaults() -> None:
    cfg = await user_config_from_args(parse(), 65520, host=DUAL)
    assert cfg == derive_config(DUAL, UserOptions())


async def test_cli_everything() -> None:
    args = parse(
        "--address", "10.0.2.15/24", "--address", "2001:db8:1::15",
        "--gateway", "10.0.2.2", "--gateway", "2001:db8:1::1",
        "--dns", "10.0.2.3", "--dns", "2001:db8:1::3",
        "--dns-upstream", "[::1]:5353", "--dns-upstream", "192.0.2.53",
        "--mac", "52:54:00:12:34:56",
        "--map-host-loopback", "10.0.2.9", "--no-map-gw",
        "-u", "127.0.0.1/5000-5010:6000-6010,~5005", "-u", "7000",
        "-t", "[::1]/8080:80",
        "--udp-timeout", "5", "--udp-stream-timeout", "60",
    )  # fmt: skip
    cfg = await user_config_from_args(args, 9000, host=DUAL)
    assert cfg.v4 is not None and cfg.v6 is not None
    assert (cfg.v4.address, cfg.v4.prefix_len, cfg.v4.gateway) == (
        A4("10.0.2.15"),
        24,
        A4("10.0.2.2"),
    )
    assert (cfg.v6.address, cfg.v6.prefix_len, cfg.v6.gateway) == (
        A6("2001:db8:1::15"),
        64,
        A6("2001:db8:1::1"),
    )
    assert cfg.v4.dns == (A4("10.0.2.3"),) and cfg.v6.dns == (A6("2001:db8:1::3"),)
    assert cfg.v4.map_host_loopback == A4("10.0.2.9") and cfg.v6.map_host_loopback is None
    assert cfg.dns_upstreams == (("::1", 5353), ("192.0.2.53", 53))
    assert cfg.guest_mac == bytes.fromhex("525400123456")
    assert cfg.mtu == 9000
    assert cfg.forwards == (
        Forward("udp", A4("127.0.0.1"), 5000, 5004, 6000),
        Forward("udp", A4("127.0.0.1"), 5006, 5010, 6006),
        Forward("udp", None, 7000, 7000, 7000),
        Forward("tcp", A6("::1"), 8080, 8080, 80),
    )
    assert (cfg.udp_timeout, cfg.udp_stream_timeout) == (5.0, 60.0)


async def test_cli_address_prefix_defaults() -> None:
    """Without /PREFIX: IPv4 takes its address class's, IPv6 /64."""
    for text, prefix in (("10.0.2.15", 8), ("172.16.0.5", 16), ("192.168.1.5", 24)):
        cfg = await user_config_from_args(parse("--address", text), 65520, host=DUAL)
        assert cfg.v4 is not None and cfg.v4.prefix_len == prefix
    cfg = await user_config_from_args(parse("--address", "2001:db8::9"), 65520, host=DUAL)
    assert cfg.v6 is not None and cfg.v6.prefix_len == 64


async def test_cli_none_values() -> None:
    cfg = await user_config_from_args(
        parse("--dns", "none", "--map-host-loopback", "none", "-u", "none", "-t", "none"),
        65520,
        host=DUAL,
    )
    assert cfg.v4 is not None and cfg.v6 is not None
    assert cfg.v4.dns == () and cfg.v6.dns == ()
    assert cfg.v4.map_host_loopback is None and cfg.v6.map_host_loopback is None
    assert cfg.forwards == ()


async def test_cli_ipv6_only() -> None:
    cfg = await user_config_from_args(parse("-6"), 65520, host=DUAL)
    assert cfg.v4 is None and cfg.v6 is not None
    cfg = await user_config_from_args(parse("--ipv4-only"), 65520, host=DUAL)
    assert cfg.v4 is not None and cfg.v6 is None


def test_cli_ipv4_and_ipv6_only_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("-4", "-6")
    assert "not allowed" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--address", "10.0.2.15/24", "--address", "10.0.3.15/24"], "--address given twice"),
        (["--address", "10.0.2.15/33"], "prefix must be 0..32"),
        (["--address", "10.0.2.0/24"], "network or broadcast"),
        (["--address", "127.0.0.2/8"], "usable unicast"),
        (["--address", "ff02::1"], "usable unicast"),
        (["--address", "bogus"], "not an IP address"),
        (["--gateway", "fe80::1", "--gateway", "fe80::2"], "--gateway given twice"),
        (["--gateway", "0.0.0.0"], "usable unicast"),
        (["--dns", "none", "--dns", "192.0.2.53"], "--dns none"),
        (["--dns", "example.org"], "not an IP address"),
        (["--dns-upstream", "[::1]x"], "IPv6"),
        (["--mac", "01:02:03:04:05:06"], "unicast"),
        (["--map-host-loopback", "10.0.2.9", "--map-host-loopback", "10.0.2.8"], "given twice"),
        (["--map-host-loopback", "::1"], "usable unicast"),
        (["-u", "none", "-u", "53"], "'none' excludes"),
        (["-u", "5000-5010", "-u", "5005"], "overlap"),
        (["-t", "all"], "'all' is not supported"),
        (["-4", "--address", "2001:db8::9"], "family is off"),
        (["--udp-timeout=-1"], "--udp-timeout"),  # (-1 alone looks like an option)
    ],
)
async def test_cli_errors(argv: list[str], match: str) -> None:
    with pytest.raises(UserConfigError, match=match):
        await user_config_from_args(parse(*argv), 65520, host=DUAL)


# ----------------------------------------------------------------------------
# the real host


async def test_read_host_routes_for_real() -> None:
    view = await trio.to_thread.run_sync(read_host_routes)
    assert isinstance(view, HostView)
    assert view.resolv == ResolvConf()


async def test_read_host_view_reads_resolv_conf(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    path.write_text("nameserver 127.0.0.1\nsearch lan\n")
    view = await read_host_view(path)
    assert view.resolv == ResolvConf((A4("127.0.0.1"),), ("lan",))
    cfg = await user_config_from_args(parse(), 65520, resolv_conf=path)
    assert cfg.dns_upstreams == (("127.0.0.1", 53),)
