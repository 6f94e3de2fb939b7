"""One split virtqueue: what the VMM told us about it, and its ring state.

Sans-IO: kick/call/err are plain fds the service layer waits on or writes to;
guest memory is passed into every method that touches the ring.  The ring walk
itself (bounded, range-checked) is the C core's ``tn_vq_*``.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from trionet.errors import GuestMemoryError, RemoteProtocolError, RingError
from trionet.memory import GuestMemory
from trionet.native import ffi, lib, strerror
from trionet.vhost_user.constants import VHOST_VRING_F_LOG

log = logging.getLogger(__name__)

MAX_QUEUE_SIZE = 32768

# pop directions (tn_vq_pop's dir)
DEVICE_READS = 0  # TX: every descriptor device-readable
DEVICE_WRITES = 1  # RX: every descriptor device-writable
READ_THEN_WRITE = 2  # control queue: command (readable) then ack (writable)

VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29


@dataclass(frozen=True, slots=True)
class Chain:
    """A popped descriptor chain, as Python sees it (control queue, tests)."""

    head: int
    readable: bytes
    write_capacity: int
    _iov: Any = field(repr=False, compare=False)

    def write(self, data: bytes) -> int:
        """Copy ``data`` into the chain's writable part; returns bytes written."""
        c = self._iov
        if not data:
            return 0
        return int(lib.tn_buf_to_iov(c.iov + c.nread, c.nwrite, data, len(data)))


@dataclass(slots=True)
class RingAddresses:
    desc_user_addr: int
    avail_user_addr: int
    used_user_addr: int
    flags: int = 0
    log_guest_addr: int = 0  # where the used ring is logged, with VHOST_VRING_F_LOG


