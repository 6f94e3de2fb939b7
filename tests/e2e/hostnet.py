"""Host side of the end-to-end tests: network namespaces and the trionet service.

Everything started here is stopped by its pid; namespaces are always deleted.
"""

from __future__ import annotations

import os
import secrets
import shlex
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from tests.e2e.guest import REPO, GuestError, tail_lines


def _unique(prefix: str) -> str:
    return f"{prefix}{os.getpid() % 10000}-{secrets.token_hex(3)}"


async def sh(*argv: str, netns: str | None = None, check: bool = True) -> str:
    """Run a host command (optionally inside a netns); return its stdout."""
    full = ["ip", "netns", "exec", netns, *argv] if netns else list(argv)
    res = await trio.run_process(full, capture_stdout=True, capture_stderr=True, check=False)
    if check and res.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(full)} failed with status {res.returncode}: "
            f"{res.stderr.decode(errors='replace').strip()}"
        )
    return res.stdout.decode(errors="replace")


@asynccontextmanager
async def network_namespace(prefix: str = "tnet-") -> AsyncIterator[str]:
    """Create a uniquely named network namespace (lo up); always delete it on exit."""
    name = _unique(prefix)
    await sh("ip", "netns", "add", name)
    try:
        await sh("ip", "link", "set", "lo", "up", netns=name)
        yield name
    finally:
        with trio.CancelScope(shield=True):
            await sh("ip", "netns", "del", name, check=False)


async def wait_for_link(netns: str, ifname: str, timeout: float = 20) -> None:
    """Poll until network interface `ifname` exists inside `netns`."""
    with trio.move_on_after(timeout):
        while True:
            res = await trio.run_process(
                ["ip", "netns", "exec", netns, "ip", "link", "show", ifname],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            if res.returncode == 0:
                return
            await trio.sleep(0.1)
    raise GuestError(f"interface {ifname} did not appear in netns {netns} within {timeout} s")


class Trionet:
    """A trionet service process started by trionet_service()."""

    def __init__(self, proc: trio.Process, log_path: Path) -> None:
        self.proc = proc
        self.pid: int = proc.pid
        self.log_path = log_path

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def stderr(self) -> str:
        return self.log_path.read_text(errors="replace")


@asynccontextmanager
async def trionet_service(
    *,
    netns: str,
    socket_path: Path,
    tap: str,
    queue_pairs: int = 1,
    log_path: Path,
    extra_args: Sequence[str] = (),
    timeout: float = 30,
) -> AsyncIterator[Trionet]:
    """Run `python -m trionet --backend tap` inside `netns`; yield once its socket exists.

    On exit the service gets SIGTERM (SIGKILL after 10 s); check .returncode afterwards.
    """
    argv = ["ip", "netns", "exec", netns, sys.executable, "-m", "trionet"]
    argv += ["--socket-path", str(socket_path), "--backend", "tap", "--tap", tap]
    argv += ["--queue-pairs", str(queue_pairs), *extra_args]
    socket_path.unlink(missing_ok=True)  # a stale socket would look like a ready service
    with log_path.open("wb") as out:
        proc = await trio.lowlevel.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=str(REPO)
        )
    service = Trionet(proc, log_path)
    try:
        with trio.move_on_after(timeout) as scope:
            while not socket_path.exists():
                if proc.poll() is not None:
                    raise GuestError(
                        f"trionet exited with status {proc.returncode} before creating "
                        f"{socket_path}:\n{tail_lines(service.stderr())}"
                    )
                await trio.sleep(0.05)
        if scope.cancelled_caught:
            raise GuestError(
                f"trionet made no {socket_path} in {timeout} s:\n{tail_lines(service.stderr())}"
            )
        yield service
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.terminate()  # SIGTERM to the pid we started
                with trio.move_on_after(10):
                    await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
