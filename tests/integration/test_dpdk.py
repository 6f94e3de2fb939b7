"""Interop with DPDK's virtio-user driver (dpdk-testpmd) as the vhost-user frontend.

trionet listens (server side, `--socket-path`); virtio-user connects to it as a client,
which is its default (`server=0`), so the frontend only needs
`--vdev net_virtio_user0,path=SOCKET,queues=N`.  testpmd runs without hugepages:
`--no-huge -m 1024 --no-pci --single-file-segments` plus a unique `--file-prefix`.
With `queues=N` and no control queue (virtio-user's default `cq=0`) DPDK enables every
vring with SET_VRING_ENABLE.

testpmd runs in io mode with `--tx-first`: it injects one burst per TX queue and then
sends back every frame it receives, so with trionet's loop backend frames circulate
guest TX -> trionet -> guest RX for as long as the run lasts.  The tests check that
they do: the port counters testpmd prints every second keep growing through the
run, and end far above the one burst injected (a loop that stalls after the first
burst, or after a few, fails).

dpdk-testpmd comes from `tools/setup` (Debian 12: the dpdk-dev package); without
it these tests fail, they do not skip.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.dpdk,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only"),
]

REPO = Path(__file__).resolve().parents[2]
#: testpmd prints port counters once a second; the run lasts until it has printed this many.
STATS_PERIODS = 6
BURST = 32  # testpmd's default burst: --tx-first injects one per TX queue
#: Stats periods (1 s each) at the end of the run in which RX and TX must both grow.
GROWING_PERIODS = 4


@pytest.fixture(autouse=True)
def require_testpmd() -> None:
    if shutil.which("dpdk-testpmd") is None:
        pytest.fail("dpdk-testpmd not found: run tools/setup (Debian 12: apt-get install dpdk-dev)")


def _stop(proc: subprocess.Popen[bytes], first: int, grace: float) -> None:
    for sig, wait in ((first, grace), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return "<no output>"


@contextlib.contextmanager
def _trionet(tmp_path: Path, queue_pairs: int) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    sock = tmp_path / "sock"
    log = tmp_path / "trionet.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trionet",
                "--socket-path",
                str(sock),
                "--backend",
                "loop",
                "--queue-pairs",
                str(queue_pairs),
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 20.0
        while not (sock.exists() and stat.S_ISSOCK(sock.stat().st_mode)):
            assert proc.poll() is None, f"trionet exited early:\n{_tail(log)}"
            assert time.monotonic() < deadline, f"trionet did not listen:\n{_tail(log)}"
            time.sleep(0.01)
        yield proc, sock
    finally:
        _stop(proc, signal.SIGTERM, 10.0)
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()


def _runtime_dir(prefix: str) -> Path:
    base = "/var/run" if os.geteuid() == 0 else os.environ.get("XDG_RUNTIME_DIR", "/tmp")
    return Path(base) / "dpdk" / prefix


def _run_testpmd(sock: Path, queues: int, tmp_path: Path) -> str:
    """Run virtio-user testpmd in io mode for STATS_PERIODS seconds, stop it with SIGINT (it then
    prints its forward statistics) and return its output."""
    cpu = max(os.sched_getaffinity(0))
    prefix = f"trionet-test-{os.getpid()}-{queues}"
    log = tmp_path / f"testpmd-q{queues}.log"
    # line-buffered stdout so the statistics reach the log file as they are printed
    stdbuf = ["stdbuf", "-oL"] if shutil.which("stdbuf") else []
    argv = [
        *stdbuf,
        "dpdk-testpmd",
        "--lcores",
        f"0@{cpu},1@{cpu}",
        "--no-huge",
        "-m",
        "1024",
        "--no-pci",
        "--single-file-segments",
        f"--file-prefix={prefix}",
        "--log-level=4",
        "--vdev",
        f"net_virtio_user0,path={sock},queues={queues}",
        "--",
        "--nb-cores=1",
        f"--rxq={queues}",
        f"--txq={queues}",
        "--forward-mode=io",
        "--tx-first",
        "--stats-period=1",
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        # EAL init plus the vhost-user handshake take a few seconds; then traffic
        # runs until testpmd has printed STATS_PERIODS sets of port counters (a
        # loaded machine prints them late: the run follows them, not a clock).
        deadline = time.monotonic() + 90.0
        while log.read_text(errors="replace").count("NIC statistics for port 0") < STATS_PERIODS:
            assert proc.poll() is None, f"testpmd exited early:\n{_tail(log)}"
            assert time.monotonic() < deadline, f"testpmd did not run:\n{_tail(log)}"
            time.sleep(0.1)
        assert proc.poll() is None, f"testpmd exited during the run:\n{_tail(log)}"
    finally:
        _stop(proc, signal.SIGINT, 15.0)
        shutil.rmtree(_runtime_dir(prefix), ignore_errors=True)
    assert proc.returncode == 0, f"testpmd exit status {proc.returncode}:\n{_tail(log)}"
    return log.read_text(errors="replace")


def _accumulated(output: str) -> tuple[int, int]:
    m = re.search(
        r"Accumulated forward statistics.*?RX-packets:\s*(\d+).*?TX-packets:\s*(\d+)",
        output,
        re.S,
    )
    assert m, f"no final statistics in testpmd output:\n{output[-3000:]}"
    return int(m.group(1)), int(m.group(2))


def _port_stats(output: str) -> list[tuple[int, int]]:
    """Port 0's (RX, TX) packet counters, once per stats period, in order."""
    blocks = re.findall(
        r"NIC statistics for port 0.*?RX-packets:\s*(\d+).*?TX-packets:\s*(\d+)", output, re.S
    )
    assert blocks, "no port statistics in testpmd output"
    return [(int(rx), int(tx)) for rx, tx in blocks]


