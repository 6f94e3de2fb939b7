"""The sandbox (least privilege after set-up): user drop, no capabilities, no
new privileges, a seccomp allow-list that refuses with EPERM.

Each trionet here is started as root the way an orchestrator would start it,
with ``--user nobody``; traffic goes through it (fake driver rings) and then
every thread of the process is read in /proc.  The user-stack tests also run
whole in a sandboxed child process (``TRIONET_TEST_SANDBOX``), so every path
they cover (UDP, TCP, ICMP, DNS, forwards, worker threads) runs under the
filter.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from tests.e2e.guest import REPO
from tests.fakes.driver import GuestRam
from tests.fakes.frontend import DRIVER_FEATURES, Frontend
from tests.fakes.sandboxed import SANDBOX_ENV
from tests.fakes.userguest import GUEST4, GW4, UserGuest
from tests.netns import ns_run, require_root, root_test, unique_ifname
from tests.waits import until
from trionet.net import features as F
from trionet.service.server import read_status

__all__ = ["require_root"]

G_MAC = "52:54:00:12:34:56"
NOBODY = "nobody"


def thread_status(pid: int) -> dict[int, dict[str, str]]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            text = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except FileNotFoundError:
            continue
        out[int(tid)] = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
    return out


def assert_sandboxed(pid: int, uid: int | None) -> None:
    threads = thread_status(pid)
    assert len(threads) >= 1
    for tid, st in threads.items():
        where = f"thread {tid} ({st.get('Name')})"
        assert st["NoNewPrivs"] == "1", where
        assert st["Seccomp"].strip() == "2", where
        for key in ("CapEff", "CapPrm", "CapInh", "CapAmb", "CapBnd"):
            assert st[key] == "0000000000000000", f"{where}: {key} {st[key]}"
        if uid is not None:
            assert st["Uid"].split() == [str(uid)] * 4, where


class _Remote:
    """UserGuest's view of a service in another process (its failure message)."""

    def __init__(self, ctl: Path) -> None:
        self.ctl = ctl

    def status(self) -> dict[str, Any]:
        st = read_status(self.ctl)
        st.setdefault("user", None)
        return st


@asynccontextmanager
async def trionet_process(
    tmp_path: Path, *args: str, netns: str | None = None, pairs: int = 1
) -> AsyncIterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    sock, ctl, log = tmp_path / "vhost.sock", tmp_path / "ctl.sock", tmp_path / "trionet.log"
    cmd = [sys.executable, "-m", "trionet", "--socket-path", str(sock)]
    cmd += ["--control-socket", str(ctl), "--queue-pairs", str(pairs), *args]
    if netns is not None:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    try:

        def ready() -> bool:
            assert proc.poll() is None, log.read_text()
            return sock.exists() and ctl.exists() and "sandbox:" in log.read_text()

        await until(ready, "the sandboxed trionet listening", 30, every=0.05)
        yield proc, ctl, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await trio.to_thread.run_sync(lambda: proc.wait(15))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@asynccontextmanager
async def guest_on(
    sock: Path, ctl: Path, features: int, pairs: int = 1
) -> AsyncIterator[UserGuest]:
    ram = GuestRam(8 << 20)
    fe = await Frontend.connect(str(sock), ram)
    try:
        await fe.negotiate(features)
        await fe.setup_pairs(pairs)
        await fe.sync()
        g = UserGuest(fe, _Remote(ctl), pairs)  # type: ignore[arg-type]
        for p in range(pairs):
            g.stock(p)
        yield g
    finally:
        fe.close()
        ram.close()


def nobody_uid() -> int:
    import pwd

    return pwd.getpwnam(NOBODY).pw_uid


# ---- a forbidden syscall is refused ------------------------------------------------


@root_test
@pytest.mark.parametrize("how", ["root --user nobody", "root", "started as nobody"])
def test_forbidden_syscalls_are_refused(how: str) -> None:
    argv = [sys.executable, "-m", "tests.fakes.sandbox_probe"]
    if how == "root --user nobody":
        argv += ["--user", NOBODY]
    elif how == "started as nobody":
        argv = ["setpriv", f"--reuid={nobody_uid()}", f"--regid={nobody_uid()}", "--clear-groups"]
        argv += ["--", sys.executable, "-m", "tests.fakes.sandbox_probe"]
    res = subprocess.run(argv, capture_output=True, cwd=REPO, timeout=60, check=True)
    out = json.loads(res.stdout)
    forbidden_calls = ("execve", "mount", "ptrace", "unshare", "setuid", "kill", "chroot")
    for forbidden in (*forbidden_calls, "clone_newuser", "tiocsti"):
        assert out[forbidden] == "EPERM", (forbidden, out)
    for allowed in ("udp", "thread", "epoll_eventfd", "memfd_mmap", "read_proc", "ioctl_fionread"):
        assert out[allowed] == "ok", (allowed, out)
    assert out["NoNewPrivs"] == "1" and out["Seccomp"].strip() == "2"
    assert out["CapEff"] == out["CapPrm"] == "0000000000000000"
    if how.startswith("root"):  # clearing the bounding set needs CAP_SETPCAP
        assert out["CapBnd"] == "0000000000000000"


# ---- the user backend, as nobody, with traffic ---------------------------------------


