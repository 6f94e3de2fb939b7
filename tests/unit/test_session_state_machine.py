"""Any sequence of vhost-user requests leaves a session serving or closed.

In the manner of h2's ``test_state_machines.py``: Hypothesis drives the
back-end with requests in any order, valid, out of order or malformed, and
checks after every step that

* the conversation is serving or closed, never stuck: each request either
  gets handled or ends the connection with a logged error;
* every request that expects a reply (GET_*, refused requests whose reply is
  their answer, NEED_REPLY once REPLY_ACK is negotiated) gets exactly one, or
  the connection closes;
* every fd the VMM sent is held by a ring, waiting in the decoder, or
  closed; when the connection ends, all of them are closed.

``VhostUserMachine`` runs the sans-IO layers as ``Session`` composes them
(decoder, ``BackendProtocol``, fds retired after each request), fast enough
for many sequences.  ``test_session_serves_or_closes`` sends sequences to a
real in-process service over its socket: after any of them the connection
still answers or is closed, the next connection is served, and the process
holds no more fds than before.
"""

from __future__ import annotations

import array
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tests.unit.vhost_user_wire import is_open
from tests.waits import until
from trionet.backends.loop import LoopBackend
from trionet.errors import LocalProtocolError, RemoteProtocolError
from trionet.net import features as F
from trionet.service.server import Service, ServiceConfig
from trionet.vhost_user import messages as m
from trionet.vhost_user.backend import _REFUSALS, BackendProtocol
from trionet.vhost_user.codec import RequestDecoder
from trionet.vhost_user.constants import (
    VHOST_USER_FLAG_NEED_REPLY,
    VHOST_USER_VERSION,
    ProtocolFeature,
    Request,
)
from trionet.vhost_user.replies import ReplyDecoder

PAIRS = 2
RAM = 1 << 20
UVA = 0x7F00_0000_0000
FD_KINDS = ("eventfd", "eventfd", "memfd", "devnull", "pipe")
GETS = frozenset(
    {
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.GET_QUEUE_NUM,
        Request.GET_MAX_MEM_SLOTS,
        Request.GET_VRING_BASE,
        Request.GET_STATUS,
    }
)

# ---- requests as recipes: plain data Hypothesis can shrink and print ----------------

_need = st.booleans()
_index = st.integers(0, 2 * PAIRS + 2)
_fd_kind = st.sampled_from(FD_KINDS)
_addr = st.one_of(st.sampled_from([UVA + 0x1000 * k for k in range(8)]), st.integers(0, 2**64 - 1))
_region = st.one_of(
    st.just((0, RAM, UVA, 0)),
    st.tuples(
        st.sampled_from([0, 0x1000, RAM]),
        st.sampled_from([0x1000, RAM, 2 * RAM]),
        st.sampled_from([UVA, UVA + RAM, 0]),
        st.sampled_from([0, 0x1000, RAM]),
    ),
)

Recipe = tuple[Any, ...]

_NO_PAYLOAD = [
    "GetFeatures",
    "SetOwner",
    "ResetOwner",
    "GetProtocolFeatures",
    "GetQueueNum",
    "GetMaxMemSlots",
    "GetStatus",
    "ResetDevice",
]
_PROTOCOL = [
    0,
    int(ProtocolFeature.REPLY_ACK),
    int(ProtocolFeature.REPLY_ACK | ProtocolFeature.STATUS),
    2**64 - 1,
]
_TABLE = st.lists(st.tuples(_region, _fd_kind), min_size=1, max_size=3)

recipes: st.SearchStrategy[Recipe] = st.one_of(
    st.tuples(st.sampled_from(_NO_PAYLOAD), _need),
    st.tuples(
        st.just("SetFeatures"),
        st.sampled_from([0, int(F.BASE_FEATURES), 1 << 30, 2**64 - 1]),
        _need,
    ),
    st.tuples(st.just("SetProtocolFeatures"), st.sampled_from(_PROTOCOL), _need),
    st.tuples(st.just("SetMemTable"), _TABLE, _need),
    st.tuples(st.just("AddMemReg"), _region, _fd_kind, _need),
    st.tuples(st.just("RemMemReg"), _region, _need),
    st.tuples(st.just("SetVringNum"), _index, st.sampled_from([0, 3, 64, 256, 1 << 16]), _need),
    st.tuples(st.just("SetVringAddr"), _index, _addr, _addr, _addr, _need),
    st.tuples(st.just("SetVringBase"), _index, st.sampled_from([0, 5, 0xFFFF, 0x10000]), _need),
    st.tuples(st.just("GetVringBase"), _index, _need),
    st.tuples(
        st.sampled_from(["SetVringKick", "SetVringCall", "SetVringErr"]),
        _index,
        st.one_of(st.none(), _fd_kind),
        _need,
    ),
    st.tuples(st.just("SetVringEnable"), _index, st.booleans(), _need),
    st.tuples(st.just("SetStatus"), st.sampled_from([0, 1, 3, 11, 15, 0x40, 0xFF]), _need),
    st.tuples(st.just("NetSetMtu"), st.sampled_from([0, 68, 1500, 65535, 2**40]), _need),
    st.tuples(
        st.just("Unsupported"),
        st.sampled_from([6, 7, 22, 24, 25, 28, 31, 32, 41, 42, 99, 0]),
        st.binary(max_size=16),
        st.lists(_fd_kind, max_size=2),
        _need,
    ),
    st.tuples(st.just("raw"), st.binary(min_size=1, max_size=40), st.lists(_fd_kind, max_size=3)),
)


