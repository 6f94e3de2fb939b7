"""Dirty-page logging for live migration: the bitmap, the rings that mark it, and
the vhost-user requests that set it up (SET_LOG_BASE, LOG_ALL, VHOST_VRING_F_LOG).

The log is a memfd as QEMU's (one bit per 4 KiB page by guest physical address);
guest memory a memfd mapped through GuestMemory, rings written as a driver would.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from collections.abc import Iterator

import pytest

from tests.fakes.driver import DriverQueue, GuestRam
from trionet.dirtylog import LOG_PAGE, log_bytes_for
from trionet.errors import RemoteProtocolError
from trionet.memory import GuestMemory, RegionSpec
from trionet.native import ffi, lib
from trionet.net import features as F
from trionet.vhost_user import messages as m
from trionet.vhost_user.backend import OFFERED_PROTOCOL_FEATURES, BackendProtocol
from trionet.vhost_user.constants import VHOST_VRING_F_LOG, ProtocolFeature, Request
from trionet.vhost_user.replies import encode_reply_ack, encode_reply_payload, encode_reply_u64
from trionet.virtq.vring import DEVICE_READS, DEVICE_WRITES, RingAddresses, Vring

FEATURES = F.mask(F.VERSION_1, F.RING_INDIRECT_DESC, F.RING_EVENT_IDX, F.MRG_RXBUF)
HDR = 12
GIB4 = 1 << 32
DRIVER = F.BASE_FEATURES & ~F.bit(F.LOG_ALL)  # what a driver acks outside a migration


class LogFile:
    """The VMM's side of the log: a memfd it maps too, and reads bits from."""

    def __init__(self, size: int, file_size: int | None = None) -> None:
        self.size = size
        self.fd = os.memfd_create("trionet-test-log", os.MFD_CLOEXEC)
        length = size if file_size is None else file_size
        os.ftruncate(self.fd, length)
        self.map = mmap.mmap(-1, 1) if length == 0 else mmap.mmap(self.fd, length)

    def pages(self) -> set[int]:
        out = set()
        data = bytes(self.map[: self.size])
        for i, byte in enumerate(data):
            for b in range(8):
                if byte >> b & 1:
                    out.add(8 * i + b)
        return out

    def clear(self) -> None:
        self.map[: self.size] = bytes(self.size)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


def page(gpa: int) -> int:
    return gpa // LOG_PAGE


def pages(gpa: int, length: int) -> set[int]:
    return set(range(page(gpa), page(gpa + length - 1) + 1))


class Rig:
    """One ring in guest RAM at ``base``, with a dirty log mapped and on."""

    def __init__(self, base: int = 0, size: int = 16, ram: int = 1 << 20) -> None:
        self.ram = GuestRam(ram, base=base)
        self.mem = GuestMemory()
        self.mem.set_table([RegionSpec(base, ram, self.ram.uva, 0)], [os.dup(self.ram.fd)])
        self.log = LogFile(log_bytes_for(base + ram))
        self.mem.log.set_base(self.log.size, 0, os.dup(self.log.fd))
        self.mem.log.set_active(True)
        self.q = DriverQueue(self.ram, size)
        self.vr = Vring(0)
        self.vr.set_num(size)
        self.u = self.ram.uva - base
        self.vr.set_addresses(
            RingAddresses(self.q.desc + self.u, self.q.avail + self.u, self.q.used + self.u)
        )
        self.vr.started = True
        self.vr.attach(self.mem, FEATURES)
        self.scratch = ffi.new("struct tn_scratch *")

    def used_pages(self, first: int, n: int) -> set[int]:
        out = pages(self.q.used + 2, 2)
        for i in range(first, first + n):
            out |= pages(self.q.used + 4 + 8 * (i % self.q.size), 8)
        return out

    def rx_fill(self, frame: bytes, n: int) -> int:
        b = ffi.new("struct tn_batch *")
        return int(
            lib.tn_rx_fill(
                self.vr.vq, self.mem.table, 1, HDR, frame, len(frame), n, self.scratch, b
            )
        )

    def close(self) -> None:
        self.mem.clear()
        self.log.close()
        self.ram.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


