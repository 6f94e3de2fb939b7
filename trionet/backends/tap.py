"""The tap backend: one multi-queue Linux tap, one queue fd per virtio queue pair.

Every queue fd is a separate ``open("/dev/net/tun")`` bound to the same tap
with ``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE``; frames read from
and written to it start with the 12-byte ``virtio_net_hdr_v1``.

Queue steering, as the kernel does it: a freshly opened queue fd is attached
and gets the next kernel queue index; detaching (``TUNSETQUEUE`` with
``IFF_DETACH_QUEUE``) moves the *last* attached queue into the hole; attaching
appends.  ``set_active_pairs`` therefore attaches lowest first and detaches from
the top down, so queue fd ``i`` always carries kernel queue index ``i``.  The
kernel spreads outgoing flows over the attached queues by a symmetric flow hash
(or, for flows we have written into the tap, the queue we wrote them on).

Raw fds are handled as trio's ``_unix_pipes`` does: ``notify_closing`` before
``os.close``; reads and writes retry on ``BlockingIOError`` after
``wait_readable`` / ``wait_writable``.

pyroute2 is only used through :mod:`trionet.backends.netlink`, on a worker thread.
"""

from __future__ import annotations

import errno
import fcntl
import os

import trio

from trionet._native import ffi, lib
from trionet.backends import netlink
from trionet.net.features import header_length

__all__ = [
    "TUN_F_CSUM",
    "TUN_F_TSO4",
    "TUN_F_TSO6",
    "TUN_F_TSO_ECN",
    "TUN_F_UFO",
    "VIRTIO_NET_F_CSUM",
    "VIRTIO_NET_F_GUEST_CSUM",
    "VIRTIO_NET_F_GUEST_ECN",
    "VIRTIO_NET_F_GUEST_TSO4",
    "VIRTIO_NET_F_GUEST_TSO6",
    "VIRTIO_NET_F_GUEST_UFO",
    "VIRTIO_NET_F_HOST_ECN",
    "VIRTIO_NET_F_HOST_TSO4",
    "VIRTIO_NET_F_HOST_TSO6",
    "VIRTIO_NET_F_HOST_UFO",
    "VNET_HDR_SIZE",
    "TapBackend",
    "TapError",
    "honourable_features",
    "tun_offloads_for_features",
]

#: ``sizeof(struct virtio_net_hdr_v1)``: the header in front of every frame.
VNET_HDR_SIZE = 12
#: Largest frame a queue fd hands out: header + 64 KiB GSO frame + Ethernet header.
MAX_READ = VNET_HDR_SIZE + 65536 + 14

IFNAMSIZ = 16
_TUNSETPERSIST = 0x400454CB  # _IOW('T', 203, int); the argument is passed by value
_TUNSETOWNER = 0x400454CC
_TUNSETGROUP = 0x400454CE
_TUNGETIFF = 0x800454D2

TUN_F_CSUM: int = lib.TN_TUN_F_CSUM
TUN_F_TSO4: int = lib.TN_TUN_F_TSO4
TUN_F_TSO6: int = lib.TN_TUN_F_TSO6
TUN_F_TSO_ECN: int = lib.TN_TUN_F_TSO_ECN
TUN_F_UFO: int = lib.TN_TUN_F_UFO
_ALL_TUN_F = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO

# virtio-net feature bit numbers (virtio 1.2, 5.1.3).
# TODO(lead): move to trionet/net/features.py.
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_HOST_UFO = 14


def _bit(n: int) -> int:
    return 1 << n


