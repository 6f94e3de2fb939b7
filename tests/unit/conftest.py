"""Fixtures shared by unit test modules: ``stack`` and ``listener`` for the
user stack's TCP tests (``test_user_tcp*.py``), ``make_fd`` for the vhost-user
codec tests (``test_vhost_user_codec*.py``)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator

import pytest
import trio

from tests.fakes.userguest import GUEST_MAC, make_config
from tests.unit.vhost_user_wire import Fds
from trionet.backends.user.stack import UserStack


@pytest.fixture
async def stack() -> AsyncIterator[UserStack]:
    """A user stack with two pairs, serving (no rings: frames in, outboxes out)."""
    st = UserStack(make_config(guest_mac=GUEST_MAC), 2)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(st.run)
            yield st
            nursery.cancel_scope.cancel()
    finally:
        st.close()


@pytest.fixture
async def listener() -> AsyncIterator[trio.socket.SocketType]:
    """A TCP listener on 127.0.0.1 (the host end of the test's connections)."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock
    sock.close()


@pytest.fixture
def make_fd() -> Iterator[Fds]:
    """Real fds (eventfds and pipe ends) for a codec test; those left open are closed."""
    fds = Fds()
    yield fds
    fds.close_all()
