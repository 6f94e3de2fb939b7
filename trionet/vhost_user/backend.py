"""Backend side of a vhost-user conversation, sans-IO.

``BackendProtocol.handle(request)`` applies one decoded request to the device
state (features, memory, vrings) and returns the bytes to send back, if any.
It does no I/O: fds it no longer needs are handed to the service layer
(``take_retired_fds``), which closes them after waking whoever waits on them;
running rings learn about changes through their ``generation`` counters.

Dispatch is a table (``_DISPATCH``), one method per request, as in rust-vmm's
``backend_req_handler.rs``; REPLY_ACK is applied once, in ``handle``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from trionet.errors import LocalProtocolError, RemoteProtocolError
from trionet.memory import MAX_REGIONS, GuestMemory, RegionSpec
from trionet.net import features as F
from trionet.vhost_user import messages as m
from trionet.vhost_user.constants import ProtocolFeature, Request
from trionet.vhost_user.replies import (
    encode_reply_ack,
    encode_reply_payload,
    encode_reply_u64,
    encode_reply_vring_state,
)
from trionet.virtq.vring import RingAddresses, Vring

log = logging.getLogger(__name__)

# device status bits (virtio §2.1)
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

OFFERED_PROTOCOL_FEATURES = (
    ProtocolFeature.MQ
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
    | ProtocolFeature.STATUS
    | ProtocolFeature.RARP
    | ProtocolFeature.MTU
    | ProtocolFeature.LOG_SHMFD
)


@dataclass
class DeviceEvents:
    """What happened that the device model (not the rings) must act on.

    The service drains these after every request (``take_events``)."""

    resets: list[str] = field(default_factory=list)  # causes of device resets
    driver_ok: bool = False
    features_set: bool = False
    enable_changes: list[tuple[int, bool]] = field(default_factory=list)
    rarp: bytes | None = None
    mtu: int | None = None


class BackendProtocol:
    """The vhost-user backend's view of one VMM connection."""

    def __init__(self, *, max_pairs: int, offered_features: int) -> None:
        if not 1 <= max_pairs <= 16:
            raise LocalProtocolError(f"queue pairs must be 1..16, not {max_pairs}")
        self.max_pairs = max_pairs
        self.offered_features = offered_features
        self.features = 0
        self.features_set = False
        self.protocol_features = 0
        self.protocol_negotiated = False
        self.owner = False
        self.status = 0
        self.mtu: int | None = None
        self.memory = GuestMemory()
        # vrings 0..2N-1 are RX/TX pairs; vring 2N is the control queue
        self.vrings = [Vring(i) for i in range(2 * max_pairs + 1)]
        self.events = DeviceEvents()
        self._retired: list[int] = []

    # ---- the service's interface -------------------------------------------

    def take_retired_fds(self) -> list[int]:
        fds, self._retired = self._retired, []
        return fds

    def take_events(self) -> DeviceEvents:
        ev, self.events = self.events, DeviceEvents()
        return ev

    @property
    def reply_ack(self) -> bool:
        return bool(self.protocol_features & ProtocolFeature.REPLY_ACK)

    def handle(self, req: Any) -> bytes | None:
        """Apply ``req``; returns the reply to send (None: nothing to send).

        A request that breaks the protocol raises ``RemoteProtocolError``; its
        ``reply`` is the NACK to send when the VMM waits for one, and ``fatal``
        says whether the connection must close.
        """
        handler = _DISPATCH.get(type(req))
        code = req.request_code
        need_ack = bool(getattr(req, "need_reply", False)) and self.reply_ack
        if handler is None:
            self._retire_message_fds(req)
            refusal = _REFUSALS.get(code)
            if refusal is not None:  # the VMM waits for this reply, REPLY_ACK or not
                nack: bytes | None = encode_reply_payload(code, refusal)
            else:
                nack = encode_reply_ack(code, False) if need_ack else None
            raise RemoteProtocolError(
                f"unsupported request {_request_name(code)} refused", reply=nack, fatal=False
            )
        try:
            reply = handler(self, req)
        except RemoteProtocolError as exc:
            if type(req) not in _CLOSES_ITS_FDS:
                self._retire_message_fds(req)  # never stored: a refused request keeps nothing
            if need_ack and code not in _REPLIES_ITSELF:
                exc.reply = encode_reply_ack(code, False)
                exc.fatal = False
            raise
        if reply is None and need_ack:
            return encode_reply_ack(code, True)
        return reply

    # ---- helpers -------------------------------------------------------------

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise RemoteProtocolError(
                f"vring index {index} out of range (this device has {len(self.vrings)} vrings)"
            )
        return self.vrings[index]

    def _vring_for_fd(self, req: m.SetVringKick | m.SetVringCall | m.SetVringErr) -> Vring:
        """The ring a SET_VRING_KICK/CALL/ERR names, once its fd is known to be
        an eventfd: we read kicks from it and write calls and errors to it, and
        anything else (a pipe, /dev/null, a file) would make that fail or spin.
        On refusal ``handle`` retires the fd."""
        vr = self._vring(req.index)
        if req.fd is not None and not is_eventfd(req.fd):
            what = req.REQUEST.name.removeprefix("SET_VRING_").lower()
            raise RemoteProtocolError(f"{what} fd for vring {req.index} is not an eventfd")
        return vr

    def _retire(self, fd: int | None) -> None:
        if fd is not None and fd >= 0:
            self._retired.append(fd)

    def _retire_message_fds(self, req: Any) -> None:
        for fd in req.attached_fds():
            self._retire(fd)

    def reset_device(self, cause: str) -> None:
        """Stop every ring and forget the driver's choices (memory stays)."""
        for vr in self.vrings:
            vr.stop()
            vr.enabled = False
            vr.broken = None
            for attr in ("kick_fd", "call_fd", "err_fd"):
                self._retire(getattr(vr, attr))
                setattr(vr, attr, None)
            vr.kick_nofd = False
            vr.touch()
        self.features = 0
        self.features_set = False
        self.status = 0
        self.events.resets.append(cause)

    def mark_broken(self, vring: Vring, why: str) -> None:
        """A ring broke a rule: NEEDS_RESET for the driver; other rings go on."""
        vring.broken = why
        vring.touch()
        self.status |= STATUS_NEEDS_RESET

    # ---- one method per request --------------------------------------------

    def _get_features(self, req: m.GetFeatures) -> bytes:
        return encode_reply_u64(Request.GET_FEATURES, self.offered_features)

    def _set_features(self, req: m.SetFeatures) -> None:
        extra = req.features & ~self.offered_features
        if extra:
            raise RemoteProtocolError(
                f"SET_FEATURES acks features we did not offer: {F.names(extra)}"
            )
        self.memory.log.set_active(F.has(req.features, F.LOG_ALL))
        if self.features_set and self.features ^ req.features == F.bit(F.LOG_ALL):
            # QEMU toggles LOG_ALL around a migration on a running device: the
            # rings, the driver's choices and the host side stay as they are
            self.features = req.features
            return
        self.features = req.features
        self.features_set = True
        self.events.features_set = True
        for vr in self.vrings:
            vr.touch()
        log.info("features acked: %s", " ".join(F.names(req.features)))

    def _set_owner(self, req: m.SetOwner) -> None:
        self.owner = True

    def _reset_owner(self, req: m.ResetOwner) -> None:
        self.reset_device("RESET_OWNER")

    def _reset_device(self, req: m.ResetDevice) -> None:
        self.reset_device("RESET_DEVICE")

    def _get_protocol_features(self, req: m.GetProtocolFeatures) -> bytes:
        return encode_reply_u64(Request.GET_PROTOCOL_FEATURES, int(OFFERED_PROTOCOL_FEATURES))

    def _set_protocol_features(self, req: m.SetProtocolFeatures) -> None:
        extra = req.features & ~int(OFFERED_PROTOCOL_FEATURES)
        if extra:
            raise RemoteProtocolError(
                f"SET_PROTOCOL_FEATURES acks protocol features we did not offer: {extra:#x}"
            )
        self.protocol_features = req.features
        self.protocol_negotiated = True

    def _get_queue_num(self, req: m.GetQueueNum) -> bytes:
        # Queue *pairs*, as QEMU, DPDK and passt read it (cloud-hypervisor reads
        # vrings: it must be started with num_queues = 2 * pairs; see README).
        return encode_reply_u64(Request.GET_QUEUE_NUM, self.max_pairs)

    def _get_max_mem_slots(self, req: m.GetMaxMemSlots) -> bytes:
        return encode_reply_u64(Request.GET_MAX_MEM_SLOTS, MAX_REGIONS)

    def _set_mem_table(self, req: m.SetMemTable) -> None:
        specs = [_spec(r) for r in req.regions]
        self.memory.set_table(specs, list(req.fds))
        self._memory_changed()

    def _add_mem_reg(self, req: m.AddMemReg) -> None:
        self.memory.add_region(_spec(req.region), req.fd)
        self._memory_changed()

    def _rem_mem_reg(self, req: m.RemMemReg) -> None:
        self.memory.remove_region(_spec(req.region))
        self._memory_changed()

    def _memory_changed(self) -> None:
        for vr in self.vrings:
            if vr.started:
                vr.touch()

    def _set_vring_num(self, req: m.SetVringNum) -> None:
        self._vring(req.index).set_num(req.num)

    def _set_vring_addr(self, req: m.SetVringAddr) -> None:
        self._vring(req.index).set_addresses(
            RingAddresses(
                req.desc_user_addr,
                req.avail_user_addr,
                req.used_user_addr,
                req.flags,
                req.log_guest_addr,
            )
        )

    def _set_log_base(self, req: m.SetLogBase) -> bytes:
        try:
            self.memory.log.set_base(req.size, req.offset, req.fd)
        except RemoteProtocolError as exc:
            # the VMM waits for this reply whatever REPLY_ACK says: a u64 1 in
            # place of the empty success reply says "refused"
            exc.reply = encode_reply_u64(Request.SET_LOG_BASE, 1)
            exc.fatal = False
            raise
        return encode_reply_payload(Request.SET_LOG_BASE, b"")

    def _set_log_fd(self, req: m.SetLogFd) -> None:
        self._retire(req.fd)  # nothing to signal: trionet marks the log synchronously

    def _set_vring_base(self, req: m.SetVringBase) -> None:
        self._vring(req.index).set_base(req.num)

    def _get_vring_base(self, req: m.GetVringBase) -> bytes:
        vr = self._vring(req.index)
        base = vr.stop()
        # like libvhost-user: the ring's kick goes; QEMU sends a new one to restart
        self._retire(vr.kick_fd)
        vr.kick_fd = None
        vr.kick_nofd = False
        if not any(v.started for v in self.vrings):
            self.events.resets.append("GET_VRING_BASE on every ring")
        return encode_reply_vring_state(Request.GET_VRING_BASE, req.index, base)

    def _set_vring_kick(self, req: m.SetVringKick) -> None:
        vr = self._vring_for_fd(req)
        self._retire(vr.kick_fd)
        vr.kick_fd = req.fd
        vr.kick_nofd = req.fd is None
        vr.started = True
        vr.broken = None
        if not F.has(self.features, F.VHOST_USER_PROTOCOL_FEATURES):
            vr.enabled = True  # without PROTOCOL_FEATURES rings start enabled
        vr.touch()

    def _set_vring_call(self, req: m.SetVringCall) -> None:
        vr = self._vring_for_fd(req)
        self._retire(vr.call_fd)
        vr.call_fd = req.fd
        vr.touch()

    def _set_vring_err(self, req: m.SetVringErr) -> None:
        vr = self._vring_for_fd(req)
        self._retire(vr.err_fd)
        vr.err_fd = req.fd
        vr.touch()

    def _set_vring_enable(self, req: m.SetVringEnable) -> None:
        if not (self.protocol_negotiated or F.has(self.features, F.VHOST_USER_PROTOCOL_FEATURES)):
            raise RemoteProtocolError(
                "SET_VRING_ENABLE without negotiated VHOST_USER_F_PROTOCOL_FEATURES"
            )
        vr = self._vring(req.index)
        if vr.enabled != req.enable:
            vr.enabled = req.enable
            vr.touch()
        self.events.enable_changes.append((req.index, req.enable))

    def _send_rarp(self, req: m.SendRarp) -> None:
        self.events.rarp = bytes(req.mac)

    def _net_set_mtu(self, req: m.NetSetMtu) -> None:
        if not 68 <= req.mtu <= 65535:
            raise RemoteProtocolError(f"NET_SET_MTU {req.mtu} outside 68..65535")
        self.mtu = req.mtu
        self.events.mtu = req.mtu

    def _set_status(self, req: m.SetStatus) -> None:
        old = self.status
        if req.status == 0:
            if old != 0:
                self.reset_device("SET_STATUS 0")
            return
        self.status = req.status | (old & STATUS_NEEDS_RESET)
        if req.status & STATUS_DRIVER_OK and not old & STATUS_DRIVER_OK:
            self.events.driver_ok = True

    def _get_status(self, req: m.GetStatus) -> bytes:
        return encode_reply_u64(Request.GET_STATUS, self.status)


