"""A native loop on its own thread, owned by the Trio task that runs it; and
waiting on the eventfds such loops write.

The C loops (a pair's worker, a namespace's driver) run with the GIL
released and sleep in epoll on their fds, one of them a stop eventfd.  The
task that starts one writes that eventfd when it is cancelled and waits,
shielded, until the thread has returned: no thread outlives the task's
cancel scope, and no fd it uses is closed under it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import trio


async def run_native(
    loop: Callable[[Any], int], io: Any, *, limiter: trio.CapacityLimiter | None = None
) -> int:
    """``loop(io)`` on a thread with ``io.stop_fd`` set to a fresh eventfd,
    written when this task is cancelled; the loop's return value."""
    stop = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    io.stop_fd = stop
    rc = 0
    try:
        async with trio.open_nursery() as nursery:

            async def stopper() -> None:
                try:
                    await trio.sleep_forever()
                finally:
                    os.eventfd_write(stop, 1)

            nursery.start_soon(stopper)
            with trio.CancelScope(shield=True):
                rc = await trio.to_thread.run_sync(loop, io, limiter=limiter)
            nursery.cancel_scope.cancel()
    finally:
        os.close(stop)
    return rc


async def wait_eventfd(fd: int) -> int:
    """Until the (non-blocking) eventfd ``fd`` was written; its count, consumed."""
    while True:
        try:
            return os.eventfd_read(fd)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(fd)
