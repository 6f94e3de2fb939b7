"""Link management through pyroute2, kept away from the Trio loop.

pyroute2 0.9 drives its own asyncio event loop inside every ``IPRoute``, so it
must never run on the Trio thread.  Every helper here comes twice:

* a plain synchronous function (``link_exists``, ``create_tap``, ...) that opens
  an ``IPRoute``, does one job and closes it again; these are only ever called
  on a worker thread;
* an ``async`` wrapper with the ``_async`` suffix that runs the synchronous one
  through ``trio.to_thread.run_sync``.

Failures come out as ``OSError`` (with ``errno`` set from the netlink error),
so callers have a single exception type to translate.
"""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import trio
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

__all__ = [
    "TUN_TYPE_TAP",
    "TUN_TYPE_TUN",
    "LinkInfo",
    "add_address",
    "add_address_async",
    "create_tap",
    "create_tap_async",
    "delete_link",
    "delete_link_async",
    "link_exists",
    "link_exists_async",
    "link_info",
    "link_info_async",
    "move_to_netns",
    "move_to_netns_async",
    "set_link_up",
    "set_link_up_async",
]

_T = TypeVar("_T")

#: ``IFLA_TUN_TYPE`` values.
TUN_TYPE_TUN = 1
TUN_TYPE_TAP = 2

_IFF_UP = 0x1


@dataclass(frozen=True)
class LinkInfo:
    """What netlink says about one link (the tun fields are ``None``/0 for
    links that are not tun/tap devices)."""

    index: int
    kind: str | None
    up: bool
    tun_type: int | None = None
    multi_queue: bool = False
    vnet_hdr: bool = False
    pi: bool = False
    persist: bool = False
    num_queues: int = 0
    num_disabled_queues: int = 0

    @property
    def is_tap(self) -> bool:
        return self.kind == "tun" and self.tun_type == TUN_TYPE_TAP


def _oserror(err: NetlinkError, what: str) -> OSError:
    code = int(getattr(err, "code", 0) or errno.EIO)
    return OSError(code, f"{what}: {os.strerror(code)}")


@contextmanager
def _iproute(netns: str | None, what: str) -> Iterator[Any]:
    """An ``IPRoute`` (in ``netns`` if given, never creating it), with netlink
    errors turned into ``OSError``."""
    try:
        ipr = IPRoute() if netns is None else IPRoute(netns=netns, flags=0)
    except NetlinkError as err:
        raise _oserror(err, what) from err
    with ipr:
        try:
            yield ipr
        except NetlinkError as err:
            raise _oserror(err, what) from err


def _lookup(ipr: Any, name: str) -> int | None:
    found: list[int] = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _index(ipr: Any, name: str, what: str) -> int:
    idx = _lookup(ipr, name)
    if idx is None:
        raise OSError(errno.ENODEV, f"{what}: no link named {name!r}")
    return idx


# ----------------------------------------------------------------------------
# synchronous helpers (worker thread only)


def link_exists(name: str, netns: str | None = None) -> bool:
    """Whether a link called ``name`` exists (in ``netns``, or here)."""
    with _iproute(netns, f"look up {name}") as ipr:
        return _lookup(ipr, name) is not None


def link_info(name: str, netns: str | None = None) -> LinkInfo | None:
    """Kind, state and tun/tap flags of ``name``; ``None`` if there is no such link."""
    with _iproute(netns, f"query {name}") as ipr:
        idx = _lookup(ipr, name)
        if idx is None:
            return None
        (msg,) = ipr.link("get", index=idx)
    flags = int(msg.get("flags") or 0)
    linkinfo = msg.get_attr("IFLA_LINKINFO")
    kind = linkinfo.get_attr("IFLA_INFO_KIND") if linkinfo is not None else None
    data = linkinfo.get_attr("IFLA_INFO_DATA") if linkinfo is not None else None
    if kind != "tun" or data is None or isinstance(data, (str, bytes)):
        return LinkInfo(index=idx, kind=kind, up=bool(flags & _IFF_UP))

    def attr(key: str) -> int:
        value = data.get_attr(key)
        return int(value) if value is not None else 0

    return LinkInfo(
        index=idx,
        kind=kind,
        up=bool(flags & _IFF_UP),
        tun_type=attr("IFLA_TUN_TYPE"),
        multi_queue=bool(attr("IFLA_TUN_MULTI_QUEUE")),
        vnet_hdr=bool(attr("IFLA_TUN_VNET_HDR")),
        pi=bool(attr("IFLA_TUN_PI")),
        persist=bool(attr("IFLA_TUN_PERSIST")),
        num_queues=attr("IFLA_TUN_NUM_QUEUES"),
        num_disabled_queues=attr("IFLA_TUN_NUM_DISABLED_QUEUES"),
    )


