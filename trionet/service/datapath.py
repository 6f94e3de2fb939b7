"""The per-queue-pair data path: Trio loops around the C core's batches.

Python runs once per batch (up to ``BATCH`` chains), never per packet, except
for the rare discard path of a started-but-disabled TX ring.  Each loop waits
on exactly one fd direction at a time (kick eventfd, or the tap queue fd), so
cancelling the pair's scope stops it at a point where the ring is consistent.
"""

from __future__ import annotations

import errno
import logging
import os
import select
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from trionet.errors import RingError
from trionet.memory import GuestMemory
from trionet.native import ffi, lib
from trionet.nativethread import run_native, wait_eventfd
from trionet.net import features as F
from trionet.service.counters import PairCounters
from trionet.virtq.vring import DEVICE_READS, Vring

if TYPE_CHECKING:
    from trionet.backends.user.fastpath import SlowFrames
    from trionet.backends.user.stack import UserStack

log = logging.getLogger(__name__)

BATCH = 256
# Busy-wait for more TX before sleeping: a kick/wake round trip costs tens of
# microseconds; a driver under load refills faster than that.  Only the worker
# threads spin (measured: spinning in the Trio path holds the event loop and
# loses more than it wins).
SPIN_NS_WORKER = 50_000
SPIN_NS_TRIO = 0
POLL_INTERVAL = 0.005  # a ring whose VMM gave no kick fd is polled
_ONE = (1).to_bytes(8, "little")


@dataclass
class PairContext:
    """What one queue pair's task needs; nothing in it is shared with another pair
    except guest memory (read-only here) and the device features."""

    index: int
    rx: Vring
    tx: Vring
    mem: GuestMemory
    features: int
    counters: PairCounters
    scratch: Any  # struct tn_scratch *, this pair's own
    mtu: int
    on_broken: Callable[[Vring, RingError], None]
    flows: Any = None  # struct tn_flows * shared by the VM's pairs, or NULL
    rx_filter: Any = None  # struct tn_rxfilter * when the driver's control queue is ours
    generate: bytes | None = None  # loop backend: Ethernet frame to keep RX full of

    def generated_frame(self) -> Any:
        """The generator's frame with a zeroed virtio-net header, as C memory."""
        assert self.generate is not None
        data = bytes(self.hdr_len) + self.generate
        buf = ffi.new("uint8_t[]", len(data))
        ffi.memmove(buf, data, len(data))
        return buf

    @property
    def hdr_len(self) -> int:
        return F.header_length(self.features)

    @property
    def mrg(self) -> int:
        return 1 if F.has(self.features, F.MRG_RXBUF) else 0

    def rx_room_needed(self) -> int:
        """RX room to have before taking a frame from the host side."""
        gso = any(F.has(self.features, b) for b in (F.GUEST_TSO4, F.GUEST_TSO6, F.GUEST_UFO))
        return self.hdr_len + (65535 + 18 if gso else self.mtu + 18)


def rx_flags(features: int) -> int:
    """What the driver takes on RX, for the user drains (``TN_RX_*``)."""
    flags = lib.TN_RX_DATA_VALID if F.has(features, F.GUEST_CSUM) else 0
    if F.has(features, F.GUEST_TSO4):
        flags |= lib.TN_RX_TSO4
    if F.has(features, F.GUEST_TSO6):
        flags |= lib.TN_RX_TSO6
    return int(flags)


def notify(ctx: PairContext, vr: Vring) -> None:
    """Interrupt the guest for ``vr`` if it wants one (EVENT_IDX / NO_INTERRUPT)."""
    if vr.call_fd is None or not vr.needs_notify():
        return
    try:
        os.write(vr.call_fd, _ONE)
        ctx.counters.notifications += 1
    except BlockingIOError:
        pass  # the eventfd counter is saturated: the guest has an interrupt pending
    except OSError as exc:
        log.warning("pair %d: call fd of vring %d: %s", ctx.index, vr.index, exc)


async def wait_kick(ctx: PairContext, vr: Vring) -> None:
    fd = vr.kick_fd
    if fd is None:
        await trio.sleep(POLL_INTERVAL)
        return
    while True:
        try:
            os.read(fd, 8)
            ctx.counters.kicks += 1
            return
        except BlockingIOError:
            await trio.lowlevel.wait_readable(fd)


