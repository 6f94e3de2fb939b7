"""End to end, user-mode backend, TCP: a guest on trionet's own stack talks TCP.

    guest eth0 --vhost-user--> trionet --backend user (as nobody) --> host loopback

1. a 20 MB file fetched by the guest's wget from an HTTP server on the host's
   127.0.0.1 through the gateway 10.0.2.2, its MD5 checked;
2. inbound ``-t 127.0.0.1/HPORT:8080``: the host fetches a page from busybox
   httpd in the guest, content checked;
3. iperf3 both ways between the guest and an iperf3 server on the host's
   127.0.0.1 (the rates are printed, not asserted: tests are not benchmarks).

Each runs with the pairs on the Trio thread and on worker threads
(``--threads``, the mode the benchmark uses).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.e2e.guest import boot_guest, ensure_guest_image, prerequisite_problems, tail_lines
from tests.e2e.hostnet import user_ids, user_runtime_dir, user_trionet_service
from tests.e2e.ports import free_ports
from tests.e2e.usernet import GATEWAY_V4, dhcp_lease, user_backend_args

pytestmark = [pytest.mark.e2e, pytest.mark.root]

USER = "nobody"
FILE_MB = 20
GUEST_HTTP_PORT = 8080
TEST_TIMEOUT = 400


async def _wait_listening(port: int, proc: trio.Process, what: str) -> None:
    with trio.fail_after(20):
        while True:
            if proc.returncode is not None:
                raise AssertionError(f"{what} exited with {proc.returncode}")
            try:
                s = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await s.aclose()
            return


def _fetch(port: int) -> bytes:
    """GET / from 127.0.0.1:port (blocking; run in a thread)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"GET /index.html HTTP/1.0\r\nHost: guest\r\n\r\n")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("threads", [False, True], ids=["trio", "threads"])
async def test_guest_tcp_on_user_backend(tmp_path: Path, threads: bool) -> None:
    problems = prerequisite_problems()
    if problems:
        pytest.fail("e2e prerequisites missing: " + "; ".join(problems))
    await trio.to_thread.run_sync(ensure_guest_image)
    user_ids(USER)
    web = tmp_path / "www"
    web.mkdir()
    blob = os.urandom(FILE_MB << 20)
    (web / "blob").write_bytes(blob)
    want_md5 = hashlib.md5(blob).hexdigest()
    http_port, iperf_port, inbound_port = free_ports(3)
    http = await trio.lowlevel.open_process(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(web),
         str(http_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    iperf = await trio.lowlevel.open_process(
        ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(iperf_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        with trio.fail_after(TEST_TIMEOUT), user_runtime_dir(USER) as rundir:
            await _wait_listening(http_port, http, "the host's HTTP server")
            await _wait_listening(iperf_port, iperf, "the host's iperf3 server")
            args = user_backend_args(dns_upstream_port=53)
            args += ["-t", f"127.0.0.1/{inbound_port}:{GUEST_HTTP_PORT}"]
            args += ["--threads"] if threads else []
            sock = rundir / "vhost.sock"
            async with (
                user_trionet_service(
                    socket_path=sock, log_path=tmp_path / "trionet.log", queue_pairs=1,
                    extra_args=args, user=USER,
                ) as service,
                boot_guest(
                    netdev_args=None, vhost_user_socket=str(sock), log_path=tmp_path / "console.log"
                ) as guest,
            ):  # fmt: skip

                def tails() -> str:
                    return (
                        f"--- trionet log ---\n{tail_lines(service.stderr(), 60)}\n"
                        f"--- console ---\n{tail_lines(guest.console, 30)}"
                    )

                lease = await dhcp_lease(guest)
                assert lease.router == GATEWAY_V4, lease.describe()

                # 1. wget a 20 MB file from the host's loopback through the gateway
                url = f"http://{GATEWAY_V4}:{http_port}/blob"
                status, out = await guest.run(
                    f"wget -q -O /tmp/blob {url} && md5sum /tmp/blob && rm /tmp/blob", timeout=240
                )
                assert status == 0, f"wget failed: {out}\n{tails()}"
                assert out.split()[0] == want_md5, f"{out}\n{tails()}"

                # 2. inbound -t: the host fetches a page from httpd in the guest
                page = "served by the guest through trionet -t\n"
                await guest.check(
                    f"mkdir -p /var/www && printf '{page}' > /var/www/index.html && "
                    f"httpd -p {GUEST_HTTP_PORT} -h /var/www"
                )
                reply = await trio.to_thread.run_sync(_fetch, inbound_port)
                assert reply.startswith(b"HTTP/1.") and reply.endswith(page.encode()), (
                    f"{reply[:300]!r}\n{tails()}"
                )

                # 3. iperf3 both ways (rates printed; correctness is that they complete)
                for reverse in ("", " -R"):
                    status, out = await guest.run(
                        f"iperf3 -c {GATEWAY_V4} -p {iperf_port} -t 3 -J{reverse}", timeout=60
                    )
                    assert status == 0, f"iperf3{reverse} failed: {out[-2000:]}\n{tails()}"
                    end = json.loads(out[out.index("{") :])["end"]
                    bps = end["sum_received"]["bits_per_second"]
                    way = "host -> guest" if reverse else "guest -> host"
                    print(f"iperf3 {way}: {bps / 1e6:.0f} Mbit/s")
                    assert end["sum_received"]["bytes"] > 0
            assert service.returncode in (0, -15), f"trionet exit status {service.returncode}"
    finally:
        for proc in (http, iperf):
            proc.terminate()
            await proc.wait()
