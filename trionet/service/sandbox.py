"""Least privilege once set-up is done: user drop, no capabilities, no new
privileges, a seccomp allow-list.

``Sandbox.apply()`` runs once, after the service has bound its sockets,
opened its taps and read the host's view (``Service.run`` calls it through
``ServiceConfig.after_setup``).  In order:

1. on every thread: clear the ambient and (as root) bounding capability sets;
2. with ``--user``: ``setgroups([gid])``, ``setresgid``, ``setresuid``
   (glibc applies them to every thread; leaving uid 0 clears the permitted
   and effective capability sets);
3. on every thread: ``capset`` to nothing (see ``on_every_thread``);
4. ``PR_SET_NO_NEW_PRIVS``;
5. a seccomp filter (libseccomp, loaded with TSYNC so every thread gets it):
   the syscalls of the steady state are allowed, anything else fails with
   EPERM (not a kill: a path that was missed shows up as an ``OSError`` in
   the log, never as a dead service);
6. ``check_threads``: every thread of the process is verified in /proc.

libseccomp is reached through cffi in ABI mode (``libseccomp.so.2``, Debian's
``libseccomp2``); ``capset`` and ``prctl`` through the C library the same way.
``--no-sandbox`` skips all of it.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import pwd
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import cffi  # type: ignore[import-untyped]
import trio

log = logging.getLogger(__name__)

_ffi = cffi.FFI()
_ffi.cdef(
    """
    typedef void *scmp_filter_ctx;
    scmp_filter_ctx seccomp_init(uint32_t def_action);
    void seccomp_release(scmp_filter_ctx ctx);
    int seccomp_attr_set(scmp_filter_ctx ctx, int attr, uint32_t value);
    int seccomp_syscall_resolve_name(const char *name);
    struct scmp_arg_cmp { unsigned int arg; int op; uint64_t datum_a; uint64_t datum_b; };
    int seccomp_rule_add_array(scmp_filter_ctx ctx, uint32_t action, int syscall,
                               unsigned int arg_cnt, const struct scmp_arg_cmp *arg_array);
    int seccomp_load(const scmp_filter_ctx ctx);

    struct tn_cap_header { uint32_t version; int pid; };
    struct tn_cap_data { uint32_t effective; uint32_t permitted; uint32_t inheritable; };
    int capset(struct tn_cap_header *hdr, const struct tn_cap_data *data);
    int prctl(int option, ...);
    """
)

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ERRNO = 0x00050000  # SCMP_ACT_ERRNO(e) == SCMP_ERRNO | e
SCMP_CMP_MASKED_EQ = 7
SCMP_FLTATR_CTL_NNP = 3
SCMP_FLTATR_CTL_TSYNC = 4

PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
CAP_VERSION_3 = 0x20080522

#: What the steady state calls: the Trio loop (epoll, eventfd, signals through
#: a socketpair), worker threads (--threads: futex, rseq; clone has its own
#: rule, see install_seccomp), guest memory (mmap of the VMM's fds), the tap
#: data path (read/write, and ioctl on queue fds - TUNSETQUEUE, TUNSETOFFLOAD,
#: TUNSETVNETHDRSZ - with its own rule, see IOCTL_RULES), the user stack
#: (sockets of every kind it opens, ping sockets, sendmmsg/recvmmsg, socket
#: options), the vhost-user and control sockets (accept, SCM_RIGHTS), the
#: state file (write a temp file, rename), logging and lazy imports (open,
#: stat, read).  Everything else - execve, ptrace, mount, module loading,
#: namespaces, bpf, keyrings, setuid and friends - is refused with EPERM.
ALLOWED_SYSCALLS: tuple[str, ...] = (
    # file descriptors and files
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev",
    "preadv2", "pwritev2", "close", "close_range", "dup", "dup2", "dup3", "fcntl",
    "lseek", "pipe", "pipe2", "open", "openat", "openat2", "creat",
    "stat", "fstat", "lstat", "newfstatat", "statx", "statfs", "fstatfs",
    "access", "faccessat", "faccessat2", "readlink", "readlinkat", "getdents64",
    "getcwd", "chdir", "fchdir", "rename", "renameat", "renameat2", "unlink",
    "unlinkat", "mkdir", "mkdirat", "rmdir", "fsync", "fdatasync", "ftruncate",
    "fchmod", "fadvise64", "umask", "sendfile", "splice", "memfd_create", "flock",
    # memory
    "mmap", "munmap", "mprotect", "mremap", "madvise", "brk", "mlock", "munlock",
    "membarrier", "get_mempolicy",
    # event loop, waiting, time
    "epoll_create", "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait",
    "epoll_pwait2", "eventfd", "eventfd2", "poll", "ppoll", "select", "pselect6",
    "timerfd_create", "timerfd_settime", "timerfd_gettime", "futex", "futex_waitv",
    "nanosleep", "clock_nanosleep", "clock_gettime", "clock_getres", "gettimeofday",
    "time", "sched_yield", "sched_getaffinity", "getrandom", "restart_syscall",
    # signals
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigpending",
    "rt_sigtimedwait", "sigaltstack", "tgkill", "tkill",
    # threads and the process itself
    "exit", "exit_group", "set_robust_list", "get_robust_list",
    "set_tid_address", "rseq", "gettid", "getpid", "getppid", "getpgrp", "getsid",
    "getuid", "geteuid", "getgid", "getegid", "getresuid", "getresgid", "getgroups",
    "capget", "prctl", "arch_prctl", "uname", "sysinfo", "getrusage", "times",
    "getrlimit", "prlimit64", "getpriority", "sched_getparam", "sched_getscheduler",
    # sockets
    "socket", "socketpair", "bind", "listen", "accept", "accept4", "connect",
    "shutdown", "getsockname", "getpeername", "setsockopt", "getsockopt",
    "sendto", "recvfrom", "sendmsg", "recvmsg", "sendmmsg", "recvmmsg",
)  # fmt: skip


SCMP_CMP_LE = 3
SCMP_CMP_EQ = 4
SCMP_CMP_GE = 5
TIOCSTI = 0x5412  # push input into a terminal: an escape from any sandbox with a tty
TIOCLINUX = 0x541C  # the console's own commands, input included
#: ioctl requests: every one but TIOCSTI and TIOCLINUX (a filter compares
#: each argument once per rule, hence the ranges and the ones in between).
IOCTL_RULES: tuple[tuple[int, int], ...] = (
    (SCMP_CMP_LE, TIOCSTI - 1),
    *((SCMP_CMP_EQ, req) for req in range(TIOCSTI + 1, TIOCLINUX)),
    (SCMP_CMP_GE, TIOCLINUX + 1),
)

#: clone() flags that make namespaces: threads never need them (a user
#: namespace would hand its creator a fresh set of capabilities).
CLONE_NAMESPACES = (
    0x00020000  # CLONE_NEWNS
    | 0x02000000  # CLONE_NEWCGROUP
    | 0x04000000  # CLONE_NEWUTS
    | 0x08000000  # CLONE_NEWIPC
    | 0x10000000  # CLONE_NEWUSER
    | 0x20000000  # CLONE_NEWPID
    | 0x40000000  # CLONE_NEWNET
)


class SandboxError(Exception):
    """The sandbox could not be set up (the service stops: it never runs half-sandboxed)."""


@dataclass(frozen=True)
class SandboxConfig:
    enabled: bool = True  # --no-sandbox turns it off
    user: str | None = None  # --user: drop to this user (needs root)
    group: str | None = None  # --group: default the user's primary group


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int
    name: str


def resolve_identity(cfg: SandboxConfig) -> Identity | None:
    """The uid/gid ``--user``/``--group`` name (numbers work too); None without --user."""
    if cfg.user is None:
        if cfg.group is not None:
            raise SandboxError("--group needs --user")
        return None
    try:
        pw = pwd.getpwnam(cfg.user) if not cfg.user.isdigit() else pwd.getpwuid(int(cfg.user))
    except KeyError:
        raise SandboxError(f"--user {cfg.user}: no such user") from None
    gid = pw.pw_gid
    if cfg.group is not None:
        try:
            g = cfg.group
            gr = grp.getgrgid(int(g)) if g.isdigit() else grp.getgrnam(g)
        except KeyError:
            raise SandboxError(f"--group {cfg.group}: no such group") from None
        gid = gr.gr_gid
    if os.geteuid() != 0 and pw.pw_uid != os.geteuid():
        raise SandboxError(f"--user {cfg.user}: only root can switch users")
    return Identity(pw.pw_uid, gid, pw.pw_name)


def _libc() -> Any:
    return _ffi.dlopen(None)


def _libseccomp() -> Any:
    try:
        return _ffi.dlopen("libseccomp.so.2")
    except OSError as exc:
        raise SandboxError(
            f"libseccomp is missing ({exc}); install libseccomp2 or run with --no-sandbox"
        ) from None


def _prctl(libc: Any, option: int, arg: int = 0) -> int:
    ul = "unsigned long"
    zero = _ffi.cast(ul, 0)
    rc: int = libc.prctl(option, _ffi.cast(ul, arg), zero, zero, zero)
    return rc if rc >= 0 else -_ffi.errno


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40


def drop_inheritable_sets(libc: Any) -> None:
    """This thread's ambient and (with CAP_SETPCAP) bounding sets."""
    _prctl(libc, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)  # EINVAL on old kernels: fine
    for cap in range(_last_cap() + 1):
        if _prctl(libc, PR_CAPBSET_DROP, cap) == -errno.EPERM:  # no CAP_SETPCAP
            break


