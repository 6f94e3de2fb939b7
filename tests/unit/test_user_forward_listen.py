"""Inbound forwards whose host port cannot be bound when the session starts:
they are reported (status, metrics, an error in the log) and tried again with
backoff until the port is free, then they work."""

from __future__ import annotations

import errno
import itertools
import logging
import os
import socket
from ipaddress import IPv4Address

import pytest
import trio
from scapy.layers.inet import IP, TCP, UDP

from tests.e2e.ports import free_port
from tests.fakes.userguest import GUEST_MAC, make_config
from tests.unit.test_user_tcp import Wire
from trionet.backends.user import udp
from trionet.backends.user.config import Forward
from trionet.backends.user.listeners import RETRY_FIRST, RETRY_MAX, Listeners, ListenPoint
from trionet.backends.user.stack import UserStack
from trionet.backends.user.tcp import TcpFlows
from trionet.service.metrics import _flow_families
from trionet.service.statusfmt import format_table

LOOPBACK = IPv4Address("127.0.0.1")
KIND = {"tcp": socket.SOCK_STREAM, "udp": socket.SOCK_DGRAM}


def hold(proto: str, port: int) -> socket.socket:
    """Another process's socket on the port (no SO_REUSEADDR: ours cannot share it)."""
    sock = socket.socket(socket.AF_INET, KIND[proto])
    sock.bind(("127.0.0.1", port))
    if proto == "tcp":
        sock.listen()
    return sock


async def reaches_the_guest(st: UserStack, proto: str, port: int) -> None:
    """A connection (TCP) or a datagram (UDP) to the host port comes out to the
    guest, to the forward's guest port."""
    if proto == "tcp":
        client = trio.socket.socket()
        await client.connect(("127.0.0.1", port))
    else:
        client = trio.socket.socket(type=socket.SOCK_DGRAM)
        await client.sendto(b"hello", ("127.0.0.1", port))
    with client:
        while True:
            frame = await Wire(st).next()
            layer = TCP if proto == "tcp" else UDP
            if layer in frame:
                break
        assert frame[IP].dport == 8080
        if proto == "tcp":
            assert frame[TCP].flags == "S"


def metric(st: UserStack, proto: str) -> float:
    [family] = [f for f in _flow_families({"user": st.status()}) if f.name.endswith("listening")]
    [value] = [s.value for s in family.samples if s.labels == {"protocol": proto}]
    return float(value)


