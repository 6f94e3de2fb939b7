"""``trionet --netns``: a network namespace served as pasta serves one.

Each test runs ``python -m trionet --netns TARGET`` as its own process against a
namespace it creates (``ip netns add``, or for the rootless case a holder made
with ``unshare --user --map-root-user --net``), and talks through the tap
trionet opens in it: clients inside the namespace (``ip netns exec`` or
``nsenter``, running ``python -c``) reach servers on the host's 127.0.0.1
through the gateway 192.0.2.1, and the host reaches a server in the namespace
through an inbound forward.  Data is checked by digest both ways; the per-pair
driver counters of ``trionet status`` (key ``netns``) say which pairs carried it.

Addressing is given explicitly (``--address``/``--gateway``), so that the tests
do not depend on the host's own default route.

An inbound connection also works into a namespace that has not sent a frame
yet: trionet made the tap, so the stack knows its MAC from the start (before,
the SYN went to the broadcast address and the namespace's TCP dropped it).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.e2e.loopback import udp_echo_server
from tests.e2e.ports import free_port
from tests.netns import netns, ns_run, require_root, root_test
from tests.waits import until
from trionet.service.server import read_status

__all__ = ["require_root"]  # the fixture behind @root_test must be visible here

GUEST = "192.0.2.2"
GATEWAY = "192.0.2.1"  # maps to the host's 127.0.0.1
ADDRESSING = ("--address", f"{GUEST}/24", "--gateway", GATEWAY)
USER_MTU = 65520
START_TIMEOUT = 20.0
CLIENT_TIMEOUT = 40.0
BIG = 20 * 1024 * 1024
#: the rootless run: no capabilities at all, none to gain
NO_CAPS = (
    "setpriv",
    "--inh-caps=-all",
    "--ambient-caps=-all",
    "--bounding-set=-all",
    "--no-new-privs",
)

# ------------------------------------------------------- clients in the namespace

#: connect to HOST:PORT, read to EOF; print the byte count and the sha256
RECEIVE = """
import hashlib, socket, sys
h, n = hashlib.sha256(), 0
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30) as s:
    while chunk := s.recv(1 << 20):
        h.update(chunk)
        n += len(chunk)
print(n, h.hexdigest())
"""

#: connect to HOST:PORT, send stdin, half-close; print what the server answers
SEND = """
import socket, sys
data = sys.stdin.buffer.read()
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30) as s:
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    reply = b""
    while chunk := s.recv(65536):
        reply += chunk
print(reply.decode())
"""

#: FLOWS connections at once, each sending SIZE random bytes and checking that the
#: server's answer is their length and sha256; exit status 0 when all did
FLOWS = """
import hashlib, os, socket, sys, threading
host, port, flows, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
good, errors = [], []
together = threading.Barrier(flows)

def flow():
    try:
        data = os.urandom(size)
        with socket.create_connection((host, port), timeout=30) as s:
            together.wait(30)  # every connection open before any sends
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
        if reply.decode() == f"{size} {hashlib.sha256(data).hexdigest()}":
            good.append(1)
        else:
            errors.append(f"bad answer {reply[:100]!r}")
    except Exception as exc:
        errors.append(repr(exc))

threads = [threading.Thread(target=flow) for _ in range(flows)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(len(good), errors)
sys.exit(0 if len(good) == flows else 1)
"""

#: datagrams of the given sizes to HOST:PORT, each until its echo comes back
#: (a lost one is sent again); print "size peer-address peer-port" per echo
UDP_CLIENT = """
import os, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1)
for size in map(int, sys.argv[3:]):
    payload = os.urandom(size)
    for attempt in range(10):
        s.sendto(payload, (host, port))
        try:
            data, peer = s.recvfrom(65535)
        except TimeoutError:
            continue
        if data != payload:
            sys.exit(f"echo of {size} bytes differs ({len(data)} bytes back)")
        print(size, peer[0], peer[1])
        break
    else:
        sys.exit(f"no echo of a {size}-byte datagram")
"""

#: one datagram to HOST:9 (discard): the namespace ARPs for the gateway first
NUDGE = """
import socket, sys
socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"hello", (sys.argv[1], 9))
"""

#: the guest's server behind an inbound forward: one connection, echoed back
#: whole once the peer half-closes; prints "ready" once listening, then the peer
GUEST_ECHO = """
import socket, sys
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1])))
srv.listen(1)
print("ready", flush=True)
conn, peer = srv.accept()
data = bytearray()
while chunk := conn.recv(1 << 20):
    data += chunk