def _assert_sustained(output: str, queues: int) -> None:
    """Traffic kept flowing to the end: both counters grew in each of the last
    GROWING_PERIODS stats periods, and ended far above the burst injected."""
    series = _port_stats(output)
    assert len(series) > GROWING_PERIODS, f"only {len(series)} stats periods: {series}"
    tail = series[-GROWING_PERIODS - 1 :]
    for (rx0, tx0), (rx1, tx1) in itertools.pairwise(tail):
        assert rx1 > rx0 and tx1 > tx0, f"traffic stalled: port counters per second {series}"
    rx, tx = series[-1]
    floor = 100 * BURST * queues
    assert rx > floor and tx > floor, f"{rx} RX / {tx} TX packets: not above {floor}: {series}"


def _per_queue(output: str) -> dict[int, tuple[int, int]]:
    found = re.findall(
        r"Forward Stats for RX Port=\s*0/Queue=\s*(\d+).*?RX-packets:\s*(\d+)"
        r".*?TX-packets:\s*(\d+)",
        output,
        re.S,
    )
    return {int(q): (int(rx), int(tx)) for q, rx, tx in found}


def test_virtio_user_loop_one_queue_pair(tmp_path: Path) -> None:
    with _trionet(tmp_path, 1) as (trionet, sock):
        output = _run_testpmd(sock, 1, tmp_path)
        time.sleep(0.5)
        assert trionet.poll() is None, (
            f"trionet died after testpmd left:\n{_tail(tmp_path / 'trionet.log')}"
        )
    rx, tx = _accumulated(output)
    assert tx > 100 * BURST, f"{tx} frames left the guest: traffic did not keep flowing"
    assert rx > 100 * BURST, f"{rx} frames came back through trionet's loop"
    _assert_sustained(output, 1)


def test_virtio_user_loop_four_queue_pairs(tmp_path: Path) -> None:
    with _trionet(tmp_path, 4) as (trionet, sock):
        output = _run_testpmd(sock, 4, tmp_path)
        time.sleep(0.5)
        assert trionet.poll() is None, (
            f"trionet died after testpmd left:\n{_tail(tmp_path / 'trionet.log')}"
        )
    rx, tx = _accumulated(output)
    assert tx > 400 * BURST and rx > 400 * BURST, f"{rx} RX / {tx} TX: traffic did not keep flowing"
    _assert_sustained(output, 4)
    queues = _per_queue(output)
    assert sorted(queues) == [0, 1, 2, 3], f"per-queue statistics missing: {queues}"
    for q, (q_rx, q_tx) in queues.items():
        # each pair's burst circulated, not just went round once
        assert q_tx > 10 * BURST, f"queue pair {q}: {q_tx} frames transmitted"
        assert q_rx > 10 * BURST, f"queue pair {q}: {q_rx} frames came back"