class Fds:
    """Makes the fds a recipe calls for, and remembers every one."""

    def __init__(self) -> None:
        self.made: set[int] = set()

    def make(self, kind: str) -> int:
        if kind == "eventfd":
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        elif kind == "memfd":
            fd = os.memfd_create("sm-guest", os.MFD_CLOEXEC)
            os.ftruncate(fd, RAM)
        elif kind == "devnull":
            fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        else:
            r, fd = os.pipe2(os.O_CLOEXEC)
            os.close(r)
        self.made.add(fd)
        return fd

    def still_open(self) -> set[int]:
        self.made = {fd for fd in self.made if is_open(fd)}
        return set(self.made)


def encode(recipe: Recipe, make_fd: Callable[[str], int]) -> tuple[bytes, list[int]]:
    """The bytes and fds a VMM would send for ``recipe``; one our message types
    refuse to build (a ring size of 0, an odd address) goes out as raw bytes."""
    name, *args = recipe
    if name == "raw":
        data, kinds = args
        return data, [make_fd(k) for k in kinds]
    fds: list[int] = []

    def fd(kind: str) -> int:
        fds.append(make_fd(kind))
        return fds[-1]

    need = args[-1]
    try:
        if name == "Unsupported":
            code, payload, kinds, _ = args
            return m.encode_request(m.Unsupported(code, payload, tuple(fd(k) for k in kinds), need))
        cls = getattr(m, name)
        if name == "SetMemTable":
            regions = args[0]
            req = cls(
                tuple(m.MemRegion(*r) for r, _ in regions), tuple(fd(k) for _, k in regions), need
            )
        elif name == "AddMemReg":
            req = cls(m.MemRegion(*args[0]), fd(args[1]), need)
        elif name == "RemMemReg":
            req = cls(m.MemRegion(*args[0]), need)
        elif name == "SetVringAddr":
            index, desc, used, avail, _ = args
            req = cls(index, 0, desc, used, avail, 0, need)
        elif name in ("SetVringKick", "SetVringCall", "SetVringErr"):
            index, kind, _ = args
            req = cls(index, None if kind is None else fd(kind), need)
        else:
            req = cls(*args)
        return m.encode_request(req)
    except LocalProtocolError:
        return _raw(name, args, fds), fds


def _raw(name: str, args: list[Any], fds: list[int]) -> bytes:
    """What a VMM that ignores the rules would send for a recipe."""
    cls = getattr(m, name)
    *fields, need = args
    if name == "SetVringAddr":
        index, desc, used, avail = fields
        payload = m.VRING_ADDR_STRUCT.pack(index, 0, desc, used, avail, 0)
    elif name in ("SetVringNum", "SetVringBase", "GetVringBase", "SetVringEnable"):
        payload = m.VRING_STATE_STRUCT.pack(fields[0], int(fields[-1]) & 0xFFFFFFFF)
    elif name in ("SetMemTable",):
        regions = fields[0]
        payload = m.MEM_TABLE_HEADER_STRUCT.pack(len(regions), 0) + b"".join(
            m.MEM_REGION_STRUCT.pack(*r) for r, _ in regions
        )
    elif name in ("AddMemReg", "RemMemReg"):
        payload = m.SINGLE_MEM_REGION_STRUCT.pack(0, *fields[0])
    else:
        payload = m.U64_STRUCT.pack(int(fields[0]) & (2**64 - 1)) if fields else b""
    flags = VHOST_USER_VERSION | (VHOST_USER_FLAG_NEED_REPLY if need else 0)
    return m.encode_header(int(cls.REQUEST), flags, len(payload)) + payload


def expects_reply(req: Any, reply_ack: bool) -> bool:
    code = req.request_code
    return code in GETS or code in _REFUSALS or (bool(req.need_reply) and reply_ack)


# ---- sans-IO: the layers a Session composes ------------------------------------------


class VhostUserMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.fds = Fds()
        self.decoder = RequestDecoder()
        self.proto = self._new_proto()
        self.closed = False

    def _close(self) -> None:
        """What Session._cleanup does when a connection ends."""
        self.closed = True
        self.decoder.close()
        fds = self.proto.take_retired_fds()
        for vr in self.proto.vrings:
            fds += [fd for fd in (vr.kick_fd, vr.call_fd, vr.err_fd) if fd is not None]
            vr.kick_fd = vr.call_fd = vr.err_fd = None
        for fd in fds:
            os.close(fd)  # EBADF: an fd closed twice, or one trionet no longer owned
        self.proto.memory.clear()

    @precondition(lambda self: self.closed)
    @rule()
    def reconnect(self) -> None:
        """The next VMM connection: a fresh session."""
        self.decoder = RequestDecoder()
        self.proto = self._new_proto()
        self.closed = False

    def _new_proto(self) -> BackendProtocol:
        offered = int(F.BASE_FEATURES | LoopBackend(PAIRS).offered_features())
        return BackendProtocol(max_pairs=PAIRS, offered_features=offered)

    @precondition(lambda self: not self.closed)
    @rule(recipe=recipes, split=st.integers(0, 64))
    def send(self, recipe: Recipe, split: int) -> None:
        data, fds = encode(recipe, self.fds.make)
        pieces = (
            [(data[:split], fds), (data[split:], [])] if 0 < split < len(data) else [(data, fds)]
        )
        for chunk, chunk_fds in pieces:
            try:
                self.decoder.feed(chunk, chunk_fds)
            except LocalProtocolError:
                raise AssertionError("fed a decoder that had failed") from None
            while not self.closed:
                try:
                    req = self.decoder.next_request()
                except RemoteProtocolError:
                    self._close()  # malformed: logged, connection closed
                    return
                if req is None:
                    break
                self._handle(req)

    def _handle(self, req: Any) -> None:
        wants = expects_reply(req, self.proto.reply_ack)
        try:
            reply = self.proto.handle(req)
        except RemoteProtocolError as exc:
            reply = exc.reply
            if exc.fatal:  # logged, connection closed: the VMM sees EOF, not silence
                self._retire()
                self._close()
                return
            assert reply is not None or not wants, f"{req}: refused without the reply it expects"
        else:
            assert reply is not None or not wants, f"{req}: handled without the reply it expects"
            self.proto.take_events()
        if reply is not None:
            assert m.HEADER_STRUCT.unpack_from(reply)[0] == req.request_code
        self._retire()

    def _retire(self) -> None:
        for fd in self.proto.take_retired_fds():
            os.close(fd)

    @invariant()
    def fds_are_accounted_for(self) -> None:
        open_fds = self.fds.still_open()
        if self.closed:
            assert not open_fds, f"fds left open after the connection closed: {open_fds}"
            return
        held = {
            fd
            for vr in self.proto.vrings
            for fd in (vr.kick_fd, vr.call_fd, vr.err_fd)
            if fd is not None
        }
        assert held <= open_fds, "a ring holds an fd that was closed"
        assert len(open_fds - held) == self.decoder.held_fds, (
            f"{len(open_fds - held)} fds open that no ring holds, decoder holds "
            f"{self.decoder.held_fds}"
        )

    def teardown(self) -> None:
        if not self.closed:
            self._close()
        assert not self.fds.still_open()


VhostUserMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip
TestVhostUserMachine = VhostUserMachine.TestCase


# ---- a real session over its socket --------------------------------------------------


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _exchange(sock: trio.socket.SocketType, data: bytes, fds: list[int]) -> None:
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        await sock.sendmsg([data], anc)
    else:
        await sock.send(data)


async def _probe(sock: trio.socket.SocketType) -> str:
    """GET_QUEUE_NUM: "serving" once its reply comes (after any earlier replies),
    "closed" on EOF; a connection that does neither within 10 s is wedged."""
    replies = ReplyDecoder()
    try:
        await sock.send(m.encode_request(m.GetQueueNum())[0])
    except OSError:
        return "closed"
    with trio.fail_after(10):
        while True:
            try:
                data = await sock.recv(65536)
            except OSError:
                return "closed"
            if not data:
                return "closed"
            replies.feed(data)
            while (reply := replies.next_reply()) is not None:
                if reply[0] == Request.GET_QUEUE_NUM:
                    return "serving"


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(recipes, max_size=12), st.sampled_from(["trio", "threads"]))
async def test_session_serves_or_closes(sequence: list[Recipe], mode: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = ServiceConfig(
            threads=mode == "threads", queue_pairs=PAIRS, socket_path=Path(tmp) / "s.sock"
        )
        service = Service(config, LoopBackend(PAIRS))
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            before = _fd_count()
            fds = Fds()
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await sock.connect(str(config.socket_path))
            sent_ok = True
            for recipe in sequence:
                data, sent = encode(recipe, fds.make)
                try:
                    await _exchange(sock, data, sent)
                except OSError:
                    sent_ok = False  # trionet closed the connection: allowed
                for fd in sent:
                    os.close(fd)  # ours; trionet has its own copies
                if not sent_ok:
                    break
            state = await _probe(sock) if sent_ok else "closed"
            assert state in ("serving", "closed")
            sock.close()
            # the next connection is served
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await sock.connect(str(config.socket_path))
            assert await _probe(sock) == "serving"
            sock.close()
            # the session of each connection ends and gives back every fd it got
            await until(
                lambda: service.sessions_served == 2 and _fd_count() <= before,
                f"both sessions to end and give back their fds ({before} open before)",
            )
            nursery.cancel_scope.cancel()