def tun_offloads_for_features(features: int) -> int:
    """TUN_F_* flags for the negotiated virtio-net ``features``.

    The GUEST_* bits say what the driver accepts on receive, which is what the
    kernel may hand us on a queue fd.  Without GUEST_CSUM nothing else is
    allowed (the kernel rejects TSO/UFO without CSUM), and TUN_F_TSO_ECN is only
    kept alongside TSO4 or TSO6 (the kernel rejects it alone).
    """
    if not features & _bit(VIRTIO_NET_F_GUEST_CSUM):
        return 0
    flags = TUN_F_CSUM
    if features & _bit(VIRTIO_NET_F_GUEST_TSO4):
        flags |= TUN_F_TSO4
    if features & _bit(VIRTIO_NET_F_GUEST_TSO6):
        flags |= TUN_F_TSO6
    if features & _bit(VIRTIO_NET_F_GUEST_ECN) and flags & (TUN_F_TSO4 | TUN_F_TSO6):
        flags |= TUN_F_TSO_ECN
    if features & _bit(VIRTIO_NET_F_GUEST_UFO):
        flags |= TUN_F_UFO
    return flags


def honourable_features(supported_tun: int) -> int:
    """The offload-related virtio-net feature bits a tap can honour, given the
    TUN_F_* bits the kernel accepts (``TapBackend.supported_offloads()``).

    Transmit side (CSUM, HOST_*): the tap takes partially checksummed and GSO
    frames on write whatever TUNSETOFFLOAD says (``virtio_net_hdr_to_skb``), so
    these only follow the virtio dependency rules (HOST_* need CSUM, HOST_ECN
    needs HOST_TSO4 or HOST_TSO6).  Receive side (GUEST_*): each needs its
    TUN_F_* bit, plus TUN_F_CSUM.
    """
    out = (
        _bit(VIRTIO_NET_F_CSUM)
        | _bit(VIRTIO_NET_F_HOST_TSO4)
        | _bit(VIRTIO_NET_F_HOST_TSO6)
        | _bit(VIRTIO_NET_F_HOST_ECN)
        | _bit(VIRTIO_NET_F_HOST_UFO)
    )
    if not supported_tun & TUN_F_CSUM:
        return out
    out |= _bit(VIRTIO_NET_F_GUEST_CSUM)
    if supported_tun & TUN_F_TSO4:
        out |= _bit(VIRTIO_NET_F_GUEST_TSO4)
    if supported_tun & TUN_F_TSO6:
        out |= _bit(VIRTIO_NET_F_GUEST_TSO6)
    if supported_tun & TUN_F_TSO_ECN and supported_tun & (TUN_F_TSO4 | TUN_F_TSO6):
        out |= _bit(VIRTIO_NET_F_GUEST_ECN)
    if supported_tun & TUN_F_UFO:
        out |= _bit(VIRTIO_NET_F_GUEST_UFO)
    return out


class TapError(Exception):
    """Opening or steering the tap failed; the message says why.

    ``errno`` is the kernel's error number when there was one.
    """

    def __init__(self, msg: str, errno_: int | None = None) -> None:
        super().__init__(msg)
        self.errno = errno_


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise TapError(f"{what}: {os.strerror(-ret)}", -ret)
    return ret


# Thin indirections over the C calls (tests replace them to inject failures).
def _tap_open(name: str) -> int:
    name_out = ffi.new("char[]", IFNAMSIZ)
    ret: int = lib.tn_tap_open(name.encode(), 1, name_out)
    return ret


def _set_queue(fd: int, attach: bool) -> int:
    ret: int = lib.tn_tap_set_queue(fd, 1 if attach else 0)
    return ret


def _set_offload(fd: int, flags: int) -> int:
    ret: int = lib.tn_tap_set_offload(fd, flags)
    return ret


def _set_vnet_hdr_sz(fd: int, size: int) -> int:
    ret: int = lib.tn_tap_set_vnet_hdr_sz(fd, size)
    return ret


