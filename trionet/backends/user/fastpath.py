"""The native UDP fast path of the user stack (``native/userio.h``), typed.

``UdpFastPath`` owns the C flow table (``struct tn_utable``): Python registers
each UDP flow's connected, non-blocking host socket with the headers of its
host->guest frames and the key the guest's frames for it carry; from then on
``tn_user_tx`` / ``tn_user_rx`` move its datagrams both ways, a batch per
call.  Each flow's socket sits in the epoll set of the queue pair its replies
go to (``epoll_fd(pair)``, for Trio's ``wait_readable``); a guest frame for
the flow on another pair moves it there.

``SlowFrames`` owns a ``struct tn_slow``: the frames a TX batch did not take
(everything but datagrams of registered flows), for the Python stack.
``Outbox`` owns a ``struct tn_uoutq``: the frames the Python stack has for one
pair's RX ring, laid there by ``tn_uout_drain`` (``native/userpair.h``).

Python changes the table from the Trio thread only; the native batches may
run on the pairs' worker threads at the same time (``--threads``): the C side
locks the table around every change and every batch.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from trionet.native import ffi, lib

MAX_FLOWS = int(lib.TN_UFLOW_MAX)
MAX_PAIRS = int(lib.TN_UFLOW_PAIRS)
V4_TEMPLATE_LEN = 42  # Ethernet + IPv4 (no options) + UDP
V6_TEMPLATE_LEN = 62  # Ethernet + IPv6 + UDP
GUEST_SPOKE = int(lib.TN_UFLOW_GUEST_SPOKE)
HOST_SPOKE = int(lib.TN_UFLOW_HOST_SPOKE)
DEFAULT_BATCH = 256
_FRAME_MAX = int(lib.TN_MAX_FRAME)
_E_FULL, _E_EXISTS = -1, -2  # tn_uflow_add's TN_UFLOW_E_* (negative: not in the cdef)


class FlowExists(KeyError):
    """A flow with this key is registered already."""


@dataclass(frozen=True, slots=True)
class FlowState:
    """A copy of one flow's native state (``tx_*``: the guest's datagrams,
    ``rx_*``: the host side's; bytes are payload bytes)."""

    fd: int
    v6: bool
    pair: int
    spoke: int
    err: bool
    last_active: int  # tn_flow_now() seconds
    tx_packets: int
    tx_bytes: int
    rx_packets: int
    rx_bytes: int

    @property
    def both_spoke(self) -> bool:
        return self.spoke & (GUEST_SPOKE | HOST_SPOKE) == GUEST_SPOKE | HOST_SPOKE


def _address(raw: bytes, v6: bool, what: str) -> bytes:
    """A key address as the table stores it: 4 bytes (IPv4) or 16 (IPv6),
    zero-padded to 16."""
    if len(raw) != (16 if v6 else 4):
        raise ValueError(f"{what}: {len(raw)} bytes is not an IPv{6 if v6 else 4} address")
    return raw.ljust(16, b"\0")


def _port(port: int, what: str) -> int:
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"{what}: port {port} out of range")
    return port


def _pair(pair: int) -> int:
    if not 0 <= pair < MAX_PAIRS:
        raise ValueError(f"queue pair {pair} outside 0..{MAX_PAIRS - 1}")
    return pair


