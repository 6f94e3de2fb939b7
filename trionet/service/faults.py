"""Faults the service lived through, counted for ``trionet status`` (``faults``).

Each is also logged where it happens; none ends the process:

* ``vmm_errors``: connections ended by a protocol or I/O error of the VMM's;
* ``vmm_lost``: connections that ended with rings still running (the VMM was
  killed or crashed mid-traffic: a VMM that stops cleanly stops its rings first);
* ``tap_lost``: the tap went away under the running service (deleted, or moved
  away); frames to and from it are dropped and counted meanwhile;
* ``tap_recovered``: a tap of that name came back (re-created by its owner)
  and the queues were attached to it again;
* ``restored``: connections that resumed a running guest from ``--state-file``
  (a restarted trionet, or the VMM reconnecting).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import trio

log = logging.getLogger(__name__)

#: How often a backend that can lose its host side (the tap) is checked.
BACKEND_CHECK_INTERVAL = 1.0


@dataclass
class Faults:
    vmm_errors: int = 0
    vmm_lost: int = 0
    tap_lost: int = 0
    tap_recovered: int = 0
    restored: int = 0
    backend_problem: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Recoverable(Protocol):
    def lost(self) -> str | None: ...
    def reopen(self) -> list[int] | None: ...


async def watch_backend(
    backend: Recoverable,
    faults: Faults,
    swap: Callable[[list[int]], Awaitable[None]],
) -> None:
    """Notice the backend's host side going away (the kernel gives no event a
    sandboxed process could wait on for a tap deleted under it): one log line,
    one count, the reason in ``trionet status``.  Then try, at the same pace,
    to attach to a tap of that name again; once that works, ``swap`` restarts
    the pairs on the new queue fds and closes the old ones."""
    while True:
        await trio.sleep(BACKEND_CHECK_INTERVAL)
        if faults.backend_problem is None:
            problem = backend.lost()
            if problem is not None:
                faults.tap_lost += 1
                faults.backend_problem = problem
                log.error(
                    "%s: frames to and from the guest are dropped until a tap of that "
                    "name that this process may attach to is there again",
                    problem,
                )
            continue
        old = backend.reopen()
        if old is None:
            continue
        await swap(old)
        faults.tap_recovered += 1
        log.warning("%s: attached to the new one; traffic resumes", faults.backend_problem)
        faults.backend_problem = None