def drop_capabilities(libc: Any) -> None:
    """This thread's effective, permitted and inheritable sets."""
    hdr = _ffi.new("struct tn_cap_header *", {"version": CAP_VERSION_3, "pid": 0})
    data = _ffi.new("struct tn_cap_data[2]")
    if libc.capset(hdr, data) != 0:
        raise SandboxError(f"capset: {os.strerror(_ffi.errno)}")


def _tids() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


async def on_every_thread(fn: Callable[[], None]) -> None:
    """Run ``fn`` on this thread and on every other thread of the process.

    Capability sets belong to a thread, and by now the process has Trio's idle
    worker threads (a UNIX socket's bind runs on one).  All of them are
    occupied at once by as many ``to_thread`` calls meeting at a barrier, so
    each runs ``fn`` (a thread started meanwhile is cloned from the Trio
    thread and already has what ``fn`` did).  ``check_threads`` verifies."""
    fn()
    others = len(_tids()) - 1
    if others <= 0:
        return
    barrier = threading.Barrier(others)
    errors: list[SandboxError] = []

    def visit() -> None:
        try:
            fn()
        except SandboxError as exc:
            errors.append(exc)
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(timeout=10)  # if broken: check_threads() says which thread was missed

    async with trio.open_nursery() as nursery:
        for _ in range(others):
            nursery.start_soon(partial(trio.to_thread.run_sync, visit))
    if errors:
        raise errors[0]