def create_tap(name: str, multi_queue: bool = True) -> None:
    """Create a persistent tap ``name`` (IFF_NO_PI|IFF_VNET_HDR, and
    IFF_MULTI_QUEUE unless told otherwise).

    Raises ``FileExistsError`` if the name is taken: pyroute2 creates taps with
    TUNSETIFF, which would otherwise silently bind to (and re-flag) an existing
    tap of that name.
    """
    what = f"create tap {name}"
    with _iproute(None, what) as ipr:
        if _lookup(ipr, name) is not None:
            raise FileExistsError(errno.EEXIST, f"{what}: link exists")
        ipr.link(
            "add",
            ifname=name,
            kind="tuntap",
            mode="tap",
            ifr={
                "no_pi": 1,
                "one_queue": 0,
                "vnet_hdr": 1,
                "multi_queue": 1 if multi_queue else 0,
            },
        )
        if _lookup(ipr, name) is None:
            raise OSError(errno.EIO, f"{what}: link missing after creation")


def delete_link(name: str, netns: str | None = None) -> bool:
    """Delete ``name``; ``False`` if it was not there."""
    with _iproute(netns, f"delete {name}") as ipr:
        idx = _lookup(ipr, name)
        if idx is None:
            return False
        try:
            ipr.link("del", index=idx)
        except NetlinkError as err:
            if getattr(err, "code", None) == errno.ENODEV:
                return False
            raise
        return True


def set_link_up(name: str, netns: str | None = None) -> None:
    what = f"set {name} up"
    with _iproute(netns, what) as ipr:
        ipr.link("set", index=_index(ipr, name, what), state="up")


def move_to_netns(name: str, nsname: str) -> None:
    """Move ``name`` into the named namespace (``/run/netns/<nsname>``).

    The kernel takes the link down on the way; bring it up again there.
    """
    what = f"move {name} to netns {nsname}"
    with _iproute(None, what) as ipr:
        ipr.link("set", index=_index(ipr, name, what), net_ns_fd=nsname)


def add_address(name: str, addr: str, prefixlen: int, netns: str | None = None) -> None:
    what = f"add {addr}/{prefixlen} to {name}"
    with _iproute(netns, what) as ipr:
        ipr.addr("add", index=_index(ipr, name, what), address=addr, prefixlen=prefixlen)


# ----------------------------------------------------------------------------
# async wrappers


async def _run(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


async def link_exists_async(name: str, netns: str | None = None) -> bool:
    return await _run(link_exists, name, netns)


async def link_info_async(name: str, netns: str | None = None) -> LinkInfo | None:
    return await _run(link_info, name, netns)


async def create_tap_async(name: str, multi_queue: bool = True) -> None:
    await _run(create_tap, name, multi_queue)


async def delete_link_async(name: str, netns: str | None = None) -> bool:
    return await _run(delete_link, name, netns)


async def set_link_up_async(name: str, netns: str | None = None) -> None:
    await _run(set_link_up, name, netns)


async def move_to_netns_async(name: str, nsname: str) -> None:
    await _run(move_to_netns, name, nsname)


async def add_address_async(name: str, addr: str, prefixlen: int, netns: str | None = None) -> None:
    await _run(add_address, name, addr, prefixlen, netns)
