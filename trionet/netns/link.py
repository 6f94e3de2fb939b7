"""The namespace's side: a multi-queue tap opened in it and configured as pasta's
``--config-net`` does (loopback up; the tap up with the stack's MTU, the
guest's IPv4 address and a default route via the gateway; IPv6 from the
stack's router advertisements).

Runs on ``namespace.run_inside``'s thread, so the tap and the netlink socket
are created in the target namespace.  The tap hands frames over with a
12-byte virtio-net header (the rings' own), may leave TCP/UDP checksums
partial (``TUN_F_CSUM``) and may hand over TCP GSO frames (``TUN_F_TSO4/6``):
the user stack takes them as a TSO guest's.
"""

from __future__ import annotations

import errno
import ipaddress
import os
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from trionet.native import ffi, lib

IFNAMSIZ = 16
VNET_HDR_LEN = 12


@dataclass(frozen=True)
class LinkPlan:
    """What to make in the namespace."""

    ifname: str
    queues: int
    mtu: int
    address: ipaddress.IPv4Interface | None  # None: leave IPv4 to the namespace (DHCP)
    gateway: ipaddress.IPv4Address | None
    mac: bytes | None = None  # the tap's MAC (--mac); None: the kernel's random one


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise OSError(-rc, f"{what}: {os.strerror(-rc)}")
    return rc


def open_taps(plan: LinkPlan) -> list[int]:
    """``plan.queues`` fds of one new multi-queue tap (non-blocking)."""
    fds: list[int] = []
    try:
        for _ in range(plan.queues):
            name_out = ffi.new("char[]", IFNAMSIZ)
            what = f"tap {plan.ifname} in the namespace"
            fd = _check(lib.tn_tap_open(plan.ifname.encode(), 1, name_out), what)
            fds.append(fd)
            _check(lib.tn_tap_set_vnet_hdr_sz(fd, VNET_HDR_LEN), "TUNSETVNETHDRSZ")
            offloads = lib.TN_TUN_F_CSUM | lib.TN_TUN_F_TSO4 | lib.TN_TUN_F_TSO6
            _check(lib.tn_tap_set_offload(fd, offloads), "TUNSETOFFLOAD")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def configure(plan: LinkPlan) -> bytes:
    """Configure the tap; its MAC (the stack addresses the namespace with it
    from the start, before the namespace sent a frame)."""
    what = f"configure {plan.ifname} in the namespace"
    try:
        with IPRoute() as ipr:
            for lo in ipr.link_lookup(ifname="lo"):
                ipr.link("set", index=lo, state="up")
            (idx,) = ipr.link_lookup(ifname=plan.ifname)
            if plan.mac is not None:
                ipr.link("set", index=idx, address=plan.mac.hex(":"))
            ipr.link("set", index=idx, mtu=plan.mtu)
            ipr.link("set", index=idx, state="up")
            if plan.address is not None:
                ipr.addr(
                    "add",
                    index=idx,
                    address=str(plan.address.ip),
                    prefixlen=plan.address.network.prefixlen,
                )
                if plan.gateway is not None:
                    ipr.route("add", dst="0.0.0.0/0", gateway=str(plan.gateway), oif=idx)
            (msg,) = ipr.link("get", index=idx)
            return bytes.fromhex(str(msg.get_attr("IFLA_ADDRESS")).replace(":", ""))
    except NetlinkError as err:
        code = int(getattr(err, "code", 0) or 5)
        raise OSError(code, f"{what}: {os.strerror(code)}") from err


def exists(ifname: str) -> bool:
    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=ifname))


def make(plan: LinkPlan) -> tuple[list[int], bytes]:
    """Open and configure: the tap's queue fds and its MAC.  A link of that name already
    there is refused: opening it would attach queues to another trionet's tap."""
    if exists(plan.ifname):
        raise FileExistsError(
            errno.EEXIST, f"{plan.ifname} exists in the namespace (served already?)"
        )
    fds = open_taps(plan)
    try:
        mac = configure(plan)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds, mac