async def wait_rx_room(ctx: PairContext, vr: Vring) -> None:
    """An RX ring without room for the next frame: sleep until the driver kicks
    after adding buffers, unless some raced in while notifications were off.
    Buffers the last try found too small are no news (the C core remembers
    how far it looked): a ring with some room but not enough sleeps too."""
    if vr.enable_notify():
        await trio.lowlevel.checkpoint()
    else:
        await wait_kick(ctx, vr)
    vr.disable_notify()


async def _guarded(ctx: PairContext, vr: Vring, loop: Callable[[], Any]) -> None:
    # A task's first step runs even when its scope was cancelled before it
    # started (the pair was reconfigured meanwhile): without this checkpoint a
    # stale loop would take the guest's chains under the old configuration.
    await trio.lowlevel.checkpoint_if_cancelled()
    try:
        await loop()
    except RingError as exc:
        ctx.on_broken(vr, exc)
    except trio.ClosedResourceError:
        pass  # an fd we waited on was replaced; the session restarts us


async def discard_tx(ctx: PairContext, reason: str) -> None:
    """A started TX ring that may not carry traffic (disabled, or its pair is
    outside the active count): process and discard, no side effects."""
    vr, table = ctx.tx, ctx.mem.table
    while True:
        # chains are walked and checked, never copied: what they claim to hold
        # is the guest's business
        while done := vr.check(lib.tn_vq_discard(vr.vq, table, DEVICE_READS, BATCH)):
            ctx.counters.drops[reason] += done
            notify(ctx, vr)  # an interrupt only for used entries the guest has not seen
            await trio.lowlevel.checkpoint()
        if vr.enable_notify():
            continue
        await wait_kick(ctx, vr)


async def loop_pair(ctx: PairContext, rx_on: bool) -> None:
    """Loop backend: TX frames back into this pair's RX ring, a batch at a time."""
    tx, rx = ctx.tx, ctx.rx
    tb = ffi.new("struct tn_batch *")
    rb = ffi.new("struct tn_batch *")
    rx_vq = rx.vq if rx_on else ffi.NULL
    hdr, mrg, table = ctx.hdr_len, ctx.mrg, ctx.mem.table
    flows = ctx.flows if ctx.flows is not None else ffi.NULL
    while True:
        tx.disable_notify()
        while True:
            rc = lib.tn_loop_batch(
                tx.vq, rx_vq, table, mrg, hdr, BATCH, ctx.scratch, tb, rb, flows, ctx.index
            )
            tx.check(rc)
            ctx.counters.add_tx(tb)
            ctx.counters.add_rx(rb)
            if rc:
                notify(ctx, tx)
            if rb.packets:
                notify(ctx, rx)
            if rx_on and rx.vq.broken:
                rx_on, rx_vq = False, ffi.NULL
                try:
                    rx.check(rx.vq.error)
                except RingError as exc:
                    ctx.on_broken(rx, exc)
            if tb.ring_empty and not lib.tn_vq_spin(tx.vq, SPIN_NS_TRIO):
                break
            await trio.lowlevel.checkpoint()
        if tx.enable_notify():
            continue
        await wait_kick(ctx, tx)


async def generate_rx(ctx: PairContext) -> None:
    """Loop backend's generator: keep this pair's RX ring full of one frame."""
    vr = ctx.rx
    assert ctx.generate is not None
    frame = ctx.generated_frame()
    n = len(frame)
    b = ffi.new("struct tn_batch *")
    hdr, mrg, table = ctx.hdr_len, ctx.mrg, ctx.mem.table
    vr.disable_notify()
    while True:
        rc = lib.tn_rx_fill(vr.vq, table, mrg, hdr, frame, n, BATCH, ctx.scratch, b)
        vr.check(rc)
        ctx.counters.add_rx(b)
        if rc:
            notify(ctx, vr)
        if b.ring_full:
            await wait_rx_room(ctx, vr)
            continue
        await trio.lowlevel.checkpoint()