def check_threads() -> None:
    """Every thread: no capabilities (effective, permitted, ambient), seccomp on."""
    for tid in _tids():
        try:
            text = Path(f"/proc/self/task/{tid}/status").read_text()
        except FileNotFoundError:  # exited meanwhile
            continue
        fields = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
        for key in ("CapEff", "CapPrm", "CapAmb"):
            if int(fields.get(key, "0"), 16):
                raise SandboxError(f"thread {tid} still has capabilities ({key} {fields[key]})")
        if fields.get("Seccomp", "0").strip() != "2" or fields.get("NoNewPrivs") != "1":
            raise SandboxError(f"thread {tid} is not under the seccomp filter")


def switch_user(libc: Any, who: Identity) -> None:
    _prctl(libc, PR_SET_KEEPCAPS, 0)
    try:
        if os.geteuid() == 0:  # otherwise --user named the user we already are
            os.setgroups([who.gid])
        os.setresgid(who.gid, who.gid, who.gid)
        os.setresuid(who.uid, who.uid, who.uid)
    except OSError as exc:
        raise SandboxError(f"cannot switch to user {who.name}: {exc.strerror}") from None
    if os.getresuid() != (who.uid,) * 3 or os.getresgid() != (who.gid,) * 3:
        raise SandboxError(f"switching to user {who.name} did not take")