@pytest.mark.parametrize("proto", ["tcp", "udp"])
async def test_a_taken_port_is_reported_and_retried_until_it_binds(
    proto: str, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port(KIND[proto])
    holder = hold(proto, port)
    fwd = Forward(proto, LOOPBACK, port, port, 8080)
    st = UserStack(make_config(guest_mac=GUEST_MAC, forwards=(fwd,)), 1)
    group = st.tcp.listeners if proto == "tcp" else st.udp.listeners
    try:
        with trio.fail_after(60):  # virtual seconds
            await taken_port_case(st, group, proto, port, holder, caplog)
    finally:
        holder.close()
        st.close()


async def taken_port_case(
    st: UserStack,
    group: Listeners,
    proto: str,
    port: int,
    holder: socket.socket,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with trio.open_nursery() as nursery:
        with caplog.at_level(logging.ERROR, logger="trionet.backends.user.listeners"):
            await nursery.start(st.run)
        assert f"cannot listen on {proto} 127.0.0.1:{port}" in caplog.text
        fw = st.status()["forwards"]
        assert fw["listening"] == 0 and fw["not_listening"][proto] == 1
        [failing] = fw["failing"]
        assert failing["port"] == port and failing["guest_port"] == 8080
        assert failing["error"] == "Address already in use" and not failing["listening"]
        assert metric(st, proto) == 1
        table = format_table({"user": st.status()})
        assert "forwards: 0 listening, 1 NOT listening (retried)" in table
        assert f"{proto} 127.0.0.1:{port} -> guest 8080: Address already in use" in table

        # still taken: retried after 1 s, then 2 s (the backoff doubles)
        t0 = trio.current_time()
        await group.failures.wait_value(3)
        assert trio.current_time() - t0 == pytest.approx(RETRY_FIRST * 3, abs=0.01)

        holder.close()
        await group.listening.wait_value(1)
        assert trio.current_time() - t0 == pytest.approx(RETRY_FIRST * 7, abs=0.01)
        fw = st.status()["forwards"]
        assert fw["listening"] == 1 and fw["not_listening"][proto] == 0 and not fw["failing"]
        assert metric(st, proto) == 0
        assert "forwards: 1 listening, 0 NOT listening" in format_table({"user": st.status()})
        await reaches_the_guest(st, proto, port)
        nursery.cancel_scope.cancel()


async def test_the_backoff_stops_growing_at_its_ceiling(autojump_clock: trio.abc.Clock) -> None:
    port = free_port(KIND["tcp"])
    fwd = Forward("tcp", LOOPBACK, port, port, 8080)
    st = UserStack(make_config(guest_mac=GUEST_MAC, forwards=(fwd,)), 1)
    with hold("tcp", port):
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(st.run)
                group = st.tcp.listeners
                stamps = []
                with trio.fail_after(1000):
                    for n in range(2, 12):
                        await group.failures.wait_value(n)
                        stamps.append(trio.current_time())
                gaps = [b - a for a, b in itertools.pairwise(stamps)]
                assert gaps[:6] == pytest.approx([2, 4, 8, 16, 32, 60], abs=0.01)
                assert gaps[6:] == pytest.approx([RETRY_MAX] * 3, abs=0.01)
                nursery.cancel_scope.cancel()
        finally:
            st.close()


async def test_a_free_port_listens_at_once_and_nothing_is_failing() -> None:
    port = free_port(KIND["tcp"])
    fwd = Forward("tcp", LOOPBACK, port, port, 8080)
    st = UserStack(make_config(guest_mac=GUEST_MAC, forwards=(fwd,)), 1)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(st.run)
            assert st.tcp.listeners.listening.value == 1
            assert st.status()["forwards"] == {
                "listening": 1,
                "not_listening": {"udp": 0, "tcp": 0},
                "unsupported": 0,
                "failing": [],
            }
            nursery.cancel_scope.cancel()
    finally:
        st.close()
    # the session's end closes the socket: the port is free again
    with hold("tcp", port):
        pass


async def test_a_host_without_ipv6_is_warned_of_once_not_retried(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A forward without a bind address listens on both families the guest has;
    a host with no IPv6 sockets at all (EAFNOSUPPORT) cannot ever give the IPv6
    one: a warning, no retries, and nothing counted as failing."""
    port = free_port(KIND["tcp"])
    fwd = Forward("tcp", None, port, port, 8080)
    st = UserStack(make_config(guest_mac=GUEST_MAC, forwards=(fwd,)), 1)

    def no_ipv6(point: ListenPoint) -> socket.socket:
        if point.family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, os.strerror(errno.EAFNOSUPPORT))
        point.addr = "127.0.0.1"  # (the test listens on loopback only)
        return TcpFlows._listen_socket(point)

    st.tcp.listeners._open = no_ipv6
    try:
        async with trio.open_nursery() as nursery:
            with caplog.at_level(logging.WARNING, logger="trionet.backends.user.listeners"):
                await nursery.start(st.run)
            assert f"not listening on tcp [::]:{port}: Address family not supported" in caplog.text
            assert "cannot listen" not in caplog.text
            fw = st.status()["forwards"]
            assert fw["listening"] == 1 and fw["unsupported"] == 1
            assert fw["not_listening"]["tcp"] == 0 and not fw["failing"]
            assert metric(st, "tcp") == 0
            await trio.sleep(RETRY_MAX * 5)
            assert st.tcp.listeners.failures.value == 1  # never tried again
            await reaches_the_guest(st, "tcp", port)
            nursery.cancel_scope.cancel()
    finally:
        st.close()


async def test_a_udp_forward_on_a_host_without_ipv6_is_not_failing(
    autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The socket call's own errno reaches the listener policy (UDP's flow
    sockets turn it into a drop; a forward's must not lose it)."""
    port = free_port(KIND["udp"])
    fwd = Forward("udp", None, port, port, 8080)
    st = UserStack(make_config(guest_mac=GUEST_MAC, forwards=(fwd,)), 1)
    real = udp.udp_socket

    def no_ipv6(family: int) -> socket.socket:
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, os.strerror(errno.EAFNOSUPPORT))
        return real(family)

    monkeypatch.setattr(udp, "udp_socket", no_ipv6)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(st.run)
            fw = st.status()["forwards"]
            assert fw["listening"] == 1 and fw["unsupported"] == 1
            assert fw["not_listening"]["udp"] == 0 and not fw["failing"]
            await trio.sleep(RETRY_MAX * 2)  # virtual time: nothing is tried again
            assert st.udp.listeners.failures.value == 1
            nursery.cancel_scope.cancel()
    finally:
        st.close()