class Vring:
    """State of vring ``index`` and its lifecycle (see ``LIFECYCLE`` in session)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.num = 0
        self.addresses: RingAddresses | None = None
        self.base = 0
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.kick_nofd = False  # SET_VRING_KICK with the no-fd flag: polled ring
        self.started = False
        self.enabled = False
        self.broken: str | None = None
        self.generation = 0  # bumped on every change a running task must see
        self.vq: Any = ffi.new("struct tn_vq *")
        self._attached_mem_generation = -1
        self.attached = False

    # ---- what the VMM sets ------------------------------------------------

    def touch(self) -> None:
        self.generation += 1

    def set_num(self, num: int) -> None:
        if not 1 <= num <= MAX_QUEUE_SIZE or num & (num - 1):
            raise RemoteProtocolError(
                f"vring {self.index}: size {num} is not a power of two in 1..{MAX_QUEUE_SIZE}"
            )
        self.num = num
        self.touch()

    def set_base(self, base: int) -> None:
        if base > 0xFFFF:
            raise RemoteProtocolError(f"vring {self.index}: base {base} does not fit 16 bits")
        self.base = base
        self.touch()

    def set_addresses(self, addresses: RingAddresses) -> None:
        self.addresses = addresses
        self.touch()

    @property
    def runnable(self) -> bool:
        """Started, addressed, and not broken: a task may serve it."""
        return self.started and self.broken is None and self.addresses is not None

    # ---- attaching to memory ------------------------------------------------

    def attach(self, mem: GuestMemory, features: int) -> None:
        """Translate the ring addresses and load the indices (ring start)."""
        if self.addresses is None or self.num == 0:
            raise RemoteProtocolError(f"vring {self.index}: started before its size and addresses")
        vq = self.vq
        self._setup(mem)
        vq.event_idx = 1 if features >> VIRTIO_RING_F_EVENT_IDX & 1 else 0
        vq.indirect = 1 if features >> VIRTIO_RING_F_INDIRECT_DESC & 1 else 0
        vq.last_avail = self.base
        vq.used_idx = lib.tn_vq_used_idx_in_ring(vq)
        if vq.used_idx != self.base:
            # Chains the previous backend (a migration's source, a crashed
            # trionet) took but never completed: every path here completes in
            # order, so resume from the used index and take them again (as
            # libvhost-user does for in-order queues); none is leaked.
            log.info(
                "vring %d: base %d but used index %d; resuming from the used index",
                self.index,
                self.base,
                vq.used_idx,
            )
            vq.last_avail = vq.used_idx
        vq.signalled_valid = 0
        vq.broken = 0
        vq.error = 0
        self._attached_mem_generation = mem.generation
        self.attached = True

    def ensure_attached(self, mem: GuestMemory, features: int) -> None:
        """Attach on a ring's first start; afterwards follow memory and feature changes."""
        if not self.attached:
            self.attach(mem, features)
            return
        self.reattach(mem)
        self._set_used_log(mem)
        self.vq.event_idx = 1 if features >> VIRTIO_RING_F_EVENT_IDX & 1 else 0
        self.vq.indirect = 1 if features >> VIRTIO_RING_F_INDIRECT_DESC & 1 else 0

    def reattach(self, mem: GuestMemory) -> None:
        """Memory changed under a running ring: re-translate, keep the indices."""
        if self._attached_mem_generation == mem.generation or self.addresses is None:
            return
        last_avail, used_idx = self.vq.last_avail, self.vq.used_idx
        self._setup(mem)
        self.vq.last_avail, self.vq.used_idx = last_avail, used_idx
        self._attached_mem_generation = mem.generation

    def _setup(self, mem: GuestMemory) -> None:
        """Translate the VMM's ring addresses and point the C ring at them."""
        assert self.addresses is not None
        a = self.addresses
        try:
            desc, avail, used = (
                mem.uva_to_gpa(a.desc_user_addr),
                mem.uva_to_gpa(a.avail_user_addr),
                mem.uva_to_gpa(a.used_user_addr),
            )
        except GuestMemoryError as exc:
            raise RingError(f"vring {self.index}: {exc}") from None
        if lib.tn_vq_setup(self.vq, mem.table, self.num, desc, avail, used) < 0:
            raise RingError(
                f"vring {self.index}: ring of size {self.num} lies outside guest memory"
            )
        self._set_used_log(mem)

    def _set_used_log(self, mem: GuestMemory) -> None:
        """Where the used ring's writes are marked in the dirty log: the log
        address SET_VRING_ADDR gave with VHOST_VRING_F_LOG, else the used ring's
        own guest address."""
        a = self.addresses
        if a is None or self.vq.desc == ffi.NULL:
            return
        if a.flags & VHOST_VRING_F_LOG:
            self.vq.used_log = a.log_guest_addr
            return
        with contextlib.suppress(GuestMemoryError):  # re-translated (and failing) on attach
            self.vq.used_log = mem.uva_to_gpa(a.used_user_addr)

    def stop(self) -> int:
        """GET_VRING_BASE: stop the ring and return the next avail index.

        The index is consistent with the used ring as the guest (and a
        migration's destination) sees it: entries pushed but not yet published
        are published (and so logged) first, and since every path completes
        chains in order, the base is the used index: a chain taken but not
        completed is taken again by whoever resumes the ring."""
        if self.started and self.vq.desc != ffi.NULL:
            vq = self.vq
            if not vq.broken and vq.used_idx != lib.tn_vq_used_idx_in_ring(vq):
                lib.tn_vq_publish(vq)
            if vq.last_avail != vq.used_idx:
                log.info(
                    "vring %d stopped with %d chains in flight; base is the used index",
                    self.index,
                    (vq.last_avail - vq.used_idx) & 0xFFFF,
                )
            self.base = int(vq.used_idx)
        self.started = False
        self.attached = False
        self.touch()
        return self.base

    # ---- ring operations (Python path: control queue, tests) ---------------

    def check(self, rc: int) -> int:
        """Turn a negative C result into RingError (the ring is marked broken)."""
        if rc < 0:
            detail = int(self.vq.error_detail)
            self.broken = f"{strerror(rc)} (detail {detail:#x})"
            raise RingError(f"vring {self.index} broken: {self.broken}")
        return rc

    def pending(self) -> int:
        return self.check(lib.tn_vq_pending(self.vq))

    def pop(self, mem: GuestMemory, direction: int) -> Chain | None:
        c = ffi.new("struct tn_chain *")
        if self.check(lib.tn_vq_pop(self.vq, mem.table, direction, c)) == 0:
            return None
        buf = ffi.new("uint8_t[]", max(int(c.read_len), 1))
        got = lib.tn_iov_to_buf(c.iov, c.nread, buf, c.read_len)
        return Chain(int(c.head), bytes(ffi.buffer(buf, got)), int(c.write_len), c)

    def push(self, head: int, length: int) -> None:
        lib.tn_vq_push(self.vq, head, length)

    def publish(self) -> None:
        lib.tn_vq_publish(self.vq)

    def needs_notify(self) -> bool:
        return bool(lib.tn_vq_needs_notify(self.vq))

    def enable_notify(self) -> bool:
        """Ask for kicks again; True when buffers arrived meanwhile."""
        return bool(lib.tn_vq_enable_notify(self.vq))

    def disable_notify(self) -> None:
        lib.tn_vq_disable_notify(self.vq)