def new_log(size: int) -> tuple[LogFile, object]:
    f = LogFile(size)
    cdata = ffi.new("struct tn_log *")
    cdata.bitmap = ffi.from_buffer("uint8_t[]", f.map)
    cdata.size = size
    return f, cdata


# ---- the bitmap ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gpa", "length", "expected"),
    [
        (0, 1, {0}),
        (4095, 1, {0}),
        (4095, 2, {0, 1}),
        (4096, 4096, {1}),
        (4096, 4097, {1, 2}),
        (8 * 4096 - 1, 2, {7, 8}),  # across a byte of the bitmap
        (3 * 4096 + 100, 20 * 4096, set(range(3, 24))),
        (0, 0, set()),
    ],
)
def test_marks_every_page_a_range_touches(gpa: int, length: int, expected: set[int]) -> None:
    f, log = new_log(64)
    lib.tn_log_mark(log, gpa, length)
    assert f.pages() == expected
    f.close()


def test_pages_above_4gib_and_past_the_end() -> None:
    f, log = new_log(log_bytes_for(GIB4 + (1 << 20)))
    lib.tn_log_mark(log, GIB4 + 5 * LOG_PAGE + 7, 1)
    assert f.pages() == {GIB4 // LOG_PAGE + 5}
    lib.tn_log_mark(log, GIB4 + (1 << 20), 1)  # one page past what the log covers
    lib.tn_log_mark(log, (1 << 64) - 10, 100)  # wraps the address space
    assert f.pages() == {GIB4 // LOG_PAGE + 5}
    assert log.beyond == 2  # counted, never written
    f.close()


def test_concurrent_marks_from_two_threads_lose_nothing() -> None:
    """Two threads mark alternate pages, so every byte of the bitmap is ORed by
    both at once: a plain read-modify-write would lose bits (cffi releases the
    GIL during the calls)."""
    count = 1 << 20
    f, log = new_log(count // 8)
    start = threading.Barrier(2)

    def mark(first: int) -> None:
        start.wait()
        for _ in range(4):
            lib.tn_log_mark_pages(log, first * LOG_PAGE, 2 * LOG_PAGE, count // 2)

    threads = [threading.Thread(target=mark, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bytes(f.map[: count // 8]) == b"\xff" * (count // 8)
    f.close()


# ---- what the rings mark ----------------------------------------------------------------


@pytest.mark.parametrize("base", [0, GIB4], ids=["low", "above-4GiB"])
def test_rx_frames_mark_buffers_used_entries_and_index(base: int) -> None:
    r = Rig(base=base)
    try:
        heads = [r.q.add_rx(3 * LOG_PAGE, segments=3) for _ in range(4)]
        frame = bytes(HDR) + b"z" * (4 * LOG_PAGE)  # two chains per frame (mergeable)
        assert r.rx_fill(frame, 2) == 2
        expected = r.used_pages(0, 4)
        written: set[int] = set()
        for full, partial in (heads[0:2], heads[2:4]):
            for gpa, n in r.q.buffers[full]:
                written |= pages(gpa, n)
            gpa, _ = r.q.buffers[partial][0]
            written |= pages(gpa, len(frame) - 3 * LOG_PAGE)
        got = r.log.pages()
        assert got == expected | written  # exactly: buffers not written stay clean
        assert min(got) >= page(base)
    finally:
        r.close()


def test_only_the_written_length_is_marked(rig: Rig) -> None:
    head = rig.q.add_rx(3 * LOG_PAGE, segments=3)
    chain = rig.vr.pop(rig.mem, DEVICE_WRITES)
    assert chain is not None
    chain.write(b"a" * 100)
    rig.vr.push(head, 100)
    rig.vr.publish()
    first, *rest = rig.q.buffers[head]
    got = rig.log.pages()
    assert pages(first[0], 100) <= got
    for gpa, n in rest:  # the buffers after the written bytes stay clean
        assert not pages(gpa, n) & got - pages(first[0], first[1])
    assert rig.used_pages(0, 1) <= got


def test_tx_completions_mark_the_used_ring_only(rig: Rig) -> None:
    rig.q.add_tx(b"t" * 3 * LOG_PAGE, segments=3)
    chain = rig.vr.pop(rig.mem, DEVICE_READS)
    assert chain is not None
    rig.vr.push(chain.head, 0)
    rig.vr.publish()
    assert rig.log.pages() == rig.used_pages(0, 1)


def test_avail_event_and_used_flags_are_marked(rig: Rig) -> None:
    rig.vr.enable_notify()  # EVENT_IDX: writes the avail-event word
    assert rig.log.pages() == pages(rig.q.used + 4 + 8 * rig.q.size, 2)
    r = Rig(size=16)
    try:
        r.vr.vq.event_idx = 0
        r.vr.disable_notify()  # the used ring's flags
        assert r.log.pages() == pages(r.q.used, 2)
    finally:
        r.close()


def test_nothing_is_marked_while_log_all_is_off(rig: Rig) -> None:
    rig.mem.log.set_active(False)
    rig.q.add_rx(2048)
    assert rig.rx_fill(bytes(HDR) + b"x" * 100, 1) == 1
    assert rig.log.pages() == set()


def test_vring_f_log_marks_the_used_ring_at_its_log_address(rig: Rig) -> None:
    log_addr = 0x80000  # where the VMM wants the used ring logged
    a = rig.vr.addresses
    assert a is not None
    rig.vr.set_addresses(
        RingAddresses(
            a.desc_user_addr, a.avail_user_addr, a.used_user_addr, VHOST_VRING_F_LOG, log_addr
        )
    )
    rig.vr.ensure_attached(rig.mem, FEATURES)  # a running ring takes the new log address
    rig.q.add_tx(b"t" * 64)
    chain = rig.vr.pop(rig.mem, DEVICE_READS)
    assert chain is not None
    rig.vr.push(chain.head, 0)
    rig.vr.publish()
    assert rig.log.pages() == pages(log_addr + 2, 2) | pages(log_addr + 4, 8)


def test_native_batches_on_many_frames_mark_every_buffer(rig: Rig) -> None:
    """A ring's worth of frames, each buffer on its own page: every one marked."""
    r = Rig(size=64, ram=1 << 20)
    try:
        heads = [r.q.add_rx(LOG_PAGE) for _ in range(64)]
        assert r.rx_fill(bytes(HDR) + b"d" * 1000, 64) == 64
        got = r.log.pages()
        for h in heads:
            ((gpa, _),) = r.q.buffers[h]
            assert page(gpa) in got
    finally:
        r.close()


# ---- GET_VRING_BASE and the destination's start -----------------------------------


def test_get_vring_base_is_the_used_index_with_chains_in_flight(rig: Rig) -> None:
    for _ in range(3):
        rig.q.add_tx(b"p" * 10)
    c = rig.vr.pop(rig.mem, DEVICE_READS)
    assert c is not None
    rig.vr.push(c.head, 0)  # pushed, not yet published
    assert rig.vr.pop(rig.mem, DEVICE_READS) is not None  # taken, never completed
    rig.log.clear()
    assert rig.vr.stop() == 1
    assert rig.q.used_idx() == 1  # the pushed entry was published...
    assert rig.used_pages(0, 1) <= rig.log.pages()  # ...and logged


def test_destination_resumes_from_the_used_index(rig: Rig) -> None:
    for _ in range(2):
        rig.q.add_tx(b"p" * 10)
    c = rig.vr.pop(rig.mem, DEVICE_READS)
    assert c is not None
    rig.vr.push(c.head, 0)
    rig.vr.publish()
    dest = Vring(0)
    dest.set_num(rig.q.size)
    assert rig.vr.addresses is not None
    dest.set_addresses(rig.vr.addresses)
    dest.set_base(2)  # the source had taken 2 chains, completed 1
    dest.started = True
    dest.attach(rig.mem, FEATURES)
    assert dest.vq.last_avail == 1
    again = dest.pop(rig.mem, DEVICE_READS)
    assert again is not None and again.readable == b"p" * 10


# ---- vhost-user: SET_LOG_BASE, SET_LOG_FD, LOG_ALL --------------------------------------


def backend() -> BackendProtocol:
    proto = BackendProtocol(max_pairs=1, offered_features=F.BASE_FEATURES)
    proto.handle(m.SetProtocolFeatures(int(OFFERED_PROTOCOL_FEATURES)))
    return proto


def test_log_all_and_log_shmfd_are_offered() -> None:
    assert F.BASE_FEATURES >> F.LOG_ALL & 1
    assert OFFERED_PROTOCOL_FEATURES & ProtocolFeature.LOG_SHMFD


def test_set_log_base_maps_and_replies_empty() -> None:
    proto = backend()
    f = LogFile(4096)
    reply = proto.handle(m.SetLogBase(4096, 0, os.dup(f.fd), need_reply=True))
    assert reply == encode_reply_payload(Request.SET_LOG_BASE, b"")  # no extra ack
    assert proto.handle(m.SetFeatures(DRIVER, need_reply=True)) == encode_reply_ack(
        Request.SET_FEATURES, True
    )
    assert proto.memory.table.log == ffi.NULL
    proto.handle(m.SetFeatures(DRIVER | F.bit(F.LOG_ALL)))
    assert proto.memory.table.log != ffi.NULL
    proto.handle(m.SetFeatures(DRIVER))
    assert proto.memory.table.log == ffi.NULL
    proto.memory.clear()
    f.close()


@pytest.mark.parametrize(
    ("size", "offset", "file_size"),
    [(8192, 0, 4096), (4096, 4096, 4096), (0, 0, 4096), (4096, 0, 0)],
    ids=["too-small", "offset-past-end", "size-0", "empty-memfd"],
)
def test_log_that_does_not_fit_its_fd_is_refused(size: int, offset: int, file_size: int) -> None:
    proto = backend()
    f = LogFile(max(size, 1), file_size=file_size)
    fd = os.dup(f.fd)
    with pytest.raises(RemoteProtocolError) as err:
        proto.handle(m.SetLogBase(size, offset, fd))
    assert err.value.reply == encode_reply_u64(Request.SET_LOG_BASE, 1)
    assert not err.value.fatal
    with pytest.raises(OSError):
        os.fstat(fd)  # closed, not leaked
    # and without a log, LOG_ALL is refused (NACK) instead of logging nowhere
    with pytest.raises(RemoteProtocolError) as err:
        proto.handle(m.SetFeatures(DRIVER | F.bit(F.LOG_ALL), need_reply=True))
    assert err.value.reply == encode_reply_ack(Request.SET_FEATURES, False)
    f.close()


def test_log_fd_must_be_a_memory_file() -> None:
    proto = backend()
    rfd, wfd = os.pipe()
    with pytest.raises(RemoteProtocolError, match="not a memory file"):
        proto.handle(m.SetLogBase(4096, 0, rfd))
    os.close(wfd)


def test_set_log_fd_is_accepted_and_its_fd_closed() -> None:
    proto = backend()
    efd = os.eventfd(0)
    assert proto.handle(m.SetLogFd(efd, need_reply=True)) == encode_reply_ack(
        Request.SET_LOG_FD, True
    )
    assert proto.take_retired_fds() == [efd]
    os.close(efd)


def test_log_all_toggle_keeps_running_rings() -> None:
    """QEMU acks LOG_ALL on a running device: rings and the device model stay."""
    proto = backend()
    f = LogFile(4096)
    proto.handle(m.SetFeatures(DRIVER))
    proto.take_events()
    gens = [vr.generation for vr in proto.vrings]
    proto.handle(m.SetLogBase(4096, 0, os.dup(f.fd)))
    proto.handle(m.SetFeatures(DRIVER | F.bit(F.LOG_ALL)))
    assert not proto.take_events().features_set
    assert [vr.generation for vr in proto.vrings] == gens
    proto.memory.clear()
    f.close()


def test_a_new_log_base_replaces_the_old_one(rig: Rig) -> None:
    bigger = LogFile(2 * rig.log.size)
    rig.mem.log.set_base(bigger.size, 0, os.dup(bigger.fd))
    rig.q.add_rx(2048)
    assert rig.rx_fill(bytes(HDR) + b"x" * 100, 1) == 1
    assert rig.log.pages() == set()
    assert bigger.pages()
    bigger.close()


def test_struct_layout_is_what_the_wire_says() -> None:
    assert m.LOG_STRUCT.size == 16
    assert m.SetLogBase(4096, 8, 3).payload() == struct.pack("=QQ", 4096, 8)
