"""Waiting on state in tests, never on a fixed sleep.

What a test waits for is either an ``AsyncValue`` trionet keeps (the active
pair count: ``Session.pair_count``), awaited directly, or state another
thread or the guest's rings hold (a used index, a counter a worker thread
bumps), which ``until`` re-checks until it holds or a deadline passes.  A
deadline that passes fails the test with what it waited for."""

from __future__ import annotations

from collections.abc import Callable

import trio

from trionet.service.session import Session

TIMEOUT = 10.0


async def until(
    check: Callable[[], bool], what: str, timeout: float = TIMEOUT, every: float = 0.001
) -> None:
    """Return once ``check()`` holds (looked at every ``every`` seconds: state
    another process holds is asked for less often); fail the test after
    ``timeout`` seconds."""
    try:
        with trio.fail_after(timeout):
            while not check():
                await trio.sleep(every)
    except trio.TooSlowError:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None


async def pairs_become(session: Session, n: int, timeout: float = TIMEOUT) -> None:
    """Wait for the session's active pair count to be ``n``."""
    try:
        with trio.fail_after(timeout):
            await session.pair_count.wait_value(n)
    except trio.TooSlowError:
        raise AssertionError(f"active pairs stayed {session.active_pairs}, expected {n}") from None
