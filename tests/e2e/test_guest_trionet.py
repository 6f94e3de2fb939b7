"""End to end: a Linux guest's virtio-net served by trionet, with a tap in a netns.

    guest eth0 (10.0.2.15) --vhost-user--> trionet --tap tn0--> netns (10.0.2.1)

trionet runs inside the namespace (so its tap lands there); QEMU runs in the root
namespace and connects to trionet's socket. The test pings, then moves a random 1 MiB
file each way over HTTP with busybox httpd/wget and compares md5 sums.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from tests.e2e.guest import (
    Guest,
    GuestError,
    boot_guest,
    ensure_guest_image,
    prerequisite_problems,
)
from tests.e2e.hostnet import Trionet, network_namespace, sh, trionet_service, wait_for_link
from tests.integration.test_sandbox import assert_sandboxed

pytestmark = [pytest.mark.e2e, pytest.mark.root]

HOST_IP = "10.0.2.1"
GUEST_IP = "10.0.2.15"
TAP = "tn0"
BLOB_SIZE = 1 << 20


@asynccontextmanager
async def host_httpd(netns: str, root: Path, port: int, probe: str) -> AsyncIterator[None]:
    """busybox httpd in the foreground inside `netns`; killed by pid on exit."""
    argv = ["ip", "netns", "exec", netns, "busybox", "httpd", "-f"]
    argv += ["-p", f"{HOST_IP}:{port}", "-h", str(root)]
    proc = await trio.lowlevel.open_process(argv, stdin=subprocess.DEVNULL)
    url = f"http://{HOST_IP}:{port}/{probe}"
    try:
        with trio.fail_after(10):  # wait until it serves `probe` inside the namespace
            while True:
                if proc.poll() is not None:
                    raise GuestError(f"busybox httpd exited with status {proc.returncode}")
                wget = ["busybox", "wget", "-q", "-O", "/dev/null", url]
                res = await trio.run_process(
                    ["ip", "netns", "exec", netns, *wget], check=False, capture_stderr=True
                )
                if res.returncode == 0:
                    break
                await trio.sleep(0.1)
        yield
    finally:
        with trio.CancelScope(shield=True):
            proc.kill()
            await proc.wait()


async def guest_md5(guest: Guest, path: str) -> str:
    out = await guest.check(f"md5sum {path}")
    return out.split()[0]


async def transfer_host_to_guest(guest: Guest, netns: str, tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    blob = os.urandom(BLOB_SIZE)
    (www / "blob").write_bytes(blob)
    async with host_httpd(netns, www, 8080, "blob"):
        status, out = await guest.run(
            f"wget -q -O /tmp/blob http://{HOST_IP}:8080/blob", timeout=180
        )
        assert status == 0, f"guest wget failed: {out}"
    assert await guest_md5(guest, "/tmp/blob") == hashlib.md5(blob).hexdigest()


async def transfer_guest_to_host(guest: Guest, netns: str, tmp_path: Path) -> None:
    await guest.check("mkdir -p /var/www && dd if=/dev/urandom of=/var/www/up bs=64k count=16")
    want = await guest_md5(guest, "/var/www/up")
    await guest.check("httpd -p 8081 -h /var/www")  # daemonizes
    got = tmp_path / "up"
    with trio.fail_after(180):
        url = f"http://{GUEST_IP}:8081/up"
        await sh("busybox", "wget", "-q", "-O", str(got), url, netns=netns)
    data = got.read_bytes()
    assert len(data) == BLOB_SIZE
    assert hashlib.md5(data).hexdigest() == want


@pytest.mark.parametrize("threads", [False, True], ids=["trio", "threads"])
async def test_guest_traffic_through_trionet(tmp_path: Path, threads: bool) -> None:
    """Ping and file transfers both ways, with every pair served on the Trio
    thread and with ``--threads`` (native worker threads, as the benchmark runs)."""
    problems = prerequisite_problems()
    if problems:
        pytest.fail("e2e prerequisites missing: " + "; ".join(problems))
    await trio.to_thread.run_sync(ensure_guest_image)
    service: Trionet | None = None
    try:
        async with network_namespace("tne2e-") as ns:
            sock = tmp_path / "vhost.sock"
            log = tmp_path / "trionet.log"
            async with trionet_service(
                netns=ns,
                socket_path=sock,
                tap=TAP,
                queue_pairs=1,
                log_path=log,
                extra_args=["--threads"] if threads else [],
            ) as service:
                await wait_for_link(ns, TAP)
                await sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", TAP, netns=ns)
                await sh("ip", "link", "set", TAP, "up", netns=ns)
                console = tmp_path / "console.log"
                async with boot_guest(
                    netdev_args=None, vhost_user_socket=str(sock), log_path=console
                ) as guest:
                    print(f"guest booted in {guest.boot_seconds:.1f} s")
                    out = await guest.check("ethtool -i eth0")
                    assert "driver: virtio_net" in out
                    await guest.check(f"ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up")
                    status, out = await guest.run(f"ping -c 3 -W 5 {HOST_IP}", timeout=60)
                    print(out)
                    assert status == 0 and "3 packets received" in out, out
                    await transfer_host_to_guest(guest, ns, tmp_path)
                    await transfer_guest_to_host(guest, ns, tmp_path)
                    assert service.returncode is None, "trionet exited while serving the guest"
                    assert_sandboxed(service.pid, uid=None)  # root, but no capabilities
            assert service.returncode in (0, -15), f"trionet exit status {service.returncode}"
    finally:
        if service is not None:
            print(f"--- trionet (pid {service.pid}, status {service.returncode}) log ---")
            print(service.stderr())
