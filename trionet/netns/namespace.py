"""Joining a network namespace: its fd, its owning user namespace, a thread inside it.

Rootless use follows pasta: a process without CAP_SYS_ADMIN joins the user
namespace that owns the target network namespace (the whole process, before
any thread starts; its own network namespace stays the host's), which gives
it the capabilities to open and configure a tap there.  Work inside the
namespace runs on a short-lived thread that enters it with setns(2): only that
thread changes namespace, and it ends with the work, so every other socket of
the process stays on the host.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
NS_GET_USERNS = 0xB701  # _IO(0xb7, 0x1)
CAP_SYS_ADMIN = 21

T = TypeVar("T")


class NetnsError(Exception):
    """The namespace cannot be used (the message says why, for the operator)."""


_libc = ctypes.CDLL(None, use_errno=True)


def setns(fd: int, nstype: int) -> None:
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def netns_path(target: str) -> Path:
    """``target`` is a PID (its network namespace) or a namespace file's path
    (``/run/netns/NAME``, ``/proc/PID/ns/net``)."""
    return Path(f"/proc/{target}/ns/net") if target.isdigit() else Path(target)


def open_netns(target: str) -> int:
    path = netns_path(target)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise NetnsError(f"--netns {target}: {path}: {exc.strerror}") from None
    if os.fstat(fd).st_ino == os.stat("/proc/self/ns/net").st_ino:
        os.close(fd)
        raise NetnsError(f"--netns {target}: that is trionet's own network namespace")
    return fd


def _has_cap(cap: int) -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> cap & 1)
    return False


def join_owner(netns_fd: int) -> bool:
    """Without CAP_SYS_ADMIN, join the user namespace owning the network
    namespace (the process must still be single-threaded).  True if joined."""
    if _has_cap(CAP_SYS_ADMIN):
        return False
    try:
        userns = fcntl.ioctl(netns_fd, NS_GET_USERNS)
    except OSError as exc:
        raise NetnsError(f"--netns: its owning user namespace: {exc.strerror}") from None
    try:
        if os.fstat(userns).st_ino == os.stat("/proc/self/ns/user").st_ino:
            return False
        setns(userns, CLONE_NEWUSER)
    except OSError as exc:
        raise NetnsError(
            f"--netns: cannot join the namespace's user namespace ({exc.strerror}): run "
            "trionet as the user that made it, or with CAP_SYS_ADMIN"
        ) from None
    finally:
        os.close(userns)
    return True


def run_inside(netns_fd: int, work: Callable[[], T]) -> T:
    """``work()`` on a new thread that first enters the network namespace; its
    result or its exception.  Blocking: call it through ``trio.to_thread``."""
    box: list[T] = []
    errors: list[BaseException] = []

    def inside() -> None:
        try:
            setns(netns_fd, CLONE_NEWNET)
            box.append(work())
        except BaseException as exc:  # handed to the caller's thread
            errors.append(exc)

    t = threading.Thread(target=inside, name="trionet-netns", daemon=True)
    t.start()
    t.join()
    if errors:
        raise errors[0]
    return box[0]
