"""Fuzz targets: any byte string in, an exception only when trionet is wrong.

Each target takes the fuzzer's bytes, builds input for one layer from them
(``Reader`` never runs out: missing bytes read as zeros), drives that layer,
and checks what must hold whatever the input was.  The only exceptions a
target lets through are bugs: anything else the layer raises for bad input
(``RemoteProtocolError`` and its subclasses) is caught.  ``tools/fuzz`` runs
them under atheris; ``tests/unit/test_fuzz.py`` replays seeds and every input
that ever crashed one.

* ``codec``: the vhost-user byte stream and its fds, split anywhere, into
  ``RequestDecoder``; every fd fed ends up either in a message or closed
  (never both, never neither), and every decoded request re-encodes to the
  same request.
* ``memory``: SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG / reads / writes /
  address translations on ``GuestMemory`` against a model: a region is only
  ever mapped inside its fd, a refused change leaves the table as it was,
  reads and writes land exactly where the model says, every fd is closed.
* ``virtq``: two split rings laid out in fake guest memory from fuzz bytes
  (descriptors, indirect tables, avail and used rings, indices, features),
  then the native walks: pop in every direction, discard, TX to an fd, RX
  fill, RX from an fd, the loop batch, notification state.  A walk may only
  say the ring is broken; it must not crash, hang or touch memory outside
  the regions.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
from collections.abc import Callable
from typing import Any

from tests.fuzz.reader import Reader
from trionet.errors import GuestMemoryError, LocalProtocolError, RemoteProtocolError, RingError
from trionet.memory import MAX_REGIONS, GuestMemory, RegionSpec
from trionet.native import ffi, lib
from trionet.net.flows import FlowTable
from trionet.vhost_user import messages as m
from trionet.vhost_user.codec import RequestDecoder
from trionet.vhost_user.constants import (
    MAX_MEM_REGIONS_TABLE,
    VHOST_USER_FLAG_NEED_REPLY,
    VHOST_USER_VERSION,
    Request,
)
from trionet.virtq.vring import RingAddresses, Vring

PAGE = mmap.PAGESIZE
_DEVNULL = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
_DEVZERO = os.open("/dev/zero", os.O_RDONLY | os.O_CLOEXEC)


def _is_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        return exc.errno == errno.EBADF
    return False


# ---- codec ------------------------------------------------------------------------

_CODES = [int(r) for r in Request] + [0, 99, 0xFFFFFFFF]
_SIZES = [0, 8, 12, 16, 40, 48, 8 + 32, 8 + 64, 8 + 8 * 32, 8 + 9 * 32, 4096, 4108, 4109]


def _payload(r: Reader, code: int) -> bytes:
    """A payload shaped for ``code`` more often than not (sizes the layout allows)."""
    if r.below(4) == 0:
        return r.blob(64)
    if code == Request.SET_MEM_TABLE:
        n = r.below(MAX_MEM_REGIONS_TABLE + 2)
        head = struct.pack("<II", r.pick([n, n, n + 1, r.u32()]), 0)
        return head + b"".join(_region_bytes(r) for _ in range(n))
    if code in (Request.ADD_MEM_REG, Request.REM_MEM_REG):
        return bytes(8) + _region_bytes(r)
    if code == Request.SET_VRING_ADDR:
        return struct.pack("<IIQQQQ", r.below(40), r.below(3), r.u64(), r.u64(), r.u64(), r.u64())
    if code in (Request.SET_VRING_NUM, Request.SET_VRING_BASE, Request.GET_VRING_BASE,
                Request.SET_VRING_ENABLE):  # fmt: skip
        return struct.pack("<II", r.below(40), r.pick([0, 1, 2, 256, 0x10000, r.u32()]))
    if code in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
        return struct.pack("<Q", r.below(40) | r.pick([0, 0, 0x100, 1 << 63, r.u64()]))
    if r.flag():
        return b""
    return struct.pack("<Q", r.pick([0, 1, 0xFF, 0x100, 1 << 32, r.u64()]))


def _region_bytes(r: Reader) -> bytes:
    size = r.pick([0, 1, PAGE, 1 << 30, r.u64()])
    addr = r.pick([0, PAGE, (1 << 64) - PAGE, r.u64()])
    return struct.pack("<QQQQ", addr, size, r.pick([addr, r.u64()]), r.pick([0, PAGE, r.u64()]))


def _stream(r: Reader) -> bytes:
    if r.flag():  # raw bytes
        return r.blob(512)
    out = b""
    for _ in range(r.below(6) + 1):
        code = r.pick(_CODES)
        flags = VHOST_USER_VERSION | (VHOST_USER_FLAG_NEED_REPLY if r.flag() else 0)
        if r.below(8) == 0:
            flags = r.u32()
        payload = _payload(r, code)
        size = len(payload) if r.below(8) else r.pick(_SIZES)
        out += m.encode_header(code, flags, size) + payload
    return out


def _check_roundtrip(req: Any) -> None:
    """A request the decoder built re-encodes to bytes that decode to the same request."""
    if isinstance(req, m.Unsupported):
        return
    data, fds = m.encode_request(req)
    copies = [os.dup(fd) for fd in fds]
    again = RequestDecoder()
    try:
        again.feed(data, copies)
        twin = again.next_request()
    except RemoteProtocolError as exc:
        raise AssertionError(f"{req} re-encoded to bytes the decoder refuses: {exc}") from None
    assert twin is not None and again.next_request() is None and again.pending_bytes == 0
    assert type(twin) is type(req) and twin.payload() == req.payload(), (req, twin)
    assert twin.need_reply == req.need_reply and len(twin.attached_fds()) == len(fds)
    for fd in twin.attached_fds():
        os.close(fd)
    again.close()


def codec(data: bytes) -> None:
    r = Reader(data)
    stream = _stream(r)
    dec = RequestDecoder()
    fed: list[int] = []
    handed: list[int] = []
    pos = 0
    failed = False
    try:
        while True:
            n = r.below(len(stream) - pos + 1) if r.remaining else len(stream) - pos
            n = max(n, 1) if stream else 0
            fds = [os.dup(_DEVNULL) for _ in range(r.pick([0, 0, 0, 1, 2, 9]))]
            fed += fds
            dec.feed(stream[pos : pos + n], fds)
            pos += n
            while (req := dec.next_request()) is not None:
                handed += req.attached_fds()
                _check_roundtrip(req)
            if pos >= len(stream):
                break
    except RemoteProtocolError:
        failed = True
    if failed:  # in ERROR: every later call refuses, and fds fed then are closed
        late = os.dup(_DEVNULL)
        fed.append(late)
        try:
            dec.feed(b"\0" * 12, [late])
            raise AssertionError("feed after a RemoteProtocolError did not raise")
        except LocalProtocolError:
            pass
    else:
        assert dec.pending_bytes == len(stream) - _whole_messages(stream)
    dec.close()
    assert dec.held_fds == 0
    for fd in handed:
        os.close(fd)  # EBADF here: the decoder closed an fd it had handed out
    leaked = [fd for fd in fed if not _is_closed(fd)]
    for fd in leaked:
        os.close(fd)
    assert not leaked, f"fds leaked: {leaked}"


def _whole_messages(stream: bytes) -> int:
    pos = 0
    while pos + 12 <= len(stream):
        (size,) = struct.unpack_from("<I", stream, pos + 8)
        if pos + 12 + size > len(stream):
            break
        pos += 12 + size
    return pos


# ---- memory -----------------------------------------------------------------------


class _Files:
    """The fds a fuzzed VMM may hand over: a 4-page memfd with a pattern, an
    empty memfd, a pipe, /dev/null."""

    def __init__(self) -> None:
        self.ram = os.memfd_create("fuzz-ram", os.MFD_CLOEXEC)
        self.ram_size = 4 * PAGE
        os.pwrite(self.ram, bytes(i * 7 % 251 for i in range(self.ram_size)), 0)
        self.empty = os.memfd_create("fuzz-empty", os.MFD_CLOEXEC)
        self.pipe_r, self.pipe_w = os.pipe2(os.O_CLOEXEC)
        self.sources = [self.ram, self.ram, self.ram, self.empty, self.pipe_r, _DEVNULL]
        self.sizes = {self.ram: self.ram_size, self.empty: 0}


_FILES: _Files | None = None


def _files() -> _Files:
    global _FILES
    if _FILES is None:
        _FILES = _Files()
    return _FILES


class _Region:
    def __init__(self, spec: RegionSpec, source: int) -> None:
        self.spec = spec
        self.source = source
        self.refs = 1


def _spec(r: Reader) -> RegionSpec:
    gpa = r.pick([0, PAGE, 2 * PAGE, 0x100000, (1 << 64) - PAGE, r.u64()])
    size = r.pick([PAGE, 2 * PAGE, 4 * PAGE, 5 * PAGE, 1, 0, (1 << 64) - 1, r.u64()])
    uva = r.pick([gpa + 0x7F00_0000_0000, gpa, r.u64()]) & ((1 << 64) - 1)
    offset = r.pick([0, PAGE, 3 * PAGE, 4 * PAGE, 100, (1 << 64) - PAGE, r.u64()])
    return RegionSpec(gpa, size, uva, offset)


def _model_lookup(model: list[_Region], gpa: int) -> _Region | None:
    for reg in model:
        if reg.spec.guest_addr <= gpa < reg.spec.guest_addr + reg.spec.size:
            return reg
    return None


def _model_read(model: list[_Region], gpa: int, length: int) -> bytes | None:
    out = bytearray()
    while len(out) < length:
        reg = _model_lookup(model, gpa + len(out))
        if reg is None:
            return None
        start = gpa + len(out) - reg.spec.guest_addr
        n = min(length - len(out), reg.spec.size - start)
        out += os.pread(reg.source, n, reg.spec.mmap_offset + start)
    return bytes(out)


def _model_write(model: list[_Region], gpa: int, data: bytes, files: _Files) -> bytes | None:
    """The RAM file after writing ``data`` at ``gpa`` span by span, in address
    order (regions may alias the same bytes of the file: the later span wins)."""
    image = bytearray(os.pread(files.ram, files.ram_size, 0))
    done = 0
    while done < len(data):
        reg = _model_lookup(model, gpa + done)
        if reg is None or reg.source != files.ram:
            return None
        start = gpa + done - reg.spec.guest_addr
        n = min(len(data) - done, reg.spec.size - start)
        at = reg.spec.mmap_offset + start
        image[at : at + n] = data[done : done + n]
        done += n
    return bytes(image)


def _check_table(mem: GuestMemory, model: list[_Region], files: _Files) -> None:
    assert mem.regions == tuple(reg.spec for reg in model), (mem.regions, model)
    assert len(model) <= MAX_REGIONS
    for i, reg in enumerate(model):
        s = reg.spec
        assert s.size > 0
        # mapped only inside its fd: touching a page past its end is SIGBUS
        assert s.mmap_offset + s.size <= files.sizes.get(reg.source, -1), s
        for other in model[:i]:
            o = other.spec
            assert not (
                s.guest_addr < o.guest_addr + o.size and o.guest_addr < s.guest_addr + s.size
            )
            assert not (s.user_addr < o.user_addr + o.size and o.user_addr < s.user_addr + s.size)


def memory(data: bytes) -> None:
    r = Reader(data)
    files = _files()
    mem = GuestMemory()
    model: list[_Region] = []
    try:
        for _ in range(r.below(12) + 1):
            op = r.below(7)
            if op == 0:  # SET_MEM_TABLE
                n = r.pick([0, 1, 1, 2, 3, MAX_REGIONS + 1])
                specs = [_spec(r) for _ in range(n)]
                sources = [r.pick(files.sources) for _ in range(n + r.pick([0, 0, 0, 1, -1]))]
                fds = [os.dup(src) for src in sources]
                try:
                    mem.set_table(specs, fds)
                    model = [_Region(s, src) for s, src in zip(specs, sources, strict=True)]
                except RemoteProtocolError:
                    pass
                assert all(_is_closed(fd) for fd in fds), "SET_MEM_TABLE kept an fd"
            elif op == 1:  # ADD_MEM_REG
                spec, source = _spec(r), r.pick(files.sources)
                fd = os.dup(source)
                try:
                    mem.add_region(spec, fd)
                    same = [reg for reg in model if _same(reg.spec, spec)]
                    if same:
                        same[0].refs += 1
                    else:
                        model.append(_Region(spec, source))
                except RemoteProtocolError:
                    pass
                assert _is_closed(fd), "ADD_MEM_REG kept its fd"
            elif op == 2:  # REM_MEM_REG
                spec = model[r.below(len(model))].spec if model and r.flag() else _spec(r)
                try:
                    mem.remove_region(spec)
                    i = next(i for i, reg in enumerate(model) if _same(reg.spec, spec))
                    model[i].refs -= 1
                    if model[i].refs == 0:
                        del model[i]
                except RemoteProtocolError:
                    assert not any(_same(reg.spec, spec) for reg in model)
            elif op == 3:  # read
                gpa, length = (
                    _address(r, model),
                    r.pick([0, 1, 8, PAGE, 3 * PAGE, r.below(1 << 14)]),
                )
                expected = _model_read(model, gpa, length) if length else b""
                try:
                    got = mem.read(gpa, length)
                    assert got == expected, (gpa, length)
                except GuestMemoryError:
                    assert expected is None, (gpa, length)
            elif op == 4:  # write
                gpa, payload = _address(r, model), r.blob(64) * r.pick([1, 1, 100])
                room = _model_read(model, gpa, len(payload))
                expected = _model_write(model, gpa, payload, files)
                try:
                    mem.write(gpa, payload)
                    assert room is not None and expected is not None
                    assert os.pread(files.ram, files.ram_size, 0) == expected, (gpa, len(payload))
                except GuestMemoryError:
                    assert room is None
            elif op == 5:  # translate a VMM address
                uva = r.pick([reg.spec.user_addr for reg in model] or [0]) + r.pick(
                    [0, 1, PAGE, -1]
                )
                uva &= (1 << 64) - 1
                want = next(
                    (
                        reg.spec.guest_addr + uva - reg.spec.user_addr
                        for reg in model
                        if reg.spec.user_addr <= uva < reg.spec.user_addr + reg.spec.size
                    ),
                    None,
                )
                try:
                    assert mem.uva_to_gpa(uva) == want
                except GuestMemoryError:
                    assert want is None
            else:
                mem.clear()
                model = []
            _check_table(mem, model, files)
    finally:
        mem.clear()


def _same(a: RegionSpec, b: RegionSpec) -> bool:
    return (a.guest_addr, a.size, a.user_addr) == (b.guest_addr, b.size, b.user_addr)


def _address(r: Reader, model: list[_Region]) -> int:
    base = r.pick([reg.spec.guest_addr for reg in model] or [0])
    end = r.pick([reg.spec.guest_addr + reg.spec.size for reg in model] or [0])
    return r.pick([base, end, end - 1, end - 8, base + r.below(4 * PAGE), r.u64()]) & (
        (1 << 64) - 1
    )


# ---- virtq ------------------------------------------------------------------------

RAM_SIZE = 64 * 1024
RAM2_GPA = 0x20000
RAM2_SIZE = 16 * 1024
UVA = 0x7F00_0000_0000
U64 = (1 << 64) - 1


class _Guest:
    """Fake guest memory, set up once: 64 KiB at gpa 0 and 16 KiB at 0x20000."""

    def __init__(self) -> None:
        self.fds = [os.memfd_create("fuzz-guest", os.MFD_CLOEXEC) for _ in range(2)]
        os.ftruncate(self.fds[0], RAM_SIZE)
        os.ftruncate(self.fds[1], RAM2_SIZE)
        self.maps = [mmap.mmap(self.fds[0], RAM_SIZE), mmap.mmap(self.fds[1], RAM2_SIZE)]
        self.mem = GuestMemory()
        self.mem.set_table(
            [
                RegionSpec(0, RAM_SIZE, UVA, 0),
                RegionSpec(RAM2_GPA, RAM2_SIZE, UVA + RAM2_GPA, 0),
            ],
            [os.dup(fd) for fd in self.fds],
        )
        self.flows = FlowTable()
        self.scratch = ffi.new("struct tn_scratch *")
        self.filter = ffi.new("struct tn_rxfilter *")
        self.zero = bytes(RAM_SIZE)

    def wipe(self) -> None:
        self.maps[0][:] = self.zero
        self.maps[1][:] = self.zero[:RAM2_SIZE]

    def write(self, gpa: int, data: bytes) -> None:
        if gpa >= 0 and gpa + len(data) <= RAM_SIZE:
            self.maps[0][gpa : gpa + len(data)] = data
        elif gpa >= RAM2_GPA and gpa + len(data) <= RAM2_GPA + RAM2_SIZE:
            o = gpa - RAM2_GPA
            self.maps[1][o : o + len(data)] = data


_GUEST: _Guest | None = None


def _guest() -> _Guest:
    global _GUEST
    if _GUEST is None:
        _GUEST = _Guest()
    return _GUEST


def _buffer_addr(r: Reader) -> int:
    return r.pick(
        [
            0x8000 + r.u16() % 0x7000,
            0x8000,
            RAM_SIZE - 1 - r.below(64),
            RAM2_GPA + r.below(RAM2_SIZE),
            RAM2_GPA - r.below(64),
            r.u64(),
        ]
    )


def _buffer_len(r: Reader) -> int:
    return r.pick([r.below(2048), 0, 1, 12, 64, 1514, 65536, 70000, 0xFFFFFFFF, r.u32()])


def _descriptor(r: Reader, size: int, table: int) -> bytes:
    flags = r.below(8) if r.below(8) else r.u16()
    addr = table if flags & 4 and r.flag() else _buffer_addr(r)
    length = r.pick([16 * r.below(8), 16 * 1025, r.u32()]) if flags & 4 else _buffer_len(r)
    return struct.pack("<QIHH", addr, length, flags, r.below(size + 2))


def _ring(r: Reader, g: _Guest, index: int, features: int) -> Vring | None:
    """Lay a ring out in guest memory from the fuzz bytes; None when the VMM
    side refuses it (a size that is not a power of two, addresses outside)."""
    size = r.pick([1, 2, 4, 8, 16, 256, 3, 0, 32768, 1 << 16])
    vr = Vring(index)
    try:
        vr.set_num(size)
        vr.set_base(r.pick([0, 0, 0xFFFF, r.u16(), 0x10000]))
    except RemoteProtocolError:
        return None
    slot = 0x2000 * index
    if r.below(4):
        desc, avail, used = slot, slot + 16 * size, slot + 16 * size + 6 + 2 * size + 2
        used = (used + 3) & ~3
    else:
        desc, avail, used = (_buffer_addr(r) for _ in range(3))
    table = 0x6000 + 0x800 * index  # where indirect tables go
    for i in range(min(size, 32)):
        g.write(desc + 16 * i, _descriptor(r, size, table))
    for i in range(r.below(24)):
        g.write(table + 16 * i, _descriptor(r, 1024, table))
    ready = r.pick([1, 2, size, r.below(size + 1), r.u16()])
    g.write(avail, struct.pack("<HH", r.pick([0, 0, 1, r.u16()]), (vr.base + ready) & 0xFFFF))
    for i in range(min(ready, size, 32)):
        g.write(avail + 4 + 2 * ((vr.base + i) % size), struct.pack("<H", r.below(size + 2)))
    g.write(avail + 4 + 2 * size, struct.pack("<H", r.u16()))  # used_event
    g.write(used, struct.pack("<HH", r.pick([0, 1, r.u16()]), r.pick([vr.base, r.u16()])))
    vr.set_addresses(RingAddresses(*((a + UVA) & U64 for a in (desc, avail, used))))
    vr.started = True
    try:
        vr.attach(g.mem, features)
    except RemoteProtocolError:
        return None
    return vr


def _batch() -> Any:
    return ffi.new("struct tn_batch *")


def _check(vr: Vring, rc: int) -> None:
    """A walk returns a count, or a TN_E_* with the ring then marked broken."""
    if rc < 0:
        assert vr.vq.broken and int(vr.vq.error) == rc, (rc, int(vr.vq.error))


def virtq(data: bytes) -> None:
    r = Reader(data)
    g = _guest()
    g.wipe()
    features = (r.below(8) << 28) | (1 << 32)  # INDIRECT_DESC, EVENT_IDX, (bit 30) + VERSION_1
    rx = _ring(r, g, 0, features)
    tx = _ring(r, g, 1, features)
    mrg = r.below(2)
    hdr = r.pick([12, 10, 12, 0])
    mem = g.mem.table
    s = g.scratch
    flows = r.pick([g.flows.c, ffi.NULL])
    rxfilter = ffi.NULL
    if r.flag():
        size = ffi.sizeof("struct tn_rxfilter")
        ffi.memmove(g.filter, r.take(size).ljust(size, b"\0"), size)
        rxfilter = g.filter
    for _ in range(r.below(8) + 1):
        op = r.below(10)
        vr = rx if r.flag() else tx
        if vr is None:
            continue
        most = r.pick([1, 4, 64, 256])
        try:
            if op == 0:
                for _ in range(most):
                    if vr.pop(g.mem, r.below(3)) is None:
                        break
            elif op == 1:
                _check(vr, lib.tn_vq_discard(vr.vq, mem, r.below(3), most))
            elif op == 2:
                _check(vr, lib.tn_tx_to_fd(vr.vq, mem, _DEVNULL, hdr, most, _batch(), flows, 0))
            elif op == 3:
                frame = bytes(hdr) + r.blob(128) * r.pick([1, 1, 12, 500])
                frame = frame[: lib.TN_MAX_FRAME]
                _check(
                    vr, lib.tn_rx_fill(vr.vq, mem, mrg, hdr, frame, len(frame), most, s, _batch())
                )
            elif op == 4:
                need = r.pick([hdr + 1514, hdr + 65550, 64, 0])
                rc = lib.tn_rx_from_fd(
                    vr.vq, mem, _DEVZERO, mrg, hdr, need, most, s, _batch(), rxfilter
                )
                _check(vr, rc)
            elif op == 5 and rx is not None and tx is not None:
                rc = lib.tn_loop_batch(
                    tx.vq, rx.vq, mem, mrg, hdr, most, s, _batch(), _batch(), flows, 1
                )
                assert rc >= 0 or tx.vq.broken or rx.vq.broken
            elif op == 6:
                vr.push(r.u16(), r.u32())
                vr.publish()
            elif op == 7:
                vr.needs_notify()
                vr.enable_notify()
                vr.disable_notify()
            elif op == 8:
                vr.pending()
            else:
                lib.tn_vq_spin(vr.vq, 0)
                vr.reattach(g.mem)
        except RingError:
            assert vr.broken is not None


TARGETS: dict[str, Callable[[bytes], None]] = {"codec": codec, "memory": memory, "virtq": virtq}
