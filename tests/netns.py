"""Shared helpers for tests that need root, network namespaces and taps.

Usage in a test module::

    from tests.netns import ROOT, netns, ns_run, require_root  # ROOT uses the fixture

    pytestmark = ROOT          # marks every test @pytest.mark.root and checks
                               # the environment (fails, never skips)

    async def test_x():
        async with netns() as ns:
            await ns_run(ns, "ip", "link", "show")

A single test can use ``@root_test`` (``@pytest.mark.root`` plus
``@pytest.mark.usefixtures("require_root")``).  Either way the ``require_root``
fixture must be visible: import it into the test module (or a conftest).
A conftest may also call :func:`check_root_marker` from its
``pytest_runtest_setup`` hook so that the bare ``@pytest.mark.root`` suffices.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import pytest
import trio

__all__ = [
    "ROOT",
    "NsRunError",
    "check_root",
    "check_root_marker",
    "ip",
    "netns",
    "ns_run",
    "ns_run_sync",
    "require_root",
    "root_test",
    "unique_ifname",
]

_F = TypeVar("_F", bound=Callable[..., Any])

NS_PREFIX = "tn-test"


class NsRunError(subprocess.CalledProcessError):
    """A failed command; unlike its base class, the message shows stderr."""

    def __str__(self) -> str:
        err = self.stderr.decode(errors="replace").strip() if self.stderr else ""
        return f"{super().__str__()}: {err}"


def check_root() -> None:
    """Fail the calling test (not skip) unless root tests can run here."""
    problems = []
    if os.geteuid() != 0:
        problems.append(f"not running as root (euid {os.geteuid()})")
    if not os.path.exists("/dev/net/tun"):
        problems.append("/dev/net/tun is missing")
    if shutil.which("ip") is None:
        problems.append("the 'ip' command (iproute2) is not installed")
    if problems:
        pytest.fail(
            "this test is marked @pytest.mark.root and cannot run: "
            + "; ".join(problems)
            + " (deselect root tests with -m 'not root')",
            pytrace=False,
        )


def check_root_marker(item: pytest.Item) -> None:
    """For a conftest's ``pytest_runtest_setup``: check root-marked items."""
    if item.get_closest_marker("root") is not None:
        check_root()


@pytest.fixture
def require_root() -> None:
    check_root()


#: ``pytestmark = ROOT`` in a module: every test is a root test, checked up front.
ROOT = [pytest.mark.root, pytest.mark.usefixtures("require_root")]


def root_test(fn: _F) -> _F:
    """Decorator form of ``ROOT`` for a single test."""
    marked: _F = pytest.mark.usefixtures("require_root")(pytest.mark.root(fn))
    return marked


def unique_ifname(prefix: str = "tnt") -> str:
    """A fresh interface name (at most 15 bytes)."""
    name = f"{prefix}{secrets.token_hex(4)}"
    assert len(name) < 16, name
    return name


async def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """Run ``ip ARGS`` in the test process's own namespace."""
    proc = await trio.run_process(
        ["ip", *args], capture_stdout=True, capture_stderr=True, check=False
    )
    if check and proc.returncode != 0:
        raise NsRunError(proc.returncode, proc.args, proc.stdout, proc.stderr)
    return proc


async def ns_run(
    ns: str, *argv: str, check: bool = True, stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` inside namespace ``ns`` (``ip netns exec``); output captured.

    With ``check`` (the default) a non-zero exit raises ``CalledProcessError``
    whose message includes stderr.
    """
    proc = await trio.run_process(
        ["ip", "netns", "exec", ns, *argv],
        stdin=stdin,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    if check and proc.returncode != 0:
        raise NsRunError(proc.returncode, proc.args, proc.stdout, proc.stderr)
    return proc


def ns_run_sync(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """Synchronous :func:`ns_run` (for worker threads and plain fixtures)."""
    proc = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, check=False)
    if check and proc.returncode != 0:
        raise NsRunError(proc.returncode, proc.args, proc.stdout, proc.stderr)
    return proc


@asynccontextmanager
async def netns(prefix: str = NS_PREFIX) -> AsyncIterator[str]:
    """A new, uniquely named network namespace with ``lo`` up; always removed.

    Links still inside it when it goes away are destroyed by the kernel
    (virtual ones) or returned to the initial namespace (physical ones).
    """
    name = f"{prefix}-{secrets.token_hex(4)}"
    await trio.run_process(["ip", "netns", "add", name], capture_stderr=True)
    try:
        await ns_run(name, "ip", "link", "set", "lo", "up")
        yield name
    finally:
        with trio.CancelScope(shield=True):
            await trio.run_process(
                ["ip", "netns", "del", name],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
