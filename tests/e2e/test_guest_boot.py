"""Prove the guest image and the QEMU harness work, independently of trionet.

QEMU's own tap backend is used: the test creates a tap inside a fresh network namespace
(10.0.2.1/24) and runs QEMU inside that namespace so QEMU can attach to the tap.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.e2e.guest import Guest, boot_guest, ensure_guest_image, prerequisite_problems
from tests.e2e.hostnet import network_namespace, sh

pytestmark = [pytest.mark.e2e, pytest.mark.root]

HOST_IP = "10.0.2.1"
GUEST_IP = "10.0.2.15"


def require_prerequisites() -> None:
    problems = prerequisite_problems()
    if problems:
        pytest.fail("e2e prerequisites missing: " + "; ".join(problems))


async def configure_guest_net(guest: Guest) -> None:
    await guest.check(f"ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up")


async def test_guest_boots_and_pings_over_qemu_tap(tmp_path: Path) -> None:
    require_prerequisites()
    await trio.to_thread.run_sync(ensure_guest_image)
    async with network_namespace("tnboot-") as ns:
        await sh("ip", "tuntap", "add", "dev", "tap0", "mode", "tap", netns=ns)
        await sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", "tap0", netns=ns)
        await sh("ip", "link", "set", "tap0", "up", netns=ns)
        netdev = ["-netdev", "tap,id=net0,ifname=tap0,script=no,downscript=no,vhost=off"]
        log = tmp_path / "console.log"
        async with boot_guest(netdev_args=netdev, netns=ns, log_path=log) as guest:
            print(f"guest booted to shell in {guest.boot_seconds:.1f} s (log: {log})")
            status, out = await guest.run("ethtool -i eth0")
            assert status == 0, out
            assert "driver: virtio_net" in out
            status, out = await guest.run("exit 3")
            assert status == 3
            await configure_guest_net(guest)
            status, out = await guest.run(f"ping -c 3 -W 5 {HOST_IP}", timeout=60)
            assert status == 0, out
            assert "3 packets received" in out, out
            # The host side sees the guest too.
            out = await sh("busybox", "ping", "-c", "1", "-W", "5", GUEST_IP, netns=ns)
            assert "1 packets received" in out, out