def install_seccomp(allowed: tuple[str, ...] = ALLOWED_SYSCALLS) -> int:
    """Load the allow-list (default action: EPERM) on every thread; the rule count."""
    sc = _libseccomp()
    ctx = sc.seccomp_init(SCMP_ERRNO | errno.EPERM)
    if ctx == _ffi.NULL:
        raise SandboxError("seccomp_init failed")
    try:
        for attr in (SCMP_FLTATR_CTL_NNP, SCMP_FLTATR_CTL_TSYNC):
            rc = sc.seccomp_attr_set(ctx, attr, 1)
            if rc < 0:
                raise SandboxError(f"seccomp_attr_set({attr}): {os.strerror(-rc)}")
        rules = 0
        for name in allowed:
            nr = sc.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:  # not a syscall on this architecture
                continue
            rc = sc.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, nr, 0, _ffi.NULL)
            if rc < 0:
                raise SandboxError(f"seccomp rule for {name}: {os.strerror(-rc)}")
            rules += 1
        # threads: clone without namespace flags; clone3 keeps its flags in
        # memory a filter cannot read, so it answers ENOSYS and glibc falls back
        # to clone
        clone_ok = _ffi.new("struct scmp_arg_cmp *", (0, SCMP_CMP_MASKED_EQ, CLONE_NAMESPACES, 0))
        conditional = [
            ("clone", SCMP_ACT_ALLOW, clone_ok),
            ("clone3", SCMP_ERRNO | errno.ENOSYS, _ffi.NULL),
        ]
        for op, value in IOCTL_RULES:  # arg 1: the request
            cmp = _ffi.new("struct scmp_arg_cmp *", (1, op, value, 0))
            conditional.append(("ioctl", SCMP_ACT_ALLOW, cmp))
        for name, action, args in conditional:
            nr = sc.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:
                continue
            rc = sc.seccomp_rule_add_array(ctx, action, nr, 0 if args == _ffi.NULL else 1, args)
            if rc < 0:
                raise SandboxError(f"seccomp rule for {name}: {os.strerror(-rc)}")
            rules += 1
        rc = sc.seccomp_load(ctx)
        if rc < 0:
            raise SandboxError(f"seccomp_load: {os.strerror(-rc)}")
        return rules
    finally:
        sc.seccomp_release(ctx)


class Sandbox:
    def __init__(self, cfg: SandboxConfig) -> None:
        self.cfg = cfg
        self.identity = resolve_identity(cfg) if cfg.enabled else None
        if cfg.enabled:
            _libseccomp()  # fail at start, not after set-up, when it is missing
        self.applied = False

    def status(self) -> dict[str, Any]:
        return {
            "enabled": self.cfg.enabled,
            "applied": self.applied,
            "user": self.identity.name if self.identity else None,
        }

    async def apply(self) -> None:
        if not self.cfg.enabled or self.applied:
            return
        libc = _libc()
        await on_every_thread(partial(drop_inheritable_sets, libc))
        if self.identity is not None:
            switch_user(libc, self.identity)  # glibc: every thread
        elif os.geteuid() == 0:
            log.warning("running as root: pass --user to drop to an unprivileged user")
        await on_every_thread(partial(drop_capabilities, libc))
        if _prctl(libc, PR_SET_NO_NEW_PRIVS, 1) < 0:
            raise SandboxError(f"PR_SET_NO_NEW_PRIVS: {os.strerror(_ffi.errno)}")
        rules = install_seccomp()  # TSYNC: every thread, no_new_privs included
        check_threads()
        self.applied = True
        who = self.identity.name if self.identity else f"uid {os.getuid()}"
        log.info(
            "sandbox: running as %s, no capabilities, no new privileges, seccomp (%d syscalls)",
            who,
            rules,
        )