conn.sendall(data)
conn.close()
print(peer[0], len(data), flush=True)
"""


# ------------------------------------------------------------------ namespaces


@dataclass(frozen=True)
class Namespace:
    target: str  # what --netns is given: a namespace file or a PID
    enter: tuple[str, ...]  # the command prefix that runs a command inside it

    async def python(
        self, script: str, *args: str, stdin: bytes = b"", timeout: float = CLIENT_TIMEOUT
    ) -> str:
        """``python -c script args`` inside; its stdout (fails the test on a
        non-zero exit; killed after ``timeout``)."""
        argv = [*self.enter, sys.executable, "-c", script, *args]
        with trio.fail_after(timeout):
            proc = await trio.run_process(
                argv, stdin=stdin, capture_stdout=True, capture_stderr=True, check=False
            )
        out = proc.stdout.decode(errors="replace")
        err = proc.stderr.decode(errors="replace")
        assert proc.returncode == 0, f"{argv[:4]}... exited {proc.returncode}: {out}{err}"
        return out

    async def link(self, ifname: str) -> subprocess.CompletedProcess[bytes]:
        return await trio.run_process(
            [*self.enter, "ip", "-d", "-j", "addr", "show", "dev", ifname],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


@asynccontextmanager
async def named_namespace(*, ipv6: bool = True) -> AsyncIterator[Namespace]:
    """A namespace of ``ip netns``; without ``ipv6`` its links get no IPv6 (so
    nothing speaks on a new link until a program sends something)."""
    async with netns() as ns:
        if not ipv6:
            for conf in ("all", "default"):
                await ns_run(ns, "sysctl", "-qw", f"net.ipv6.conf.{conf}.disable_ipv6=1")
        yield Namespace(f"/run/netns/{ns}", ("ip", "netns", "exec", ns))


def _ns_inode(pid: int | str, kind: str) -> int:
    return os.stat(f"/proc/{pid}/ns/{kind}").st_ino


@asynccontextmanager
async def unshared_namespace() -> AsyncIterator[Namespace]:
    """A network namespace owned by a new user namespace (root mapped to root),
    held by ``sleep``; the holder is killed at the end, which frees both."""
    holder = subprocess.Popen(
        ["unshare", "--user", "--map-root-user", "--net", "sleep", "600"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def unshared() -> bool:
            assert holder.poll() is None, f"the holder exited with {holder.returncode}"
            try:
                comm = Path(f"/proc/{holder.pid}/comm").read_text().strip()
                # exec'ed sleep: unshare has written the uid map by then
                return (
                    comm == "sleep"
                    and _ns_inode(holder.pid, "net") != _ns_inode("self", "net")
                    and _ns_inode(holder.pid, "user") != _ns_inode("self", "user")
                )
            except FileNotFoundError:
                return False

        await until(unshared, "the namespace holder to unshare", every=0.01)
        yield Namespace(str(holder.pid), ("nsenter", f"--net=/proc/{holder.pid}/ns/net"))
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------------- trionet


@dataclass
class Trionet:
    proc: subprocess.Popen[bytes]
    control: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def assert_alive(self) -> None:
        rc = self.proc.poll()
        assert rc is None, f"trionet exited with {rc}:\n{self.log()}"

    def status(self) -> dict[str, Any]:
        return read_status(self.control)

    def driver_pairs(self) -> list[dict[str, int]]:
        pairs: list[dict[str, int]] = self.status()["netns"]["pairs"]
        return pairs

    async def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM; the exit status (killed, and the test failed, if it hangs)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await trio.to_thread.run_sync(self.proc.wait, timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await trio.to_thread.run_sync(self.proc.wait)
                hung = f"trionet ignored SIGTERM for {timeout} s:\n{self.log()}"
                raise AssertionError(hung) from None
        return self.proc.returncode


@asynccontextmanager
async def trionet_netns(
    tmp_path: Path,
    ns: Namespace,
    *args: str,
    pairs: int = 1,
    prefix: Sequence[str] = (),
) -> AsyncIterator[Trionet]:
    """``trionet --netns`` on ``ns``, yielded once its front end runs every pair;
    stopped (SIGTERM) at the end."""
    control, log = tmp_path / "control.sock", tmp_path / "trionet.log"
    cmd = [*prefix, sys.executable, "-m", "trionet", "--netns", ns.target]
    cmd += ["--control-socket", str(control), "--queue-pairs", str(pairs)]
    cmd += [*ADDRESSING, *args]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    t = Trionet(proc, control, log)
    try:

        def running() -> bool:
            t.assert_alive()
            if not control.exists():
                return False
            try:
                st = t.status()
            except OSError:
                return False
            drivers = st.get("netns", {}).get("pairs", [])
            return bool(st["connected"]) and st["active_pairs"] == pairs and len(drivers) == pairs

        await until(running, f"trionet serving {ns.target}", START_TIMEOUT, every=0.05)
        yield t
    finally:
        with trio.CancelScope(shield=True):
            await t.stop()


# ---------------------------------------------------------------- host servers

Handler = Callable[[trio.SocketStream], Awaitable[None]]


@asynccontextmanager
async def tcp_server(handler: Handler) -> AsyncIterator[int]:
    """``handler`` for every connection to 127.0.0.1:PORT (an ephemeral port); yields PORT."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        yield int(listeners[0].socket.getsockname()[1])
        nursery.cancel_scope.cancel()