class UdpFastPath:
    """The flow table shared by every queue pair of one VM."""

    def __init__(self) -> None:
        self.table: Any = ffi.new("struct tn_utable *")
        rc = int(lib.tn_utable_init(self.table))
        if rc < 0:
            raise OSError(-rc, f"UDP fast path: epoll_create1: {os.strerror(-rc)}")
        self._open = True

    def close(self) -> None:
        """Close the epoll sets (the flows' sockets belong to their owners)."""
        if self._open:
            self._open = False
            lib.tn_utable_close(self.table)

    def __len__(self) -> int:
        return int(self.table.count)

    # ---- flows -----------------------------------------------------------------

    def add(
        self,
        *,
        fd: int,
        v6: bool,
        pair: int,
        template: bytes,
        gsrc: bytes,
        gdst: bytes,
        gsport: int,
        gdport: int,
    ) -> int:
        """Register a flow: ``fd`` its connected non-blocking UDP socket,
        ``template`` the Ethernet+IP+UDP headers of its frames to the guest
        (lengths and checksums are filled per datagram), ``gsrc``/``gdst``/
        ``gsport``/``gdport`` the guest frames' addresses (packed) and ports,
        ``pair`` the queue pair its datagrams go to until the guest sends on
        another.  Returns the slot, or -1 when the table is full.  Raises
        ``FlowExists`` for a key already registered, ``ValueError`` for bad
        arguments, ``OSError`` when epoll refuses the socket."""
        want = V6_TEMPLATE_LEN if v6 else V4_TEMPLATE_LEN
        if len(template) != want:
            raise ValueError(
                f"UDP template of {len(template)} bytes, IPv{6 if v6 else 4} needs {want}"
            )
        f = ffi.new("struct tn_uflow *")
        f.fd = fd
        f.v6 = 1 if v6 else 0
        f.pair = _pair(pair)
        f.tmpl_len = want
        ffi.memmove(f.tmpl, template, want)
        ffi.memmove(f.gsrc, _address(gsrc, v6, "guest source"), 16)
        ffi.memmove(f.gdst, _address(gdst, v6, "guest destination"), 16)
        f.gsport = _port(gsport, "guest source")
        f.gdport = _port(gdport, "guest destination")
        f.last_active = lib.tn_flow_now()
        rc = int(lib.tn_uflow_add(self.table, f))
        if rc >= 0 or rc == _E_FULL:
            return rc
        if rc == _E_EXISTS:
            raise FlowExists((v6, gsrc, gdst, gsport, gdport))
        if rc == -errno.EINVAL:
            raise ValueError("UDP fast path: template is not Ethernet + IP + UDP, or fd < 0")
        raise OSError(-rc, f"UDP fast path: epoll_ctl: {os.strerror(-rc)}")

    def remove(self, slot: int) -> None:
        """Unregister (the caller closes the socket afterwards)."""
        lib.tn_uflow_del(self.table, slot)

    def move(self, slot: int, pair: int) -> None:
        """Send the flow's datagrams to ``pair`` from now on."""
        rc = int(lib.tn_uflow_move(self.table, slot, _pair(pair)))
        if rc < 0:
            raise OSError(-rc, f"UDP fast path: moving slot {slot}: {os.strerror(-rc)}")

    def find(self, v6: bool, gsrc: bytes, gdst: bytes, gsport: int, gdport: int) -> int | None:
        """Slot of a key, or None."""
        slot = int(
            lib.tn_uflow_find(
                self.table,
                1 if v6 else 0,
                _address(gsrc, v6, "guest source"),
                _address(gdst, v6, "guest destination"),
                _port(gsport, "guest source"),
                _port(gdport, "guest destination"),
            )
        )
        return None if slot < 0 else slot

    def spoke(self, slot: int, bits: int) -> None:
        """Note that a side spoke (``GUEST_SPOKE`` / ``HOST_SPOKE``): an atomic
        or, since the native batches set these bits too."""
        lib.tn_uflow_spoke(self.table, slot, bits)

    def flow(self, slot: int) -> Any:
        """The live ``struct tn_uflow`` of a slot: counters, ``pair``,
        ``spoke``, ``err`` (the caller clears it once it read the socket's
        error queue), ``last_active``."""
        if not 0 <= slot < MAX_FLOWS:
            raise IndexError(f"flow slot {slot} outside 0..{MAX_FLOWS - 1}")
        return self.table.flows + slot

    def state(self, slot: int) -> FlowState:
        """A copy of a slot's state."""
        f = self.flow(slot)
        return FlowState(
            fd=int(f.fd),
            v6=bool(f.v6),
            pair=int(f.pair),
            spoke=int(f.spoke),
            err=bool(f.err),
            last_active=int(f.last_active),
            tx_packets=int(f.tx_packets),
            tx_bytes=int(f.tx_bytes),
            rx_packets=int(f.rx_packets),
            rx_bytes=int(f.rx_bytes),
        )

    def epoll_fd(self, pair: int) -> int:
        """The epoll set of ``pair``'s flows: readable while one of them is."""
        return int(self.table.epfd[_pair(pair)])

    def attention(self) -> list[int]:
        """Slots whose socket reported an error since the last call (their
        ``err`` is set; the caller reads each error queue and clears it)."""
        t = self.table
        out = ffi.new("int32_t[]", int(lib.TN_UATTENTION_MAX))
        overflow = ffi.new("uint8_t *")
        n = int(lib.tn_uattention_take(t, out, overflow))
        slots = [int(out[i]) for i in range(n)]
        if overflow[0]:
            seen = set(slots)
            slots += [
                i for i in range(MAX_FLOWS) if t.flows[i].live and t.flows[i].err and i not in seen
            ]
        return slots

    def counters(self) -> dict[str, int]:
        """Table-wide counters, for status."""
        t = self.table
        return {
            "native_flows": int(t.count),
            "native_tx": int(t.tx_fast),
            "native_tx_to_python": int(t.tx_slow),
            "native_tx_bad_checksum": int(t.tx_bad_csum),
            "native_tx_dropped": int(t.tx_dropped),
            "native_rx": int(t.rx_fast),
            "native_rx_dropped": int(t.rx_dropped),
            "native_socket_errors": int(t.sock_errors),
            "native_epoll_errors": int(t.epoll_errors),
        }

    # ---- batches -----------------------------------------------------------------

    def tx(
        self,
        vq: Any,
        mem: Any,
        *,
        hdr_len: int,
        pair: int,
        slow: SlowFrames,
        batch: Any,
        max_chains: int = DEFAULT_BATCH,
    ) -> int:
        """``tn_user_tx`` on ring ``vq`` (``struct tn_vq *``) of ``pair`` with
        guest memory ``mem`` (``struct tn_mem *``): chains completed, or a
        negative ``TN_E_*`` ring error for the caller's ``Vring.check``."""
        return int(
            lib.tn_user_tx(vq, mem, hdr_len, max_chains, self.table, _pair(pair), slow.cdata, batch)
        )

    def rx(
        self,
        vq: Any,
        mem: Any,
        *,
        mrg: bool,
        hdr_len: int,
        data_valid: bool,
        pair: int,
        scratch: Any,
        batch: Any,
        max_datagrams: int = DEFAULT_BATCH,
    ) -> int:
        """``tn_user_rx``: datagrams of ``pair``'s flows into its RX ring ``vq``.
        Returns datagrams delivered, or a negative ``TN_E_*`` ring error."""
        return int(
            lib.tn_user_rx(
                vq,
                mem,
                1 if mrg else 0,
                hdr_len,
                1 if data_valid else 0,
                self.table,
                _pair(pair),
                max_datagrams,
                scratch,
                batch,
            )
        )