@root_test
@pytest.mark.parametrize("threads", [False, True], ids=["trio", "threads"])
async def test_user_backend_sandboxed_with_traffic(tmp_path: Path, threads: bool) -> None:
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    echo.setblocking(False)
    port = echo.getsockname()[1]
    args = ["--backend", "user", "--user", NOBODY, "-4", "--address", f"{GUEST4}/24"]
    args += ["--gateway", str(GW4), *(["--threads"] if threads else [])]
    async with trionet_process(tmp_path, *args) as (proc, ctl, log):
        async with guest_on(tmp_path / "vhost.sock", ctl, DRIVER_FEATURES) as g:
            arp = Ether(src=G_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(
                op=1, hwsrc=G_MAC, psrc=str(GUEST4), pdst=str(GW4)
            )
            g.send(0, bytes(arp))
            assert Ether(await g.recv(0))[ARP].op == 2
            for n in range(20):  # the first datagram opens the flow; the rest go native
                udp = Ether(src=G_MAC) / IP(src=str(GUEST4), dst=str(GW4))
                g.send(0, bytes(udp / UDP(sport=40000, dport=port) / Raw(b"ping%d" % n)))
                with trio.fail_after(5):
                    await trio.lowlevel.wait_readable(echo)
                _, peer = echo.recvfrom(100)
                echo.sendto(b"pong%d" % n, peer)
                assert Ether(await g.recv(0))[Raw].load == b"pong%d" % n
            assert_sandboxed(proc.pid, nobody_uid())
            assert proc.poll() is None
        assert "Operation not permitted" not in log.read_text()
    echo.close()


# ---- the tap backend, as nobody, with traffic ----------------------------------------


@root_test
@pytest.mark.parametrize(
    ("threads", "user"),
    [(False, NOBODY), (True, NOBODY), (False, None)],
    ids=["trio", "threads", "root"],
)
async def test_tap_backend_sandboxed_with_traffic(
    tmp_path: Path, threads: bool, user: str | None
) -> None:
    from tests.netns import netns

    tap = unique_ifname("tns")
    features = DRIVER_FEATURES & ~F.mask(F.CTRL_VQ)
    async with netns() as ns:
        args = ["--backend", "tap", "--tap", tap, *(["--user", user] if user else [])]
        args += ["--threads"] if threads else []
        async with trionet_process(tmp_path, *args, netns=ns, pairs=2) as (proc, ctl, log):
            await ns_run(ns, "ip", "addr", "add", "10.97.0.1/24", "dev", tap)
            link = (await ns_run(ns, "ip", "-d", "link", "show", tap)).stdout.decode()
            assert f"user {user or 'root'}" in link, link  # created by trionet: handed over
            async with guest_on(tmp_path / "vhost.sock", ctl, features, pairs=2) as g:
                # cold boot on 1 of 2 pairs: queue 1 was detached (TUNSETQUEUE)
                # after the privileges went
                for _ in range(10):  # the kernel answers the guest's ARP through the tap
                    arp = Ether(src=G_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(
                        op=1, hwsrc=G_MAC, psrc="10.97.0.2", pdst="10.97.0.1"
                    )
                    g.send(0, bytes(arp))
                    while True:
                        frame = Ether(await g.recv(0))
                        if ARP in frame and frame[ARP].op == 2:
                            break
                assert_sandboxed(proc.pid, nobody_uid() if user else 0)
            st = read_status(ctl)
            assert st["pairs"][0]["tx_packets"] >= 10 and st["pairs"][0]["rx_packets"] >= 10
            assert "TUNSETQUEUE" not in log.read_text()
        assert proc.returncode == 0, log.read_text()
        # not persistent any more: the kernel deleted it with trionet's last queue fd
        gone = await ns_run(ns, "ip", "link", "show", tap, check=False)
        assert gone.returncode != 0


# ---- the user-stack tests, whole, in a sandboxed process ----------------------------


@root_test
def test_user_stack_tests_pass_in_the_sandbox() -> None:
    env = dict(os.environ, **{SANDBOX_ENV: "1"})
    argv = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
    argv += ["tests/unit/test_user_stack.py", "tests/unit/test_user_tcp_loopback.py"]
    argv += ["-k", "not megabytes and not concurrent and not short_connections"]
    argv += ["-o", "log_cli=true", "--log-cli-level=INFO"]  # shows the sandbox's log line
    res = subprocess.run(argv, capture_output=True, cwd=REPO, env=env, timeout=600)
    out = res.stdout.decode(errors="replace")
    assert res.returncode == 0, out[-4000:]
    assert "sandbox: running as uid 0, no capabilities" in out, out[-4000:]


# ---- the state file, written as the dropped user --------------------------------------


@root_test
async def test_state_file_written_after_the_drop(tmp_path: Path) -> None:
    """The state file's directory must be writable by --user (a private one
    here); one that is not gets a warning at start."""
    from tests.e2e.hostnet import user_runtime_dir

    uid = nobody_uid()
    with user_runtime_dir(NOBODY) as state_dir:
        state = state_dir / "vm.json"
        args = ["--backend", "loop", "--user", NOBODY, "--state-file", str(state)]
        async with trionet_process(tmp_path, *args) as (proc, ctl, log):
            features = DRIVER_FEATURES & ~F.bit(F.CTRL_VQ)
            async with guest_on(tmp_path / "vhost.sock", ctl, features):
                await until(state.exists, "the state file", every=0.05)
                assert json.loads(state.read_text())["active_pairs"] == 1
                assert state.stat().st_uid == uid
                assert_sandboxed(proc.pid, uid)
            assert "not writable" not in log.read_text()
    (tmp_path / "b").mkdir()
    args = ["--backend", "loop", "--user", NOBODY, "--state-file", str(tmp_path / "vm.json")]
    async with trionet_process(tmp_path / "b", *args) as (proc, ctl, log):
        assert "is not writable by uid" in log.read_text()