def sends(blob: bytes) -> Handler:
    """A handler that sends ``blob`` and closes."""

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(blob)

    return handler


def digests(received: list[tuple[int, str]]) -> Handler:
    """A handler that reads to EOF, records and answers "LENGTH SHA256", and closes."""

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            h, n = hashlib.sha256(), 0
            while chunk := await stream.receive_some(1 << 20):
                h.update(chunk)
                n += len(chunk)
            received.append((n, h.hexdigest()))
            await stream.send_all(f"{n} {h.hexdigest()}".encode())

    return handler


def listening(port: int) -> bool:
    """Something on the host listens on TCP 127.0.0.1:port."""
    want = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == want and fields[3] == "0A":  # TCP_LISTEN
            return True
    return False


# ------------------------------------------------------------------------ tests


@root_test
@pytest.mark.parametrize("mtu", [65520, 1500])
async def test_20mb_each_way_through_the_gateway(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mtu: int
) -> None:
    """At MTU 1500 the host's data reaches the namespace in GSO frames (the
    front end takes TSO, the tap takes them whole): far fewer frames than
    segments."""
    down, up = os.urandom(BIG), os.urandom(BIG)
    received: list[tuple[int, str]] = []
    async with (
        named_namespace() as ns,
        trionet_netns(tmp_path, ns, "--threads", "--mtu", str(mtu)) as t,
        tcp_server(sends(down)) as down_port,
        tcp_server(digests(received)) as up_port,
    ):
        with trio.fail_after(50):
            # host -> namespace
            out = await ns.python(RECEIVE, GATEWAY, str(down_port))
            assert out.split() == [str(BIG), hashlib.sha256(down).hexdigest()]
            # namespace -> host
            answer = await ns.python(SEND, GATEWAY, str(up_port), stdin=up)
        want = (BIG, hashlib.sha256(up).hexdigest())
        assert received == [want]
        assert answer.split() == [str(BIG), want[1]]
        t.assert_alive()
        (pair,) = t.driver_pairs()
        assert pair["tx_bytes"] >= BIG and pair["rx_bytes"] >= BIG, pair
        if mtu == 1500:
            assert pair["rx_frames"] < BIG // 1460 // 4, pair
        with capsys.disabled():
            print("\nnetns driver:", pair)


@root_test
@pytest.mark.parametrize("spoken", [True, False], ids=["after-namespace-spoke", "silent-namespace"])
async def test_inbound_tcp_forward_reaches_the_namespace(tmp_path: Path, spoken: bool) -> None:
    port = free_port()
    blob = os.urandom(4 << 20)
    async with (
        named_namespace(ipv6=False) as ns,
        trionet_netns(tmp_path, ns, "-t", f"127.0.0.1/{port}:{port}") as t,
    ):
        shown = await ns.link("eth0")
        mac = json.loads(shown.stdout)[0]["address"]
        if spoken:  # one datagram to the gateway: the stack learns the MAC from its ARP
            await ns.python(NUDGE, GATEWAY)
            await until(
                lambda: t.status()["user"]["guest_mac"] == mac,
                f"the user stack to learn the namespace's MAC {mac}",
                every=0.05,
            )
        server = await trio.lowlevel.open_process(
            [*ns.enter, sys.executable, "-c", GUEST_ECHO, str(port)],
            stdout=subprocess.PIPE,
        )
        try:
            assert server.stdout is not None
            seen = b""
            with trio.fail_after(10):
                while b"ready\n" not in seen:
                    chunk = await server.stdout.receive_some(4096)
                    assert chunk, f"the namespace's server exited with {await server.wait()}"
                    seen += chunk
            await until(lambda: listening(port), f"trionet listening on 127.0.0.1:{port}")
            echoed = bytearray()
            try:
                with trio.fail_after(10):
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                    async with stream:
                        await stream.send_all(blob)
                        await stream.send_eof()
                        while chunk := await stream.receive_some(1 << 20):
                            echoed += chunk
                    assert await server.wait() == 0
                    while chunk := await server.stdout.receive_some(4096):
                        seen += chunk
            except trio.TooSlowError:
                flows = t.status()["user"]["flows"]
                raise AssertionError(
                    f"no echo through the forward in 10 s ({len(echoed)} bytes back); "
                    f"the namespace's server said {seen!r}; trionet's flows: {flows}"
                ) from None
            assert len(echoed) == len(blob)
            assert echoed == blob
            peer, length = seen.decode().split("\n")[1].split()
            assert int(length) == len(blob)
            assert peer == GATEWAY  # the host's loopback appears as the gateway
            t.assert_alive()
        finally:
            if server.returncode is None:
                server.kill()
            with trio.CancelScope(shield=True):
                await server.wait()