class SlowFrame(NamedTuple):
    """A guest frame the native path left to Python (no virtio-net header)."""

    pair: int
    flags: int  # the frame's virtio-net header flags (NEEDS_CSUM: checksum partial)
    frame: bytes


class SlowFrames:
    """A ``struct tn_slow``: frames a TX batch handed over, until drained."""

    def __init__(self) -> None:
        self.cdata: Any = ffi.new("struct tn_slow *")

    def __len__(self) -> int:
        return int(self.cdata.n)

    @property
    def full(self) -> bool:
        """The last batch stopped early for want of room here: drain, call again."""
        return bool(self.cdata.full)

    def drain(self) -> list[SlowFrame]:
        """Every frame held, in order; the buffer is empty afterwards."""
        s = self.cdata
        n = int(s.n)
        if n == 0:
            lib.tn_slow_reset(s)
            return []
        data = ffi.buffer(s.data, int(s.used))
        out = [
            SlowFrame(int(s.pair[i]), int(s.flags[i]), data[s.off[i] : s.off[i] + s.len[i]])
            for i in range(n)
        ]
        lib.tn_slow_reset(s)
        return out


class Outbox:
    """Frames waiting for one pair's RX ring (a ``struct tn_uoutq``): the
    stack puts them from the Trio thread, ``tn_uout_drain`` lays them into the
    ring from the pair's Trio task or its worker thread.  ``wake_fd`` (an
    eventfd) is readable while frames wait, so the consumer can wait on it
    together with the pair's UDP epoll set."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.cdata: Any = ffi.new("struct tn_uoutq *")
        rc = int(lib.tn_uout_init(self.cdata, self.wake_fd, limit))
        if rc < 0:
            os.close(self.wake_fd)
            raise OSError(-rc, f"outbox: {os.strerror(-rc)}")

    def __len__(self) -> int:
        """Frames waiting."""
        return int(self.cdata.n)

    @contextlib.contextmanager
    def wake_deferred(self) -> Iterator[None]:
        """Puts within wake the consumer once, at the end, rather than at
        the first (a wake-up is a syscall, and with a worker thread on the
        same core a context switch per frame)."""
        lib.tn_uout_defer(self.cdata, 1)
        try:
            yield
        finally:
            lib.tn_uout_defer(self.cdata, 0)

    def __iter__(self) -> Iterator[bytes]:
        """Copies of the frames waiting, oldest first (for Python consumers)."""
        buf = ffi.new("uint8_t[]", _FRAME_MAX)
        i = 0
        while (n := int(lib.tn_uout_get(self.cdata, i, buf, _FRAME_MAX))) >= 0:
            if n:  # 0: a TCP data entry acknowledged meanwhile, not sent
                yield bytes(ffi.buffer(buf, n))
            i += 1

    def popleft(self) -> bytes:
        """Take the oldest frame (``IndexError`` when none waits)."""
        buf = ffi.new("uint8_t[]", _FRAME_MAX)
        while (n := int(lib.tn_uout_pop(self.cdata, buf, _FRAME_MAX))) == 0:
            pass  # a TCP data entry acknowledged meanwhile
        if n < 0:
            raise IndexError("outbox is empty")
        return bytes(ffi.buffer(buf, n))

    def clear_wake(self) -> None:
        """Consume the wake-up: ``wake_fd`` is readable again after the next put."""
        lib.tn_uout_unwake(self.cdata)

    @property
    def frames(self) -> Outbox:
        """The outbox itself, as a deque-like view (``len``, iteration,
        ``popleft``, ``clear``)."""
        return self

    @property
    def dropped(self) -> int:
        """Frames refused because the outbox was full, and frames no RX
        buffer of the guest could hold."""
        return int(self.cdata.dropped + self.cdata.oversize)

    def put(self, frame: bytes) -> bool:
        """Queue a copy of ``frame`` (Ethernet, no virtio-net header); False
        when the outbox is full."""
        rc = int(lib.tn_uout_put(self.cdata, frame, len(frame)))
        if rc < 0:
            raise OSError(-rc, f"outbox: {os.strerror(-rc)}")
        return rc == 1

    def put_tcp(
        self,
        conn: Any,
        seq: int,
        ack: int,
        window: int,
        flags: int,
        length: int,
        seg: int,
        mss: int,
    ) -> int:
        """Queue ``length`` bytes of connection ``conn``'s stream (a ``struct
        tn_tcpc *``) from ``seq`` as frames of at most ``seg`` bytes (a longer
        one than ``mss``: a GSO frame of ``mss``-byte segments), ``flags`` on
        the last: the bytes are peeked from the socket when the frames are laid
        (``usertcp.h``).  How many frames were queued (the rest found the
        outbox full)."""
        rc = int(lib.tn_uout_put_tcp(self.cdata, conn, seq, ack, window, flags, length, seg, mss))
        if rc < 0:
            raise OSError(-rc, f"outbox: {os.strerror(-rc)}")
        return rc

    def move_to(self, other: Outbox) -> int:
        """Move every frame to the back of ``other``; returns how many fit."""
        return int(lib.tn_uout_move(self.cdata, other.cdata))

    def clear(self) -> None:
        lib.tn_uout_clear(self.cdata)

    def close(self) -> None:
        """Free the frames and the fd (no drain may run any more)."""
        if self.wake_fd >= 0:
            lib.tn_uout_close(self.cdata)
            os.close(self.wake_fd)
            self.wake_fd = -1