async def tap_tx(ctx: PairContext, fd: int) -> None:
    """Guest TX → tap queue ``fd``; EAGAIN holds the descriptors until writable."""
    vr = ctx.tx
    b = ffi.new("struct tn_batch *")
    hdr, table = ctx.hdr_len, ctx.mem.table
    flows = ctx.flows if ctx.flows is not None else ffi.NULL
    while True:
        vr.disable_notify()
        while True:
            rc = lib.tn_tx_to_fd(vr.vq, table, fd, hdr, BATCH, b, flows, ctx.index)
            vr.check(rc)
            ctx.counters.add_tx(b)
            if rc:
                notify(ctx, vr)
            if b.fd_blocked:
                await trio.lowlevel.wait_writable(fd)
                continue
            if b.ring_empty and not lib.tn_vq_spin(vr.vq, SPIN_NS_TRIO):
                break
            await trio.lowlevel.checkpoint()
        if vr.enable_notify():
            continue
        await wait_kick(ctx, vr)


async def tap_rx(ctx: PairContext, fd: int) -> None:
    """Tap queue ``fd`` → guest RX; a full RX ring stops reading the tap."""
    vr = ctx.rx
    b = ffi.new("struct tn_batch *")
    hdr, mrg, table, need = ctx.hdr_len, ctx.mrg, ctx.mem.table, ctx.rx_room_needed()
    rx_filter = ctx.rx_filter if ctx.rx_filter is not None else ffi.NULL
    vr.disable_notify()
    while True:
        rc = lib.tn_rx_from_fd(vr.vq, table, fd, mrg, hdr, need, BATCH, ctx.scratch, b, rx_filter)
        vr.check(rc)
        ctx.counters.add_rx(b)
        if rc:
            notify(ctx, vr)
        if b.ring_full:
            await wait_rx_room(ctx, vr)
            continue
        if b.fd_blocked:
            if b.drops_io and b.last_errno == errno.EBADFD:
                # the tap was deleted under us: the fd stays readable (POLLERR)
                # forever; the service's backend watch reports it
                log.error("pair %d: tap read: %s; receive stopped", ctx.index, "tap gone")
                await trio.sleep_forever()
            if b.drops_io:
                log.warning("pair %d: tap read: %s", ctx.index, os.strerror(b.last_errno))
                await trio.sleep(0.1)
            await trio.lowlevel.wait_readable(fd)
            continue
        await trio.lowlevel.checkpoint()


async def user_tx(ctx: PairContext, stack: UserStack) -> None:
    """Guest TX → the user stack: the native path sends known UDP flows'
    datagrams itself and hands every other frame over in ``slow``."""
    vr = ctx.tx
    b = ffi.new("struct tn_batch *")
    slow = stack.slow_frames(ctx.index)
    hdr, table, utable = ctx.hdr_len, ctx.mem.table, stack.fast.table
    while True:
        vr.disable_notify()
        while True:
            rc = lib.tn_user_tx(vr.vq, table, hdr, BATCH, utable, ctx.index, slow.cdata, b)
            vr.check(rc)
            ctx.counters.add_tx(b)
            stack.take_slow(slow)
            if rc:
                notify(ctx, vr)
            if b.ring_empty and not slow.full:
                break
            await trio.lowlevel.checkpoint()
        if vr.enable_notify():
            continue
        await wait_kick(ctx, vr)


