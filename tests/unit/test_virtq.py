"""Split ring core (C, through Vring) against driver-built and hostile rings.

No sockets: guest memory is a memfd mapped through GuestMemory exactly as a
VMM's would be, and the test writes descriptors like a guest driver does.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fakes.driver import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, DriverQueue, GuestRam
from trionet.errors import RingError
from trionet.memory import GuestMemory, RegionSpec
from trionet.native import ffi, lib
from trionet.net import features as F
from trionet.virtq.vring import DEVICE_READS, DEVICE_WRITES, RingAddresses, Vring

FEATURES = F.mask(F.VERSION_1, F.RING_INDIRECT_DESC, F.RING_EVENT_IDX, F.MRG_RXBUF)


class Rig:
    def __init__(self, size: int = 16, features: int = FEATURES) -> None:
        self.ram = GuestRam(1 << 20)
        self.mem = GuestMemory()
        self.mem.set_table(
            [RegionSpec(self.ram.base, self.ram.size, self.ram.uva, 0)], [os.dup(self.ram.fd)]
        )
        self.q = DriverQueue(self.ram, size)
        self.vr = Vring(0)
        self.vr.set_num(size)
        u = self.ram.uva - self.ram.base
        self.vr.set_addresses(RingAddresses(self.q.desc + u, self.q.avail + u, self.q.used + u))
        self.vr.started = True
        self.vr.attach(self.mem, features)

    def close(self) -> None:
        self.mem.clear()
        self.ram.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


def test_pop_reads_a_segmented_chain(rig: Rig) -> None:
    head = rig.q.add_tx(b"abcdefghij" * 10, segments=4)
    chain = rig.vr.pop(rig.mem, DEVICE_READS)
    assert chain is not None and chain.head == head
    assert chain.readable == b"abcdefghij" * 10
    assert rig.vr.pop(rig.mem, DEVICE_READS) is None


def test_indirect_chain(rig: Rig) -> None:
    rig.q.add_tx(b"x" * 300, segments=3, indirect=True)
    chain = rig.vr.pop(rig.mem, DEVICE_READS)
    assert chain is not None and chain.readable == b"x" * 300


def test_used_ring_and_event_idx_notification(rig: Rig) -> None:
    rig.q.set_used_event(0)
    for _ in range(3):
        rig.q.add_tx(b"p" * 20)
    for _ in range(3):
        c = rig.vr.pop(rig.mem, DEVICE_READS)
        assert c is not None
        rig.vr.push(c.head, 0)
    rig.vr.publish()
    assert rig.vr.needs_notify()  # first notification always goes out
    assert [u.head for u in rig.q.take_used()] == [0, 1, 2]
    # the guest asks to hear only once used idx passes 10: no interrupt for one more
    rig.q.set_used_event(10)
    rig.q.add_tx(b"q")
    c = rig.vr.pop(rig.mem, DEVICE_READS)
    assert c is not None
    rig.vr.push(c.head, 0)
    rig.vr.publish()
    assert not rig.vr.needs_notify()


def test_no_interrupt_flag_without_event_idx() -> None:
    r = Rig(features=F.mask(F.VERSION_1))
    try:
        r.q.set_avail_flags(1)  # VRING_AVAIL_F_NO_INTERRUPT
        r.q.add_tx(b"z")
        c = r.vr.pop(r.mem, DEVICE_READS)
        assert c is not None
        r.vr.push(c.head, 0)
        r.vr.publish()
        assert not r.vr.needs_notify()
        r.q.set_avail_flags(0)
        assert r.vr.needs_notify()
    finally:
        r.close()


def test_enable_notify_reports_buffers_that_raced_in(rig: Rig) -> None:
    assert rig.vr.enable_notify() is False
    assert rig.q.avail_event() == 0
    rig.q.add_tx(b"late")
    assert rig.vr.enable_notify() is True


def test_rx_fill_with_mergeable_buffers_spans_chains(rig: Rig) -> None:
    for _ in range(4):
        rig.q.add_rx(1000)
    scratch, b = ffi.new("struct tn_scratch *"), ffi.new("struct tn_batch *")
    frame = bytes(12) + bytes(range(256)) * 10  # 2572 bytes: three 1000-byte buffers
    n = lib.tn_rx_fill(rig.vr.vq, rig.mem.table, 1, 12, frame, len(frame), 1, scratch, b)
    assert rig.vr.check(n) == 1
    used = rig.q.take_used()
    assert [u.length for u in used] == [1000, 1000, 572]
    data = b"".join(rig.q.read_rx(u) for u in used)
    assert int.from_bytes(data[10:12], "little") == 3
    assert data[12:] == frame[12:]
    # the fourth buffer was not consumed
    assert rig.vr.pending() == 1


def test_rx_fill_lays_copies_and_publishes_once(rig: Rig) -> None:
    for _ in range(5):
        rig.q.add_rx(100)
    scratch = ffi.new("struct tn_scratch *")
    b = ffi.new("struct tn_batch *")
    frame = bytes(12) + b"g" * 60
    n = lib.tn_rx_fill(rig.vr.vq, rig.mem.table, 1, 12, frame, len(frame), 3, scratch, b)
    assert n == 3 and b.packets == 3 and b.bytes == 180 and not b.ring_full
    assert rig.q.used_idx() == 3
    n = lib.tn_rx_fill(rig.vr.vq, rig.mem.table, 1, 12, frame, len(frame), 256, scratch, b)
    assert n == 2 and b.ring_full
    used = rig.q.take_used()
    assert [u.length for u in used] == [72] * 5
    for u in used:
        data = rig.q.read_rx(u)
        assert data[12:] == b"g" * 60 and int.from_bytes(data[10:12], "little") == 1
    # a frame larger than any buffer, without MRG_RXBUF, takes nothing
    rig.q.add_rx(10)
    n = lib.tn_rx_fill(rig.vr.vq, rig.mem.table, 0, 12, frame, len(frame), 8, scratch, b)
    assert n == 0 and b.ring_full and rig.vr.pending() == 1


def test_rx_fill_without_room_consumes_nothing(rig: Rig) -> None:
    rig.q.add_rx(100)
    scratch, b = ffi.new("struct tn_scratch *"), ffi.new("struct tn_batch *")
    frame = bytes(500)
    assert lib.tn_rx_fill(rig.vr.vq, rig.mem.table, 1, 12, frame, len(frame), 1, scratch, b) == 0
    assert rig.q.take_used() == []
    assert rig.vr.pending() == 1


# ---- hostile rings: each breaks one rule; the ring is marked broken, nothing is touched ----


def _hostile(rig: Rig, build: str) -> None:
    q, ram = rig.q, rig.ram
    buf = ram.alloc(64)
    if build == "loop":
        q.set_desc(0, buf, 8, DESC_F_NEXT, 1)
        q.set_desc(1, buf, 8, DESC_F_NEXT, 0)
        q.publish_head(0)
    elif build == "self_loop":
        q.set_desc(3, buf, 8, DESC_F_NEXT, 3)
        q.publish_head(3)
    elif build == "head_out_of_range":
        q.publish_head(q.size + 5)
    elif build == "next_out_of_range":
        q.set_desc(0, buf, 8, DESC_F_NEXT, 999)
        q.publish_head(0)
    elif build == "addr_outside_memory":
        q.set_desc(0, ram.base + ram.size - 4, 64)
        q.publish_head(0)
    elif build == "addr_wraps":
        q.set_desc(0, (1 << 64) - 8, 64)
        q.publish_head(0)
    elif build == "write_in_tx":
        q.set_desc(0, buf, 8, DESC_F_WRITE)
        q.publish_head(0)
    elif build == "read_after_write":
        q.set_desc(0, buf, 8, DESC_F_NEXT, 1)
        q.set_desc(1, buf, 8, DESC_F_WRITE | DESC_F_NEXT, 2)
        q.set_desc(2, buf, 8, 0)
        q.publish_head(0)
    elif build == "indirect_nested":
        table = ram.alloc(32, 16)
        ram.write(table, struct.pack("<QIHH", table, 32, DESC_F_INDIRECT, 0) * 2)
        q.set_desc(0, table, 32, DESC_F_INDIRECT)
        q.publish_head(0)
    elif build == "indirect_bad_len":
        q.set_desc(0, buf, 17, DESC_F_INDIRECT)
        q.publish_head(0)
    elif build == "indirect_with_next":
        q.set_desc(0, buf, 16, DESC_F_INDIRECT | DESC_F_NEXT, 1)
        q.publish_head(0)
    elif build == "indirect_loop":
        table = ram.alloc(32, 16)
        ram.write(table, struct.pack("<QIHH", buf, 8, DESC_F_NEXT, 1))
        ram.write(table + 16, struct.pack("<QIHH", buf, 8, DESC_F_NEXT, 0))
        q.set_desc(0, table, 32, DESC_F_INDIRECT)
        q.publish_head(0)
    elif build == "indirect_table_outside":
        q.set_desc(0, ram.base + ram.size + 4096, 32, DESC_F_INDIRECT)
        q.publish_head(0)
    elif build == "avail_jump":
        q.set_avail_idx(q.size + 1)
    else:  # pragma: no cover
        raise AssertionError(build)


HOSTILE = [
    "loop",
    "self_loop",
    "head_out_of_range",
    "next_out_of_range",
    "addr_outside_memory",
    "addr_wraps",
    "write_in_tx",
    "read_after_write",
    "indirect_nested",
    "indirect_bad_len",
    "indirect_with_next",
    "indirect_loop",
    "indirect_table_outside",
    "avail_jump",
]


@pytest.mark.parametrize("build", HOSTILE)
def test_hostile_ring_is_marked_broken(rig: Rig, build: str) -> None:
    _hostile(rig, build)
    with pytest.raises(RingError, match="broken"):
        rig.vr.pop(rig.mem, DEVICE_READS)
    assert rig.vr.broken is not None
    assert rig.vr.vq.broken == 1
    assert rig.q.used_idx() == 0  # nothing completed
    # and it stays broken: later calls fail the same way, without walking again
    with pytest.raises(RingError):
        rig.vr.pop(rig.mem, DEVICE_READS)


@pytest.mark.parametrize("build", HOSTILE)
def test_hostile_ring_through_batched_paths(build: str) -> None:
    """The batch functions apply the same checks (loop backend and tap TX)."""
    rig = Rig()
    try:
        _hostile(rig, build)
        tb = ffi.new("struct tn_batch *")
        rb = ffi.new("struct tn_batch *")
        scratch = ffi.new("struct tn_scratch *")
        rc = lib.tn_loop_batch(
            rig.vr.vq, ffi.NULL, rig.mem.table, 1, 12, 64, scratch, tb, rb, ffi.NULL, 0
        )
        assert rc < 0
        assert rig.vr.vq.broken == 1
        r, w = os.pipe()
        try:
            rc2 = lib.tn_tx_to_fd(rig.vr.vq, rig.mem.table, w, 12, 64, tb, ffi.NULL, 0)
            assert rc2 < 0
        finally:
            os.close(r)
            os.close(w)
    finally:
        rig.close()


def test_rx_ring_with_readable_descriptor_is_broken(rig: Rig) -> None:
    rig.q.add_tx(b"not a receive buffer")
    with pytest.raises(RingError, match="readable"):
        rig.vr.pop(rig.mem, DEVICE_WRITES)


descriptor = st.tuples(
    st.integers(0, (1 << 64) - 1) | st.integers(0, 1 << 20),  # addr
    st.integers(0, (1 << 32) - 1) | st.integers(0, 4096),  # len
    st.integers(0, 7),  # flags
    st.integers(0, 0xFFFF) | st.integers(0, 20),  # next
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    table=st.lists(descriptor, min_size=16, max_size=16),
    heads=st.lists(st.integers(0, 40), min_size=1, max_size=20),
    direction=st.sampled_from([DEVICE_READS, DEVICE_WRITES, 2]),
)
def test_random_descriptor_tables_never_escape_guest_memory(
    table: list[tuple[int, int, int, int]], heads: list[int], direction: int
) -> None:
    """Whatever the driver writes, every pop either yields segments inside guest
    memory or breaks the ring; nothing crashes, hangs, or reads outside."""
    rig = Rig()
    try:
        for i, (addr, ln, flags, nxt) in enumerate(table):
            rig.q.set_desc(i, addr, ln, flags, nxt)
        for h in heads:
            rig.q.publish_head(h)
        lo = int(ffi.cast("uintptr_t", rig.mem.table.regions[0].host))
        hi = lo + rig.ram.size
        c = ffi.new("struct tn_chain *")
        for _ in range(len(heads) + 1):
            rc = lib.tn_vq_pop(rig.vr.vq, rig.mem.table, direction, c)
            if rc <= 0:
                break
            for k in range(c.nread + c.nwrite):
                base = int(ffi.cast("uintptr_t", c.iov[k].iov_base))
                assert lo <= base and base + c.iov[k].iov_len <= hi
        if rc < 0:
            assert rig.vr.vq.broken == 1
    finally:
        rig.close()


def test_tap_rx_path_enforces_the_drivers_receive_filter(rig: Rig) -> None:
    """RX/MAC-class control commands are honoured: the native RX path drops
    frames the driver's filter refuses (counted), and delivers the rest."""
    import socket

    from trionet.net.control import ControlState, write_filter

    state = ControlState(F.mask(F.CTRL_RX, F.CTRL_RX_EXTRA, F.CTRL_MAC_ADDR), 1)
    f = ffi.new("struct tn_rxfilter *")
    write_filter(state, f)
    assert f.promisc == 1  # before any RX command the device receives everything
    mine, other = bytes.fromhex("525400000001"), bytes.fromhex("525400000099")
    group = bytes.fromhex("01005e000001")
    for cmd in (bytes([0, 0, 0]), bytes([1, 1]) + mine):  # PROMISC off, MAC_ADDR_SET
        state.handle(cmd)
    write_filter(state, f)

    def frame(dst: bytes) -> bytes:
        return bytes(12) + dst + other + b"\x08\x00" + bytes(46)

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for dst in (mine, other, b"\xff" * 6, group, mine):
        a.send(frame(dst))
    for _ in range(8):
        rig.q.add_rx(2048)
    scratch = ffi.new("struct tn_scratch *")
    batch = ffi.new("struct tn_batch *")
    b.setblocking(False)
    rc = lib.tn_rx_from_fd(rig.vr.vq, rig.mem.table, b.fileno(), 1, 12, 1600, 64, scratch, batch, f)
    assert rc == 3 and batch.drops_filtered == 2
    got = [rig.q.read_rx(u)[12:18] for u in rig.q.take_used()]
    assert got == [mine, b"\xff" * 6, mine]
    state.handle(bytes([0, 1, 1]))  # ALLMULTI on: the group frame passes now
    write_filter(state, f)
    a.send(frame(group))
    rc = lib.tn_rx_from_fd(rig.vr.vq, rig.mem.table, b.fileno(), 1, 12, 1600, 64, scratch, batch, f)
    assert rc == 1
    a.close()
    b.close()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    frames=st.lists(st.integers(0, 3000), min_size=1, max_size=24),
    buffers=st.lists(st.integers(64, 1600), min_size=0, max_size=40),
    mrg=st.booleans(),
    batch=st.integers(1, 8),
)
def test_buffers_are_used_in_the_order_they_were_made_available(
    frames: list[int], buffers: list[int], mrg: bool, batch: int
) -> None:
    """VIRTIO_F_IN_ORDER, which trionet offers: on both rings of the loop path every
    used entry names the next chain the driver made available, whatever fits."""
    tx = Rig(size=64)
    try:
        rxq = DriverQueue(tx.ram, 64)
        rx = Vring(1)
        rx.set_num(64)
        u = tx.ram.uva - tx.ram.base
        rx.set_addresses(RingAddresses(rxq.desc + u, rxq.avail + u, rxq.used + u))
        rx.started = True
        rx.attach(tx.mem, FEATURES)
        tx_heads = [tx.q.add_tx(bytes(12) + bytes(n)) for n in frames]
        rx_heads = [rxq.add_rx(n) for n in buffers]
        scratch = ffi.new("struct tn_scratch *")
        tb, rb = ffi.new("struct tn_batch *"), ffi.new("struct tn_batch *")
        while lib.tn_loop_batch(
            tx.vr.vq, rx.vq, tx.mem.table, int(mrg), 12, batch, scratch, tb, rb, ffi.NULL, 0
        ):
            pass
        assert [e.head for e in tx.q.take_used()] == tx_heads
        used = [e.head for e in rxq.take_used()]
        assert used == rx_heads[: len(used)]
    finally:
        tx.close()
