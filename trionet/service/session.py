"""One VMM connection = one VM session: the nursery that owns every pair task.

The reader task decodes requests (sans-IO codec), applies them to the device
(sans-IO ``BackendProtocol``), replies, then *reconciles*: every queue pair
whose rings, memory, features or active state changed gets its task's cancel
scope cancelled and a fresh task started.  Old and new task never overlap: a
new task first waits for its predecessor's ``done`` event.  fds the protocol
retires are closed only after ``notify_closing`` woke their waiters.
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio
from trio_util import AsyncValue

from trionet.backends.user import UserBackend
from trionet.errors import ProtocolError, RemoteProtocolError, RingError
from trionet.memory import close_fds
from trionet.native import ffi
from trionet.net import features as F
from trionet.net.control import GUEST_OFFLOAD_BITS, ControlState, Outcome, write_filter
from trionet.net.flows import FlowTable
from trionet.net.multiqueue import ActivePairPolicy
from trionet.service.control_task import ApplyError, run_control
from trionet.service.counters import PairCounters
from trionet.service.datapath import PairContext, run_pair
from trionet.service.state import StateFile
from trionet.vhost_user import messages as m
from trionet.vhost_user.backend import STATUS_DRIVER_OK, BackendProtocol
from trionet.vhost_user.codec import RequestDecoder
from trionet.vhost_user.constants import ProtocolFeature
from trionet.virtq.vring import Vring

log = logging.getLogger(__name__)

MAX_FDS = 8
RECV_SIZE = 65536


class HostBackend(Protocol):
    """What a host-side backend gives a session (tap, loop, a test's fake)."""

    @property
    def name(self) -> str: ...

    async def open(self) -> None: ...
    async def aclose(self) -> None: ...
    def offered_features(self) -> int: ...
    def set_features(self, features: int) -> None: ...
    async def set_active_pairs(self, n: int) -> None: ...


@dataclass
class PairSlot:
    key: tuple[Any, ...] | None = None
    scope: trio.CancelScope | None = None
    done: trio.Event = field(default_factory=trio.Event)

    def __post_init__(self) -> None:
        self.done.set()  # nothing running yet


class Session:
    def __init__(
        self,
        sock: trio.socket.SocketType,
        backend: HostBackend,
        *,
        max_pairs: int,
        mtu: int = 1500,
        state: StateFile | None = None,
        counters: list[PairCounters] | None = None,
        threaded: bool = False,
    ) -> None:
        self.sock = sock
        self.backend = backend
        self.max_pairs = max_pairs
        self.mtu = mtu
        self.state = state
        self.threaded = threaded
        offered = F.BASE_FEATURES | backend.offered_features()
        self.proto = BackendProtocol(max_pairs=max_pairs, offered_features=offered)
        self.decoder = RequestDecoder()
        self.counters = counters or [PairCounters() for _ in range(max_pairs)]
        # one slot per queue pair, and the last one for the control queue
        self.slots = [PairSlot() for _ in range(max_pairs + 1)]
        self.flows = FlowTable()
        self.control = ControlState(0, max_pairs)
        self.rx_filter = ffi.new("struct tn_rxfilter *")
        write_filter(self.control, self.rx_filter)
        self.control_counters = PairCounters()
        self._scratch: list[Any] = [None] * max_pairs
        restore = state.restore_target(max_pairs) if state is not None else None
        self.policy = ActivePairPolicy(max_pairs, restore_target=restore)
        #: The active queue pair count, for tasks (and tests) to wait on.
        self.pair_count: AsyncValue[int] = AsyncValue(1)
        self.active_changes: list[tuple[int, str]] = []
        self._nursery: trio.Nursery | None = None
        self._activated = False
        self._activation_pairs = 1
        self._enables_pending = False
        self._host_applied = False  # the backend has not been told a count yet
        self.stack = backend.stack if isinstance(backend, UserBackend) else None
        self.rings_broken = 0
        self.announces = 0  # SEND_RARP requests (after a migration)
        self.on_change: Callable[[], None] | None = None  # the active pair count changed
        self._draining = False
        self.error: str | None = None  # why the VMM's connection failed, if it did

    @property
    def active_pairs(self) -> int:
        """Pairs 0..n-1 carry traffic (``pair_count`` to wait for a value)."""
        return int(self.pair_count.value)

    # ---- lifecycle ------------------------------------------------------------

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                if self.stack is not None:
                    await nursery.start(self.stack.run)
                self._nursery = nursery
                try:
                    await self._serve()
                except OSError as exc:  # the VMM went away mid-conversation (EPIPE, ECONNRESET)
                    log.error("VMM connection failed: %s; closing it", exc)
                    self.error = str(exc)
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        self.decoder.close()
        fds = self.proto.take_retired_fds()
        for vr in self.proto.vrings:
            fds += [fd for fd in (vr.kick_fd, vr.call_fd, vr.err_fd) if fd is not None]
            vr.kick_fd = vr.call_fd = vr.err_fd = None
        close_fds(fds)
        self.proto.memory.clear()

    async def _serve(self) -> None:
        while True:
            try:
                data, fds = await self._recv()
            except RemoteProtocolError as exc:
                log.error("vhost-user: %s; closing the connection", exc)
                self.error = str(exc)
                return
            if not data:
                close_fds(fds)
                log.info("VMM closed the connection")
                return
            try:
                self.decoder.feed(data, fds)
            except ProtocolError as exc:
                log.error("vhost-user: %s; closing the connection", exc)
                self.error = str(exc)
                return
            while True:
                try:
                    req = self.decoder.next_request()
                except ProtocolError as exc:
                    log.error("vhost-user: malformed message: %s; closing the connection", exc)
                    self.error = str(exc)
                    return
                if req is None:
                    break
                if not await self._handle(req):
                    return

    async def _recv(self) -> tuple[bytes, list[int]]:
        data, anc, flags, _ = await self.sock.recvmsg(
            RECV_SIZE, socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC
        )
        fds: list[int] = []
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                fds.extend(arr)
        for fd in fds:
            os.set_blocking(fd, False)
        if flags & socket.MSG_CTRUNC:
            close_fds(fds)
            raise RemoteProtocolError("VMM sent more fds than a message may carry")
        return data, fds

    async def _send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            sent = await self.sock.send(view)
            view = view[sent:]

    async def _handle(self, req: Any) -> bool:
        """Apply one request; False when the connection must close."""
        log.debug("request %s", req)
        if self.threaded and type(req) in _QUIESCE:
            await self._stop_pairs()
        try:
            reply = self.proto.handle(req)
        except RemoteProtocolError as exc:
            log.error("vhost-user: %s", exc)
            if exc.reply is not None:
                await self._send(exc.reply)
            self._after_request()
            if exc.fatal:
                self.error = str(exc)
            return not exc.fatal
        self._after_request()
        events = self.proto.take_events()
        await self._device_events(events)
        if reply is not None:
            await self._send(reply)
        return True

    def _after_request(self) -> None:
        self.reconcile()
        for fd in self.proto.take_retired_fds():
            trio.lowlevel.notify_closing(fd)
            close_fds([fd])

    # ---- device events: activation, active pair count -------------------------

    async def _device_events(self, ev: Any) -> None:
        for cause in ev.resets:
            self._activated = False
            self._activation_pairs = self.policy.activation_target()
            try:
                await self.apply_active_pairs(self._activation_pairs, f"device reset ({cause})")
            except ApplyError as exc:
                log.error("device reset: %s", exc)
        if ev.features_set:
            self.control = ControlState(self.proto.features, self.max_pairs)
            write_filter(self.control, self.rx_filter)
        if ev.features_set and not self._activated:
            self._activated = True
            self.backend.set_features(self.proto.features)
            self._activation_pairs = self.policy.activation_target()
            try:
                await self.apply_active_pairs(self._activation_pairs, "driver negotiated features")
            except ApplyError as exc:
                log.error("activation: %s", exc)
        elif ev.features_set:
            self.backend.set_features(self.proto.features)
        if ev.enable_changes and self.proto.vrings[2 * self.max_pairs].started:
            log.debug("SET_VRING_ENABLE: the control queue is ours, it sets the pair count")
        elif ev.enable_changes and self._awaiting_driver_ok():
            # QEMU replays a running guest's enables pair by pair *before* it sets
            # up those rings (reconnect): counting each would undo a restored count
            # and churn the tap queues.  Count once, at DRIVER_OK.
            self._enables_pending = True
        elif ev.enable_changes:
            idx, on = ev.enable_changes[-1]
            await self._apply_enables(f"SET_VRING_ENABLE {idx}={int(on)}")
        if ev.driver_ok and self._enables_pending:
            self._enables_pending = False
            await self._apply_enables("DRIVER_OK after SET_VRING_ENABLE")
        if ev.mtu is not None:
            self.mtu = ev.mtu
            self.reconcile(force=True)
        if ev.rarp is not None:
            self._announce(ev.rarp)

    def _control_is_ours(self) -> bool:
        return bool(self.proto.vrings[2 * self.max_pairs].started)

    def _awaiting_driver_ok(self) -> bool:
        """With the STATUS protocol feature, the device is not running before DRIVER_OK."""
        has_status = bool(self.proto.protocol_features & ProtocolFeature.STATUS)
        return has_status and not self.proto.status & STATUS_DRIVER_OK

    async def _apply_enables(self, cause: str) -> None:
        vr = self.proto.vrings
        n = self.policy.count_from_enables(
            [vr[2 * p].enabled for p in range(self.max_pairs)],
            [vr[2 * p + 1].enabled for p in range(self.max_pairs)],
        )
        try:
            await self.apply_active_pairs(n, cause)
        except ApplyError as exc:
            log.error("SET_VRING_ENABLE: %s", exc)

    def _announce(self, mac: bytes) -> None:
        """SEND_RARP: broadcast a RARP for the guest's MAC on the host side, so
        switches learn where the (migrated) guest now is."""
        self.announces += 1
        if self.stack is not None and self.stack.guest_mac is None:
            self.stack.guest_mac = mac  # the user stack has no switch: it learns the MAC
        fd = self._tap_fd(0)
        if fd is None:
            log.info("SEND_RARP for %s: no host link to announce on", mac.hex(":"))
            return
        rarp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 3, mac, bytes(4), mac, bytes(4))
        frame = bytes(12) + b"\xff" * 6 + mac + b"\x80\x35" + rarp
        frame += bytes(12 + 60 - len(frame))
        try:
            os.write(fd, frame)
            log.info("SEND_RARP: announced %s", mac.hex(":"))
        except OSError as exc:
            log.warning("SEND_RARP for %s: %s", mac.hex(":"), exc)

    async def apply_active_pairs(self, n: int, cause: str) -> None:
        """The one operation that changes how many pairs carry traffic."""
        n = max(1, min(n, self.max_pairs))
        if n == self.active_pairs and self._host_applied:
            log.debug("active queue pairs stay %d (%s)", n, cause)
            return
        old = self.active_pairs
        try:
            await self.backend.set_active_pairs(n)
        except Exception as exc:  # the backend's own error type; all mean "not applied"
            raise ApplyError(f"{self.backend.name} cannot apply {n} active pairs: {exc}") from exc
        self.pair_count.value = n
        self._host_applied = True
        self.active_changes.append((n, cause))
        moved = self.flows.rehome(n)
        log.info("active queue pairs %d -> %d (%s); %d flows re-homed", old, n, cause, moved)
        if self.state is not None:
            self.state.record(active_pairs=n, max_pairs=self.max_pairs)
        if self.on_change is not None:
            self.on_change()
        self.reconcile()

    async def apply_control(self, outcome: Outcome) -> None:
        """What a control-queue command asks of the host side."""
        write_filter(self.control, self.rx_filter)  # RX/MAC classes: filter at once
        if outcome.set_pairs is not None:
            self.control.pairs_set = outcome.set_pairs
            await self.apply_active_pairs(outcome.set_pairs, "VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET")
        if outcome.guest_offloads is not None:
            features = (self.proto.features & ~GUEST_OFFLOAD_BITS) | outcome.guest_offloads
            try:
                self.backend.set_features(features)
            except Exception as exc:
                raise ApplyError(f"guest offloads {outcome.guest_offloads:#x}: {exc}") from exc

    # ---- pair tasks ---------------------------------------------------------------

    def pair_key(self, p: int) -> tuple[Any, ...] | None:
        if p == self.max_pairs:
            ctrl = self.proto.vrings[2 * p]
            if not ctrl.runnable or len(self.proto.memory) == 0:
                return None
            return (ctrl.generation, self.proto.memory.generation, self.proto.features)
        rx, tx = self.proto.vrings[2 * p], self.proto.vrings[2 * p + 1]
        if not (rx.runnable or tx.runnable) or len(self.proto.memory) == 0:
            return None
        return (
            rx.generation,
            tx.generation,
            self.proto.memory.generation,
            self.proto.features,
            p < self.active_pairs,
            self.mtu,
            self._control_is_ours(),
        )

    def reconcile(self, force: bool = False) -> None:
        if self._nursery is None or self._draining:
            return
        for p, slot in enumerate(self.slots):
            key = self.pair_key(p)
            if key == slot.key and not force:
                continue
            if slot.scope is not None:
                slot.scope.cancel()
                slot.scope = None
            slot.key = key
            if key is None:
                continue
            if not self._attach_pair(p):
                slot.key = self.pair_key(p)
                continue
            scope = trio.CancelScope()
            prev, slot.done = slot.done, trio.Event()
            slot.scope = scope
            self._nursery.start_soon(self._pair_task, p, scope, prev, slot.done)

    async def drain(self) -> None:
        """Stop every pair and control task for good: each stops between
        batches (a batch publishes what it used), worker threads are joined;
        then the guest is interrupted for whatever it has not been told about.
        Nothing restarts them (``reconcile`` is off from here on)."""
        self._draining = True
        await self._stop_pairs(control=True)
        if self.stack is not None:  # frames a worker's last TX batch handed over
            for p in range(self.max_pairs):
                self.stack.take_slow(self.stack.slow_frames(p))
        for vr in self.proto.vrings:
            if vr.attached and vr.call_fd is not None and vr.needs_notify():
                with contextlib.suppress(OSError):
                    os.write(vr.call_fd, (1).to_bytes(8, "little"))
        log.info("drained: every chain taken from the guest is back in its used ring")

    async def _stop_pairs(self, control: bool = False) -> None:
        """Stop every pair task (and so its worker thread) and wait until they
        have: the request about to be applied changes memory or fds a worker
        may be using.  ``reconcile`` restarts what should run afterwards."""
        slots = self.slots if control else self.slots[: self.max_pairs]
        for slot in slots:
            if slot.scope is not None:
                slot.scope.cancel()
                slot.scope = None
            slot.key = None
        for slot in slots:
            await slot.done.wait()

    def _attach_pair(self, p: int) -> bool:
        rings = self.proto.vrings[2 * p : 2 * p + 2]
        for vr in rings:
            if not vr.runnable:
                continue
            try:
                vr.ensure_attached(self.proto.memory, self.proto.features)
            except RingError as exc:
                self.ring_broken(vr, exc)
                return False
        return True

    async def _pair_task(
        self, p: int, scope: trio.CancelScope, prev: trio.Event, done: trio.Event
    ) -> None:
        try:
            with scope:
                await prev.wait()
                if p == self.max_pairs:
                    await self._control_task()
                    return
                if self._scratch[p] is None:
                    self._scratch[p] = ffi.new("struct tn_scratch *")
                ctx = PairContext(
                    index=p,
                    rx=self.proto.vrings[2 * p],
                    tx=self.proto.vrings[2 * p + 1],
                    mem=self.proto.memory,
                    features=self.proto.features,
                    counters=self.counters[p],
                    scratch=self._scratch[p],
                    mtu=self.mtu,
                    on_broken=self.ring_broken,
                    flows=self.flows.c,
                    rx_filter=self.rx_filter if self._control_is_ours() else None,
                    generate=getattr(self.backend, "generate", None),
                )
                tap_fd = self._tap_fd(p)
                await run_pair(
                    ctx,
                    active=p < self.active_pairs,
                    tap_fd=tap_fd,
                    threaded=self.threaded,
                    stack=self.stack,
                )
                await trio.sleep_forever()
        finally:
            done.set()

    async def _control_task(self) -> None:
        vr = self.proto.vrings[2 * self.max_pairs]
        if self.control.pairs_set is None:
            # handed the control queue: the driver sets the pair count from now on,
            # starting from the activation's (what SET_VRING_ENABLE said no longer counts)
            self.control.pairs_set = self._activation_pairs
            await self.apply_active_pairs(self._activation_pairs, "control queue handed over")
        ctx = PairContext(
            index=self.max_pairs,
            rx=vr,
            tx=vr,
            mem=self.proto.memory,
            features=self.proto.features,
            counters=self.control_counters,
            scratch=None,
            mtu=self.mtu,
            on_broken=self.ring_broken,
        )
        await run_control(ctx, vr, self.proto.memory, self.control, self.apply_control)

    def _tap_fd(self, p: int) -> int | None:
        queue_fd = getattr(self.backend, "queue_fd", None)
        return None if queue_fd is None else int(queue_fd(p))

    def ring_broken(self, vr: Vring, exc: RingError) -> None:
        self.rings_broken += 1
        log.error("%s; the ring is stopped, other rings go on (device NEEDS_RESET)", exc)
        self.proto.mark_broken(vr, str(exc))
        if vr.err_fd is not None:
            try:
                os.write(vr.err_fd, (1).to_bytes(8, "little"))
            except OSError as err:
                log.warning("vring %d error fd: %s", vr.index, err)
        self.reconcile()

    # ---- status -------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        vr = self.proto.vrings
        return {
            "active_pairs": self.active_pairs,
            "max_pairs": self.max_pairs,
            "features": F.names(self.proto.features),
            "device_status": self.proto.status,
            "announces": self.announces,
            "active_changes": [{"count": n, "cause": c} for n, c in self.active_changes[-20:]],
            "flows": self.flows.stats(),
            **({"user": self.stack.status()} if self.stack is not None else {}),
            "control": {
                "rx_mode": self.control.rx_mode,
                "mac": self.control.mac.hex(":") if self.control.mac else None,
                "errors": self.control.errors,
                "ring": _ring_status(vr[2 * self.max_pairs]),
            },
            "pairs": [
                {
                    "index": p,
                    "enabled": bool(vr[2 * p].enabled and vr[2 * p + 1].enabled)
                    and p < self.active_pairs,
                    "rx_ring": _ring_status(vr[2 * p]),
                    "tx_ring": _ring_status(vr[2 * p + 1]),
                    **self.counters[p].as_dict(),
                }
                for p in range(self.max_pairs)
            ],
        }


# requests that change guest memory or fds a running worker thread may be using
_QUIESCE = frozenset(
    {
        m.SetMemTable,
        m.AddMemReg,
        m.RemMemReg,
        m.GetVringBase,
        m.SetVringNum,
        m.SetVringAddr,
        m.SetVringBase,
        m.SetVringKick,
        m.SetVringCall,
        m.SetVringErr,
        m.SetFeatures,
        m.SetLogBase,
        m.SetStatus,
        m.ResetOwner,
        m.ResetDevice,
    }
)


def _ring_status(vr: Vring) -> dict[str, Any]:
    return {"started": vr.started, "enabled": vr.enabled, "broken": vr.broken}