@root_test
async def test_udp_echo_through_the_gateway(tmp_path: Path) -> None:
    sizes = ("17", "1400", "60000")  # the last one only fits the 65520-byte link MTU
    async with (
        named_namespace() as ns,
        trionet_netns(tmp_path, ns) as t,
        udp_echo_server() as echo,
    ):
        out = await ns.python(UDP_CLIENT, GATEWAY, str(echo.port), *sizes)
        lines = [line.split() for line in out.splitlines()]
        assert lines == [[size, GATEWAY, str(echo.port)] for size in sizes]
        assert echo.received >= len(sizes)
        assert {host for host, _ in echo.peers} == {"127.0.0.1"}
        t.assert_alive()


@root_test
async def test_two_queue_pairs_both_carry_flows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flows, size = 16, 1 << 20
    received: list[tuple[int, str]] = []
    async with (
        named_namespace() as ns,
        trionet_netns(tmp_path, ns, "--threads", pairs=2) as t,
        tcp_server(digests(received)) as port,
    ):
        out = await ns.python(FLOWS, GATEWAY, str(port), str(flows), str(size))
        assert out.split()[0] == str(flows)
        assert len(received) == flows
        assert all(n == size for n, _ in received)
        t.assert_alive()
        st = t.status()
        drivers = st["netns"]["pairs"]
        with capsys.disabled():
            print("\nnetns drivers:", drivers)
        assert st["active_pairs"] == 2
        assert len(drivers) == 2
        # every flow's data leaves the namespace on one queue: a queue that
        # carried at least one flow has sent at least its megabyte
        assert all(d["tx_frames"] > 0 for d in drivers), drivers
        assert all(d["tx_bytes"] >= size for d in drivers), drivers
        assert sum(d["tx_bytes"] for d in drivers) >= flows * size


@root_test
async def test_rootless_joins_the_owning_user_namespace(tmp_path: Path) -> None:
    received: list[tuple[int, str]] = []
    blob = os.urandom(2 << 20)
    async with (
        unshared_namespace() as ns,
        trionet_netns(tmp_path, ns, prefix=NO_CAPS) as t,
        tcp_server(digests(received)) as port,
    ):
        assert "joined the user namespace" in t.log()
        # trionet's user namespace is now the holder's; its network namespace the host's
        assert _ns_inode(t.proc.pid, "user") == _ns_inode(ns.target, "user")
        assert _ns_inode(t.proc.pid, "net") == _ns_inode("self", "net")
        answer = await ns.python(SEND, GATEWAY, str(port), stdin=blob)
        want = (len(blob), hashlib.sha256(blob).hexdigest())
        assert received == [want]
        assert answer.split() == [str(want[0]), want[1]]
        t.assert_alive()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--netns", "/nonexistent/netns"], "/nonexistent/netns"),
        (["--netns", "/run/netns/unused", "--backend", "tap"], "--backend user only"),
        (["--netns", str(os.getpid())], "own network namespace"),
    ],
    ids=["missing-path", "tap-backend", "own-namespace"],
)
async def test_netns_usage_errors(args: list[str], message: str) -> None:
    with trio.fail_after(30):
        proc = await trio.run_process(
            [sys.executable, "-m", "trionet", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 2, err
    assert message in err


@root_test
async def test_tap_is_gone_after_sigterm(tmp_path: Path) -> None:
    ifname = "tnns0"
    async with named_namespace() as ns:
        async with trionet_netns(tmp_path, ns, "--netns-ifname", ifname) as t:
            shown = await ns.link(ifname)
            assert shown.returncode == 0, shown.stderr
            (link,) = json.loads(shown.stdout)
            assert link["mtu"] == USER_MTU
            assert "UP" in link["flags"]
            assert link["linkinfo"]["info_kind"] == "tun"
            v4 = [(a["local"], a["prefixlen"]) for a in link["addr_info"] if a["family"] == "inet"]
            assert v4 == [(GUEST, 24)]
            routes = await ns_run(ns.enter[-1], "ip", "-4", "route", "show", "default")
            assert f"default via {GATEWAY} dev {ifname}" in routes.stdout.decode()
            assert (await ns.link("eth0")).returncode != 0  # --netns-ifname, not eth0
            assert await t.stop() == 0
            gone = await ns.link(ifname)
            assert gone.returncode != 0, f"{ifname} is still in the namespace: {gone.stdout!r}"
        assert (await ns.link("lo")).returncode == 0  # the namespace itself is left alone
