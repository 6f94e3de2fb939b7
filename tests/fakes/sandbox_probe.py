"""Run as ``python -m tests.fakes.sandbox_probe [--user NAME]``: apply trionet's
sandbox to this process, then try what it must refuse and what the steady
state needs; print one JSON object (syscall -> errno name or "ok")."""

from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import json
import os
import select
import socket
import termios
import threading
from collections.abc import Callable
from pathlib import Path

import trio

from trionet.service.sandbox import Sandbox, SandboxConfig

_libc = ctypes.CDLL(None, use_errno=True)


def _c(rc: int) -> None:
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _forbidden() -> dict[str, Callable[[], object]]:
    return {
        "execve": lambda: os.execv("/bin/true", ["true"]),
        "mount": lambda: _c(_libc.mount(b"none", b"/mnt", b"tmpfs", 0, None)),
        "ptrace": lambda: _c(_libc.ptrace(0, 0, None, None)),  # PTRACE_TRACEME
        "unshare": lambda: _c(_libc.unshare(0x40000000)),  # CLONE_NEWNET
        "setuid": lambda: _c(_libc.syscall(105, 0)),  # raw setuid(0)
        "kill": lambda: os.kill(os.getpid(), 0),
        "chroot": lambda: os.chroot("/"),
        "clone_newuser": _clone_newuser,
        "tiocsti": _tiocsti,
    }


def _fionread() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.send(b"xy")
        assert int.from_bytes(fcntl.ioctl(a, termios.FIONREAD, bytes(4)), "little") == 2


def _tiocsti() -> None:
    master, slave = os.openpty()
    try:
        fcntl.ioctl(slave, termios.TIOCSTI, b"x")
    finally:
        os.close(master)
        os.close(slave)


def _clone_newuser() -> None:
    rc = _libc.syscall(56, 0x10000000 | 17, None, None, None, None)  # clone(NEWUSER|SIGCHLD)
    if rc == 0:  # the child of a filter that let it through
        os._exit(0)
    if rc > 0:
        os.waitpid(rc, 0)
    _c(rc)


def _allowed() -> dict[str, Callable[[], object]]:
    def udp() -> None:
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b,
        ):
            a.bind(("127.0.0.1", 0))
            b.sendto(b"x", a.getsockname())
            assert a.recv(10) == b"x"

    def thread() -> None:
        t = threading.Thread(target=lambda: None)
        t.start()
        t.join()

    def epoll_eventfd() -> None:
        fd = os.eventfd(0, os.EFD_NONBLOCK)
        ep = select.epoll()
        ep.register(fd, select.EPOLLIN)
        os.eventfd_write(fd, 1)
        assert ep.poll(1)
        ep.close()
        os.close(fd)

    return {
        "udp": udp,
        "thread": thread,
        "epoll_eventfd": epoll_eventfd,
        "memfd_mmap": lambda: os.close(os.memfd_create("probe")),
        "read_proc": lambda: Path("/proc/self/status").read_text(),
        "ioctl_fionread": _fionread,  # 0x541B: between TIOCSTI and TIOCLINUX
    }


def _try(fn: Callable[[], object]) -> str:
    try:
        fn()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return "ok"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--user")
    args = ap.parse_args()
    trio.run(Sandbox(SandboxConfig(user=args.user)).apply)
    out = {name: _try(fn) for name, fn in {**_forbidden(), **_allowed()}.items()}
    status = Path("/proc/self/status").read_text().splitlines()
    out.update(dict(line.split(":\t", 1) for line in status if ":\t" in line))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
