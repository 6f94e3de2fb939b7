"""The control-queue task: virtio-net control commands handed to the backend.

QEMU, cloud-hypervisor and DPDK keep the control queue (vring 2N) for
themselves; other front-ends hand it over, and then this task serves it.  It
pops a command chain, lets the sans-IO ``ControlState`` judge it, applies the
outcome through the session (the same single operation the SET_VRING_ENABLE
path uses for the pair count), and writes the one-byte ack.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from trionet.errors import RingError
from trionet.memory import GuestMemory
from trionet.net.control import ERR, OK, CommandError, ControlState, Outcome
from trionet.service.datapath import PairContext, notify, wait_kick
from trionet.virtq.vring import READ_THEN_WRITE, Vring

log = logging.getLogger(__name__)


class ApplyError(Exception):
    """The host side could not apply a command: answered VIRTIO_NET_ERR."""


async def run_control(
    ctx: PairContext,
    vr: Vring,
    mem: GuestMemory,
    state: ControlState,
    apply: Callable[[Outcome], Awaitable[None]],
) -> None:
    try:
        while True:
            vr.disable_notify()
            while (chain := vr.pop(mem, READ_THEN_WRITE)) is not None:
                ack = await _command(chain.readable, state, apply)
                if chain.write_capacity < 1:
                    log.error("control command without room for its ack: completed unanswered")
                    vr.push(chain.head, 0)
                else:
                    vr.push(chain.head, chain.write(bytes([ack])))
                vr.publish()
                notify(ctx, vr)
            if vr.enable_notify():
                continue
            await wait_kick(ctx, vr)
    except RingError as exc:
        ctx.on_broken(vr, exc)
    except trio.ClosedResourceError:
        pass


async def _command(
    readable: bytes, state: ControlState, apply: Callable[[Outcome], Awaitable[None]]
) -> int:
    try:
        _, outcome = state.handle(readable)
    except CommandError as exc:
        log.warning("control queue: %s: VIRTIO_NET_ERR", exc)
        return ERR
    try:
        await apply(outcome)
    except ApplyError as exc:
        log.error("control queue: %s: VIRTIO_NET_ERR", exc)
        return ERR
    return OK
