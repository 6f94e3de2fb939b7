"""Shared fixtures: a trionet session served in-process to a scripted front-end."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tests.fakes.driver import GuestRam
from tests.fakes.frontend import Frontend
from tests.fakes.service_process import ServiceProcess
from trionet.backends.loop import LoopBackend
from trionet.service.server import Service, ServiceConfig


@pytest.fixture
def ram() -> AsyncIterator[GuestRam]:
    r = GuestRam()
    yield r  # type: ignore[misc]
    r.close()


@pytest.fixture(params=["trio", "threads"])
async def loop_service(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Service]:
    """The loop backend served both ways: per-pair Trio loops, and worker threads."""
    logging.getLogger("trionet").setLevel(logging.DEBUG)
    config = ServiceConfig(
        threads=request.param == "threads",
        queue_pairs=4,
        socket_path=tmp_path / "vhost.sock",
        control_socket=tmp_path / "control.sock",
    )
    service = Service(config, LoopBackend(config.queue_pairs))
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        yield service
        nursery.cancel_scope.cancel()


@pytest.fixture
async def frontend(loop_service: Service, ram: GuestRam) -> AsyncIterator[Frontend]:
    assert loop_service.config.socket_path is not None
    fe = await Frontend.connect(str(loop_service.config.socket_path), ram)
    yield fe
    fe.close()


def pytest_runtest_setup(item: pytest.Item) -> None:
    """``@pytest.mark.root`` tests fail (never skip) without root and /dev/net/tun."""
    from tests.netns import check_root_marker

    check_root_marker(item)


@pytest.fixture
async def trionet(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[ServiceProcess]:
    """``python -m trionet --backend loop --queue-pairs 4`` as its own process;
    extra command-line arguments by indirect parametrization."""
    proc = ServiceProcess(tmp_path, *getattr(request, "param", ()))
    try:
        await proc.started()
        yield proc
    finally:
        proc.stop()
