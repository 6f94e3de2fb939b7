"""Host side of the end-to-end tests: network namespaces and the trionet service.

trionet runs either with its tap backend inside a namespace (``trionet_service``, as
root) or with its user-mode backend on the host's own loopback as an unprivileged user
(``user_trionet_service``; ``user_runtime_dir`` makes a socket directory that user can
write, ``ping_group_range`` lets it open ICMP echo sockets).

Everything started here is stopped by its pid; namespaces, directories and sysctls
are always removed or restored.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import trio

from tests.e2e.guest import REPO, GuestError, tail_lines


def _unique(prefix: str) -> str:
    return f"{prefix}{os.getpid() % 10000}-{secrets.token_hex(3)}"


async def sh(*argv: str, netns: str | None = None, check: bool = True) -> str:
    """Run a host command (optionally inside a netns); return its stdout."""
    full = ["ip", "netns", "exec", netns, *argv] if netns else list(argv)
    res = await trio.run_process(full, capture_stdout=True, capture_stderr=True, check=False)
    if check and res.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(full)} failed with status {res.returncode}: "
            f"{res.stderr.decode(errors='replace').strip()}"
        )
    return res.stdout.decode(errors="replace")


@asynccontextmanager
async def network_namespace(prefix: str = "tnet-") -> AsyncIterator[str]:
    """Create a uniquely named network namespace (lo up); always delete it on exit."""
    name = _unique(prefix)
    await sh("ip", "netns", "add", name)
    try:
        await sh("ip", "link", "set", "lo", "up", netns=name)
        yield name
    finally:
        with trio.CancelScope(shield=True):
            await sh("ip", "netns", "del", name, check=False)


async def wait_for_link(netns: str, ifname: str, timeout: float = 20) -> None:
    """Poll until network interface `ifname` exists inside `netns`."""
    with trio.move_on_after(timeout):
        while True:
            res = await trio.run_process(
                ["ip", "netns", "exec", netns, "ip", "link", "show", ifname],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            if res.returncode == 0:
                return
            await trio.sleep(0.1)
    raise GuestError(f"interface {ifname} did not appear in netns {netns} within {timeout} s")


class Trionet:
    """A trionet service process started by trionet_service()."""

    def __init__(self, proc: trio.Process, log_path: Path) -> None:
        self.proc = proc
        self.pid: int = proc.pid
        self.log_path = log_path

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def stderr(self) -> str:
        return self.log_path.read_text(errors="replace")


@asynccontextmanager
async def trionet_service(
    *,
    netns: str,
    socket_path: Path,
    tap: str,
    queue_pairs: int = 1,
    log_path: Path,
    extra_args: Sequence[str] = (),
    timeout: float = 30,
) -> AsyncIterator[Trionet]:
    """Run `python -m trionet --backend tap` inside `netns`; yield once its socket exists.

    On exit the service gets SIGTERM (SIGKILL after 10 s); check .returncode afterwards.
    """
    argv = ["ip", "netns", "exec", netns, *_trionet_argv(socket_path, queue_pairs)]
    argv += ["--backend", "tap", "--tap", tap, *extra_args]
    async with _run_trionet(argv, socket_path, log_path, timeout) as service:
        yield service


@asynccontextmanager
async def user_trionet_service(
    *,
    socket_path: Path,
    log_path: Path,
    queue_pairs: int = 1,
    extra_args: Sequence[str] = (),
    user: str = "nobody",
    timeout: float = 30,
) -> AsyncIterator[Trionet]:
    """Run `python -m trionet --backend user` as `user` (no capabilities, no
    supplementary groups) in the host's own network namespace; yield once its socket
    exists. Needs root to switch users.

    `socket_path`'s directory must be writable by `user` (see ``user_runtime_dir``);
    QEMU, as root, can connect to a socket there whoever owns it. On exit as
    ``trionet_service``.
    """
    if os.geteuid() != 0:
        raise RuntimeError(f"user_trionet_service needs root to run trionet as {user}")
    uid, gid = user_ids(user)
    _check_writable_by(socket_path.parent, uid, gid, user)
    drop = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
    drop += ["--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
    argv = [*drop, *_trionet_argv(socket_path, queue_pairs), "--backend", "user", *extra_args]
    async with _run_trionet(argv, socket_path, log_path, timeout) as service:
        yield service


def _trionet_argv(socket_path: Path, queue_pairs: int) -> list[str]:
    argv = [sys.executable, "-m", "trionet", "--socket-path", str(socket_path)]
    return [*argv, "--queue-pairs", str(queue_pairs)]


@asynccontextmanager
async def _run_trionet(
    argv: list[str], socket_path: Path, log_path: Path, timeout: float
) -> AsyncIterator[Trionet]:
    """Start `argv` (stdout and stderr to `log_path`); yield once `socket_path` exists;
    SIGTERM (SIGKILL after 10 s) to the started pid on exit."""
    socket_path.unlink(missing_ok=True)  # a stale socket would look like a ready service
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")  # the repo may not be writable
    with log_path.open("wb") as out:
        out.write(f"# {shlex.join(argv)}\n".encode())
        out.flush()
        proc = await trio.lowlevel.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=str(REPO), env=env
        )
    service = Trionet(proc, log_path)
    try:
        with trio.move_on_after(timeout) as scope:
            while not socket_path.exists():
                if proc.poll() is not None:
                    raise GuestError(
                        f"trionet exited with status {proc.returncode} before creating "
                        f"{socket_path}:\n{tail_lines(service.stderr())}"
                    )
                await trio.sleep(0.05)
        if scope.cancelled_caught:
            raise GuestError(
                f"trionet made no {socket_path} in {timeout} s:\n{tail_lines(service.stderr())}"
            )
        yield service
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.terminate()  # SIGTERM to the pid we started
                with trio.move_on_after(10):
                    await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


# ---- an unprivileged trionet ------------------------------------------------------------


def user_ids(user: str) -> tuple[int, int]:
    """(uid, primary gid) of `user`."""
    pw = pwd.getpwnam(user)
    return pw.pw_uid, pw.pw_gid


@contextmanager
def user_runtime_dir(user: str = "nobody", prefix: str = "trionet-user-") -> Iterator[Path]:
    """A fresh directory in the system's temporary directory, owned by `user` and
    private to it (mode 700), for the sockets of an unprivileged trionet; removed on
    exit. (pytest's tmp_path is private to root, so that user could not reach it.)"""
    uid, gid = user_ids(user)
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        os.chown(path, uid, gid)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _check_writable_by(directory: Path, uid: int, gid: int, user: str) -> None:
    """Fail early, with the reason, when `user` could not create a socket in
    `directory` (every ancestor searchable, the directory itself writable)."""
    directory = directory.resolve()
    for path in (*reversed(directory.parents), directory):
        st = path.stat()
        if st.st_uid == uid:
            bits = st.st_mode >> 6
        elif st.st_gid == gid:
            bits = st.st_mode >> 3
        else:
            bits = st.st_mode
        need = 0o3 if path == directory else 0o1  # write+search / search
        if bits & need != need:
            raise RuntimeError(
                f"{user} cannot {'write' if path == directory else 'search'} {path} "
                f"(owner {st.st_uid}:{st.st_gid}, mode {stat.filemode(st.st_mode)}): "
                "put the sockets in a user_runtime_dir()"
            )


PING_GROUP_RANGE = Path("/proc/sys/net/ipv4/ping_group_range")


@contextmanager
def ping_group_range(gid_low: int, gid_high: int) -> Iterator[None]:
    """Let processes whose group is in [gid_low, gid_high] open ICMP echo ("ping")
    sockets (IPv4 and IPv6) in this network namespace; restore the previous range on
    exit."""
    previous = PING_GROUP_RANGE.read_text().split()
    PING_GROUP_RANGE.write_text(f"{gid_low} {gid_high}\n")
    try:
        yield
    finally:
        PING_GROUP_RANGE.write_text(" ".join(previous) + "\n")