def is_eventfd(fd: int) -> bool:
    """Whether ``fd`` is an eventfd (what Linux names ``anon_inode:[eventfd]``)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


def _spec(r: Any) -> RegionSpec:
    return RegionSpec(r.guest_addr, r.size, r.user_addr, r.mmap_offset)


def _request_name(code: int) -> str:
    try:
        return Request(code).name
    except ValueError:
        return f"request {code}"


_DISPATCH: dict[type, Callable[[BackendProtocol, Any], bytes | None]] = {
    m.GetFeatures: BackendProtocol._get_features,
    m.SetFeatures: BackendProtocol._set_features,
    m.SetOwner: BackendProtocol._set_owner,
    m.ResetOwner: BackendProtocol._reset_owner,
    m.ResetDevice: BackendProtocol._reset_device,
    m.GetProtocolFeatures: BackendProtocol._get_protocol_features,
    m.SetProtocolFeatures: BackendProtocol._set_protocol_features,
    m.GetQueueNum: BackendProtocol._get_queue_num,
    m.GetMaxMemSlots: BackendProtocol._get_max_mem_slots,
    m.SetMemTable: BackendProtocol._set_mem_table,
    m.AddMemReg: BackendProtocol._add_mem_reg,
    m.RemMemReg: BackendProtocol._rem_mem_reg,
    m.SetVringNum: BackendProtocol._set_vring_num,
    m.SetVringAddr: BackendProtocol._set_vring_addr,
    m.SetVringBase: BackendProtocol._set_vring_base,
    m.GetVringBase: BackendProtocol._get_vring_base,
    m.SetVringKick: BackendProtocol._set_vring_kick,
    m.SetVringCall: BackendProtocol._set_vring_call,
    m.SetVringErr: BackendProtocol._set_vring_err,
    m.SetVringEnable: BackendProtocol._set_vring_enable,
    m.SendRarp: BackendProtocol._send_rarp,
    m.SetLogBase: BackendProtocol._set_log_base,
    m.SetLogFd: BackendProtocol._set_log_fd,
    m.NetSetMtu: BackendProtocol._net_set_mtu,
    m.SetStatus: BackendProtocol._set_status,
    m.GetStatus: BackendProtocol._get_status,
}

# requests whose reply is their answer: REPLY_ACK does not add an ack to them
_REPLIES_ITSELF = frozenset(
    {
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.GET_QUEUE_NUM,
        Request.GET_MAX_MEM_SLOTS,
        Request.GET_VRING_BASE,
        Request.GET_STATUS,
        Request.SET_LOG_BASE,
    }
)

# GuestMemory closes the fds of these whether or not the request succeeds
_CLOSES_ITS_FDS = frozenset({m.SetMemTable, m.AddMemReg, m.SetLogBase})

_U64_FAILURE = m.U64_STRUCT.pack(1)

#: Requests trionet does not implement whose reply is their answer: the VMM
#: waits for it whether or not REPLY_ACK was negotiated, so each gets the reply
#: that says "failed" in that request's own terms (vhost-user.rst).
_REFUSALS: dict[int, bytes] = {
    Request.GET_CONFIG: b"",  # a zero-size payload signals failure
    Request.IOTLB_MSG: _U64_FAILURE,
    Request.CREATE_CRYPTO_SESSION: m.U64_STRUCT.pack((1 << 64) - 1),  # session id -1
    Request.POSTCOPY_ADVISE: _U64_FAILURE,  # and no userfault fd
    Request.POSTCOPY_END: _U64_FAILURE,
    Request.GET_INFLIGHT_FD: _U64_FAILURE,  # and no fd
    Request.GET_SHARED_OBJECT: _U64_FAILURE,  # and no dma-buf fd
    Request.SET_DEVICE_STATE_FD: m.U64_STRUCT.pack(0x101),  # error, no fd returned
    Request.CHECK_DEVICE_STATE: _U64_FAILURE,
}
