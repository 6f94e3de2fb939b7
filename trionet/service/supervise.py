"""The service's life as its supervisor sees it: start, ready, drain, exit.

``run_service`` starts the metrics endpoint (if asked), the service, then
says READY (sd_notify and/or ``--ready-fd``) once the vhost-user socket
listens.  The first SIGTERM, SIGINT or SIGHUP starts the drain: STOPPING=1,
no new VMM connection, every pair stopped between batches with the chains it
took handed back as used, all within ``grace`` seconds; then everything else
is cancelled and the process exits 0.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass

import trio

from trionet.service.lifecycle import Notifier
from trionet.service.metricsaddr import MetricsAddress
from trionet.service.server import Service

log = logging.getLogger("trionet")

DEFAULT_GRACE = 5.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@dataclass(frozen=True)
class RunOptions:
    metrics: MetricsAddress | None = None
    ready_fd: int | None = None
    grace: float = DEFAULT_GRACE


async def run_service(
    service: Service,
    opts: RunOptions,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    notifier = Notifier.from_env(os.environ, opts.ready_fd)
    service.on_change = lambda: notifier.status(service.summary())
    # What the receiver restores on exit, and where it redelivers signals it
    # queued but nobody read: a second SIGTERM during the drain must not kill
    # the exit half-way.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    try:
        with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
            async with trio.open_nursery() as nursery:
                if opts.metrics is not None:
                    from trionet.service.metrics import make_registry, serve_metrics

                    registry = make_registry(service.status, service.config.vm_id)
                    await nursery.start(serve_metrics, opts.metrics, registry)

                async def serve(*, task_status: trio.TaskStatus[None]) -> None:
                    await service.run(task_status=task_status)
                    nursery.cancel_scope.cancel()

                await nursery.start(serve)
                notifier.ready(service.summary())
                task_status.started()
                async for signum in signals:
                    log.info("%s: draining (grace %.1fs)", signal.Signals(signum).name, opts.grace)
                    notifier.stopping("draining")
                    await drain(service, opts.grace)
                    nursery.cancel_scope.cancel()
                    break
    finally:
        notifier.close()


async def drain(service: Service, grace: float) -> None:
    start = trio.current_time()
    with trio.move_on_after(grace) as scope:
        await service.drain()
    took = trio.current_time() - start
    if scope.cancelled_caught:
        log.warning("drain: grace of %.1fs over; stopping what is left", grace)
    else:
        log.info("drain: done in %.3fs; exiting", took)