class TapBackend:
    """A multi-queue tap with ``queue_pairs`` queue fds (see module docstring)."""

    def __init__(self, name: str, queue_pairs: int) -> None:
        if not name or len(name.encode()) >= IFNAMSIZ or "/" in name or name.isspace():
            raise ValueError(f"bad interface name {name!r}")
        if not 1 <= queue_pairs <= 256:
            raise ValueError(f"queue_pairs must be 1..256, not {queue_pairs}")
        self._name = name
        self._queue_pairs = queue_pairs
        self._fds: list[int] = []
        self._attached: list[bool] = []
        self._created = False
        self._supported = 0
        self._offloads = 0
        self._hdr_size = VNET_HDR_SIZE
        self._closed = False

    # ------------------------------------------------------------------ open

    async def open(self) -> None:
        """Create (or find) the tap, open every queue fd, bring the link up."""
        if self._fds or self._closed:
            raise TapError(f"tap {self._name}: open() called twice")
        info = await self._link_info()
        if info is None:
            try:
                await netlink.create_tap_async(self._name, multi_queue=True)
                self._created = True
            except FileExistsError:  # lost a race with someone creating it
                info = await self._link_info()
            except OSError as err:
                raise TapError(f"create tap {self._name}: {err.strerror}", err.errno) from err
        if info is not None:
            self._check_existing(info)
        try:
            for pair in range(self._queue_pairs):
                self._open_queue(pair)
            self._supported = self._probe_offloads()
            try:
                await netlink.set_link_up_async(self._name)
            except OSError as err:
                raise TapError(f"set {self._name} up: {err.strerror}", err.errno) from err
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.aclose()
            raise

    async def _link_info(self) -> netlink.LinkInfo | None:
        try:
            return await netlink.link_info_async(self._name)
        except OSError as err:
            raise TapError(f"query link {self._name}: {err.strerror}", err.errno) from err

    def _check_existing(self, info: netlink.LinkInfo) -> None:
        name = self._name
        if not info.is_tap:
            kind = "tun (layer 3)" if info.kind == "tun" else info.kind or "plain"
            raise TapError(f"link {name} exists and is a {kind} device, not a tap", errno.EINVAL)
        if not info.multi_queue:
            raise TapError(
                f"tap {name} exists without IFF_MULTI_QUEUE; recreate it with "
                f"'ip tuntap add mode tap multi_queue vnet_hdr name {name}'",
                errno.EINVAL,
            )
        if info.pi:
            raise TapError(f"tap {name} exists with packet information (IFF_NO_PI unset)")
        busy = info.num_queues + info.num_disabled_queues
        if busy:
            raise TapError(f"tap {name} is in use: {busy} queue(s) already open", errno.EBUSY)
        # A missing IFF_VNET_HDR is no obstacle: TUNSETIFF from our queue fds sets
        # the IFF_VNET_HDR feature flag on the device.

    def _open_queue(self, pair: int) -> None:
        what = f"tap {self._name} queue {pair}"
        fd = _tap_open(self._name)
        if fd < 0:
            err = -fd
            hint = {
                errno.EINVAL: "the link is not a multi-queue tap (IFF_MULTI_QUEUE) "
                "or its flags differ",
                errno.EPERM: "not allowed to attach (tap owner/group, or CAP_NET_ADMIN needed)",
                errno.EBUSY: "the tap is busy",
                errno.E2BIG: "too many queues on this tap",
                errno.ENOENT: "/dev/net/tun is missing",
            }.get(err, os.strerror(err))
            raise TapError(f"open {what}: {hint} ({os.strerror(err)})", err)
        self._fds.append(fd)
        self._attached.append(True)  # a new IFF_MULTI_QUEUE queue fd is attached
        _check(_set_vnet_hdr_sz(fd, VNET_HDR_SIZE), f"TUNSETVNETHDRSZ on {what}")
        _check(_set_offload(fd, 0), f"TUNSETOFFLOAD on {what}")

    def _probe_offloads(self) -> int:
        """Try each TUN_F_* bit (with the ones it needs) once; leave offloads at 0."""
        fd = self._fds[0]
        supported = 0
        for flags in (
            TUN_F_CSUM,
            TUN_F_CSUM | TUN_F_TSO4,
            TUN_F_CSUM | TUN_F_TSO6,
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO_ECN,
            TUN_F_CSUM | TUN_F_TSO6 | TUN_F_TSO_ECN,
            TUN_F_CSUM | TUN_F_UFO,
        ):
            if _set_offload(fd, flags) == 0:
                supported |= flags
        _check(_set_offload(fd, 0), f"TUNSETOFFLOAD 0 on tap {self._name}")
        return supported

    # ------------------------------------------------------------ properties

    @property
    def name(self) -> str:
        return self._name

    @property
    def queue_pairs(self) -> int:
        return self._queue_pairs

    @property
    def created(self) -> bool:
        """Whether open() created the link (and aclose() will delete it)."""
        return self._created

    @property
    def attached(self) -> tuple[bool, ...]:
        """Per queue fd: attached to the tap (True) or detached (False)."""
        return tuple(self._attached)

    def queue_fd(self, pair: int) -> int:
        if not 0 <= pair < len(self._fds):
            raise IndexError(f"tap {self._name} has no open queue {pair}")
        return self._fds[pair]

    def supported_offloads(self) -> int:
        """TUN_F_* bits this kernel accepts (probed once at open)."""
        return self._supported

    @property
    def offloads(self) -> int:
        """TUN_F_* flags last set with set_offloads (0 after open)."""
        return self._offloads

    # -------------------------------------------------------------- control

    def offered_features(self) -> int:
        """virtio-net offload bits this tap can honour (offered to the guest)."""
        return honourable_features(self._supported)

    def set_features(self, features: int) -> None:
        """The driver's negotiated features: header size and TUNSETOFFLOAD to match."""
        self._require_open()
        size = header_length(features)
        for pair, fd in enumerate(self._fds):
            _check(_set_vnet_hdr_sz(fd, size), f"TUNSETVNETHDRSZ {size} on queue {pair}")
        self._hdr_size = size
        self.set_offloads(tun_offloads_for_features(features))

    def set_offloads(self, tun_flags: int) -> None:
        """TUNSETOFFLOAD ``tun_flags`` on every queue fd."""
        self._require_open()
        if tun_flags & ~_ALL_TUN_F:
            raise TapError(f"unknown TUN_F_* bits {tun_flags & ~_ALL_TUN_F:#x}", errno.EINVAL)
        for pair, fd in enumerate(self._fds):
            _check(
                _set_offload(fd, tun_flags),
                f"TUNSETOFFLOAD {tun_flags:#x} on tap {self._name} queue {pair}",
            )
        self._offloads = tun_flags

    async def set_active_pairs(self, n: int) -> None:
        """Attach exactly queues ``0..n-1``; detach the rest.

        Only queues whose state changes see a TUNSETQUEUE (the kernel answers
        EINVAL to attaching an attached queue or detaching a detached one).
        ``attached`` is updated queue by queue, so after a TapError it still
        tells the truth.
        """
        await trio.lowlevel.checkpoint()
        self._require_open()
        if not 1 <= n <= self._queue_pairs:
            raise ValueError(f"active pairs must be 1..{self._queue_pairs}, not {n}")
        for pair in range(n):  # attach upward, lowest first
            if not self._attached[pair]:
                self._set_queue_state(pair, True)
        for pair in range(self._queue_pairs - 1, n - 1, -1):  # detach top down
            if self._attached[pair]:
                self._set_queue_state(pair, False)

    def _set_queue_state(self, pair: int, attach: bool) -> None:
        verb = "attach" if attach else "detach"
        _check(_set_queue(self._fds[pair], attach), f"{verb} tap {self._name} queue {pair}")
        self._attached[pair] = attach

    def release_to(self, uid: int, gid: int) -> None:
        """Before privileges are dropped (``--user``): a tap this backend created
        becomes owned by ``uid``/``gid`` and non-persistent, so the kernel deletes
        it when the last queue fd closes (deleting it over netlink would need the
        CAP_NET_ADMIN the service no longer has).  A tap someone else created is
        left as it is: attaching and detaching queues needs no capability."""
        self._require_open()
        if not self._created:
            return
        fd = self._fds[0]
        for request, arg, what in (
            (_TUNSETOWNER, uid, "TUNSETOWNER"),
            (_TUNSETGROUP, gid, "TUNSETGROUP"),
            (_TUNSETPERSIST, 0, "TUNSETPERSIST 0"),
        ):
            try:
                fcntl.ioctl(fd, request, arg)
            except OSError as err:
                raise TapError(f"{what} on tap {self._name}: {err.strerror}", err.errno) from err
        self._created = False

    def lost(self) -> str | None:
        """Why the tap is no longer there (deleted, or moved to another
        namespace), or None: a queue fd whose device is gone answers EBADFD."""
        if self._closed or not self._fds:
            return None
        try:
            fcntl.ioctl(self._fds[0], _TUNGETIFF, bytes(40))
        except OSError as err:
            if err.errno == errno.EBADFD:
                return f"tap {self._name} is gone (deleted under trionet)"
            return f"tap {self._name}: {err.strerror}"
        return None

    def reopen(self) -> list[int] | None:
        """After ``lost()``: attach to a tap of the same name again (one someone
        re-created, e.g. ``ip tuntap add ... multi_queue vnet_hdr user NAME``),
        with the header size, offloads and attached queues the old one had.

        The new queue fds replace the old ones, which are returned: the caller
        closes them once no pair task uses them any more.  None when it cannot
        be done (yet): no such tap, or not one this process may attach to."""
        if self._closed or not self._fds:
            return None
        new: list[int] = []
        try:
            for pair in range(self._queue_pairs):
                what = f"tap {self._name} queue {pair}"
                fd = _check(_tap_open(self._name), f"open {what}")
                new.append(fd)
                _check(_set_vnet_hdr_sz(fd, self._hdr_size), f"TUNSETVNETHDRSZ on {what}")
                _check(_set_offload(fd, self._offloads), f"TUNSETOFFLOAD on {what}")
            for pair in range(self._queue_pairs - 1, -1, -1):  # detach top down
                if not self._attached[pair]:
                    _check(_set_queue(new[pair], False), f"detach tap {self._name} queue {pair}")
        except TapError:
            for fd in new:
                os.close(fd)
            return None
        old, self._fds = self._fds, new
        return old

    def _require_open(self) -> None:
        if self._closed or not self._fds:
            raise TapError(f"tap {self._name} is not open")

    # ------------------------------------------------------------- data path

    async def recv(self, pair: int, max_size: int = MAX_READ) -> bytes:
        """Read one frame (virtio-net header included) from queue ``pair``."""
        fd = self.queue_fd(pair)
        while True:
            try:
                return os.read(fd, max_size)
            except BlockingIOError:
                pass
            await trio.lowlevel.wait_readable(fd)

    async def send(self, pair: int, frame: bytes) -> int:
        """Write one frame (virtio-net header included) to queue ``pair``."""
        fd = self.queue_fd(pair)
        while True:
            try:
                return os.write(fd, frame)
            except BlockingIOError:
                pass
            await trio.lowlevel.wait_writable(fd)

    # ---------------------------------------------------------------- close

    async def aclose(self) -> None:
        """Close every queue fd; delete the link if open() created it.

        Idempotent.  Tasks blocked in recv/send get ``trio.ClosedResourceError``.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        fds, self._fds = self._fds, []
        for fd in fds:
            trio.lowlevel.notify_closing(fd)
            os.close(fd)
        self._attached = []
        if self._created:
            self._created = False
            with trio.CancelScope(shield=True):
                try:
                    # False if it is gone already (e.g. moved to another netns).
                    await netlink.delete_link_async(self._name)
                except OSError as err:
                    raise TapError(f"delete tap {self._name}: {err.strerror}", err.errno) from err
        else:
            await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> TapBackend:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