async def user_rx(ctx: PairContext, stack: UserStack) -> None:
    """The user stack → guest RX: frames in the pair's outbox (answers,
    first datagrams, ICMP), then the datagrams of the UDP flows homed on this
    pair, read natively.  Waits on one epoll fd holding both."""
    vr, p = ctx.rx, ctx.index
    box = stack.outboxes[p]
    b = ffi.new("struct tn_batch *")
    hdr, mrg, table, utable = ctx.hdr_len, ctx.mrg, ctx.mem.table, stack.fast.table
    data_valid = rx_flags(ctx.features)
    waker = select.epoll()
    waker.register(box.wake_fd, select.EPOLLIN)
    waker.register(stack.fast.epoll_fd(p), select.EPOLLIN)
    stack.rx_served[p] += 1
    try:
        vr.disable_notify()
        while True:
            done = vr.check(lib.tn_uout_drain(box.cdata, vr.vq, table, mrg, hdr, data_valid,
                                              BATCH, ctx.scratch, b))  # fmt: skip
            ctx.counters.add_rx(b)
            full = b.ring_full
            if not full:
                done += vr.check(
                    lib.tn_user_rx(vr.vq, table, mrg, hdr, data_valid, utable, p, BATCH,
                                   ctx.scratch, b)
                )  # fmt: skip
                ctx.counters.add_rx(b)
                full = b.ring_full
                if utable.nattention:
                    stack.udp.errors()
                stack.tcp.take_fast()  # host data C left to Python (tn_tcp_ready)
            if done:
                notify(ctx, vr)
            if full:
                await wait_rx_room(ctx, vr)
                continue
            if not box and b.fd_blocked:
                await trio.lowlevel.wait_readable(waker.fileno())
            else:
                await trio.lowlevel.checkpoint()
    finally:
        stack.rx_served[p] -= 1
        waker.close()


_WORKERS = trio.CapacityLimiter(64)


def _fd(fd: int | None) -> int:
    return -1 if fd is None else fd


async def run_worker(ctx: PairContext, *, tx_live: bool, rx_live: bool, tap_fd: int | None) -> None:
    """The pair's live rings served by a native worker thread (GIL released).

    This task owns the thread: it starts it, and on cancellation writes the
    worker's stop eventfd and waits (shielded) until the thread has returned,
    so no worker outlives the pair's cancel scope."""
    await trio.lowlevel.checkpoint_if_cancelled()  # see _guarded
    io = ffi.new("struct tn_pair_io *")
    io.tx = ctx.tx.vq if tx_live else ffi.NULL
    io.rx = ctx.rx.vq if rx_live else ffi.NULL
    io.mem, io.scratch, io.stats = ctx.mem.table, ctx.scratch, ctx.counters.native
    io.flows = ctx.flows if ctx.flows is not None else ffi.NULL
    io.filter = ctx.rx_filter if ctx.rx_filter is not None else ffi.NULL
    io.tx_kick, io.tx_call = _fd(ctx.tx.kick_fd), _fd(ctx.tx.call_fd)
    io.rx_kick, io.rx_call = _fd(ctx.rx.kick_fd), _fd(ctx.rx.call_fd)
    io.tap_fd = _fd(tap_fd)
    io.hdr_len, io.need, io.batch = ctx.hdr_len, ctx.rx_room_needed(), BATCH
    io.spin_ns = SPIN_NS_WORKER
    io.pair, io.mrg = ctx.index, ctx.mrg
    frame = ctx.generated_frame() if ctx.generate is not None and tap_fd is None else None
    if frame is not None:
        io.gen, io.gen_len = frame, len(frame)
    rc = await run_native(lib.tn_pair_run, io, limiter=_WORKERS)
    if rc < 0:
        vr = ctx.rx if io.error_ring else ctx.tx
        try:
            vr.check(rc)
        except RingError as exc:
            ctx.on_broken(vr, exc)


async def _user_slow(io: Any, stack: UserStack, slow: SlowFrames) -> None:
    """A user pair's worker asked for Python: dispatch the frames it handed
    over in ``slow`` and give the buffer back; read the flows' socket errors."""
    fd = int(io.slow_fd)
    while True:
        await wait_eventfd(fd)
        if lib.tn_user_pair_handed(io):
            stack.take_slow(slow)
            lib.tn_user_pair_resume(io)
        else:
            stack.tcp.take_fast()
        if stack.fast.table.nattention or stack.fast.table.attention_overflow:
            stack.udp.errors()


async def run_user_worker(
    ctx: PairContext, stack: UserStack, *, tx_live: bool, rx_live: bool
) -> None:
    """A user-mode pair served by a native worker thread (``--threads``): the
    same batches as ``user_tx`` / ``user_rx`` (``tn_user_tx``,
    ``tn_uout_drain``, ``tn_user_rx``) on their own thread, the GIL released.
    Frames for the stack come back through the pair's ``SlowFrames``, handed
    over on an eventfd that a task here waits on.  Owned like ``run_worker``:
    stopped through its stop eventfd and joined, shielded, before this returns."""
    await trio.lowlevel.checkpoint_if_cancelled()  # see _guarded
    p = ctx.index
    slow = stack.slow_frames(p)
    stack.take_slow(slow)  # what a previous run handed over and nobody took
    io = ffi.new("struct tn_upair_io *")
    io.tx = ctx.tx.vq if tx_live else ffi.NULL
    io.rx = ctx.rx.vq if rx_live else ffi.NULL
    io.mem, io.scratch, io.stats = ctx.mem.table, ctx.scratch, ctx.counters.native
    io.table, io.slow, io.out = stack.fast.table, slow.cdata, stack.outboxes[p].cdata
    io.tx_kick, io.tx_call = _fd(ctx.tx.kick_fd), _fd(ctx.tx.call_fd)
    io.rx_kick, io.rx_call = _fd(ctx.rx.kick_fd), _fd(ctx.rx.call_fd)
    io.hdr_len, io.batch, io.spin_ns = ctx.hdr_len, BATCH, SPIN_NS_WORKER
    io.pair, io.mrg = p, ctx.mrg
    io.data_valid = rx_flags(ctx.features)
    fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(2)]
    io.slow_fd, io.resume_fd = fds
    rc = 0
    stack.rx_served[p] += rx_live
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_user_slow, io, stack, slow)
            rc = await run_native(lib.tn_user_pair_run, io, limiter=_WORKERS)
            nursery.cancel_scope.cancel()
    finally:
        stack.rx_served[p] -= rx_live
        for fd in fds:
            os.close(fd)
    if rc < 0:
        vr = ctx.rx if io.error_ring else ctx.tx
        try:
            vr.check(rc)
        except RingError as exc:
            ctx.on_broken(vr, exc)


async def run_pair(
    ctx: PairContext,
    *,
    active: bool,
    tap_fd: int | None,
    threaded: bool = False,
    stack: UserStack | None = None,
) -> None:
    """Serve one queue pair until cancelled.

    ``active``: the pair is within the active pair count.  A TX ring that is
    started but disabled (or outside the active count) is drained and
    discarded; an RX ring in that state gets nothing."""
    tx_on = ctx.tx.runnable
    tx_live = tx_on and ctx.tx.enabled and active
    rx_live = ctx.rx.runnable and ctx.rx.enabled and active
    async with trio.open_nursery() as nursery:
        if tx_on and not tx_live:
            reason = "tx_pair_inactive" if ctx.tx.enabled else "tx_ring_disabled"
            nursery.start_soon(_guarded, ctx, ctx.tx, lambda: discard_tx(ctx, reason))
        generate = rx_live and tap_fd is None and ctx.generate is not None
        if stack is not None and threaded:
            if tx_live or rx_live:
                nursery.start_soon(
                    lambda: run_user_worker(ctx, stack, tx_live=tx_live, rx_live=rx_live)
                )
        elif stack is not None:
            if tx_live:
                nursery.start_soon(_guarded, ctx, ctx.tx, lambda: user_tx(ctx, stack))
            if rx_live:
                nursery.start_soon(_guarded, ctx, ctx.rx, lambda: user_rx(ctx, stack))
        elif threaded:
            if tx_live or (rx_live and tap_fd is not None) or generate:
                nursery.start_soon(
                    lambda: run_worker(ctx, tx_live=tx_live, rx_live=rx_live, tap_fd=tap_fd)
                )
        elif tap_fd is None:
            if tx_live:
                nursery.start_soon(_guarded, ctx, ctx.tx, lambda: loop_pair(ctx, rx_live))
            if generate:
                nursery.start_soon(_guarded, ctx, ctx.rx, lambda: generate_rx(ctx))
        elif tap_fd is not None:
            fd = tap_fd
            if tx_live:
                nursery.start_soon(_guarded, ctx, ctx.tx, lambda: tap_tx(ctx, fd))
            if rx_live:
                nursery.start_soon(_guarded, ctx, ctx.rx, lambda: tap_rx(ctx, fd))
