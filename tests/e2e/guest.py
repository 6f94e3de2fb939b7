"""Trio harness that boots the Linux test guest under QEMU and drives its serial console.

The guest image (build/guest/vmlinux + initramfs.cpio.gz) comes from tools/build-guest.
The serial console is QEMU's stdio chardev. The guest init is started in "harness" mode
(kernel parameter trionet_console=harness): no echo, no prompt, commands are read from
the console through a pipe. Each Guest.run() wraps the command in unique begin/end
markers and runs it in its own `sh -c`, so a syntax error cannot kill the console shell.
"""

from __future__ import annotations

import codecs
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parents[2]
GUEST_DIR = REPO / "build" / "guest"
VMLINUX = GUEST_DIR / "vmlinux"
INITRAMFS = GUEST_DIR / "initramfs.cpio.gz"
BUILD_SCRIPT = REPO / "tools" / "build-guest"
READY_BANNER = "TRIONET-GUEST-READY"
KERNEL_APPEND = "console=ttyS0 quiet panic=-1 trionet_console=harness"
QEMU = "qemu-system-x86_64"
MAX_COMMAND = 3000  # the tty's canonical line buffer holds 4095 bytes
# QEMU 7.2's 16550 model never raises the receive-timeout interrupt here, so bytes below
# the guest's 8-byte RX FIFO trigger level sit in the FIFO until more input arrives.
# Each command is followed by blank lines (harmless to sh) to push it through.
RX_PADDING = "\n" * 16


class GuestError(RuntimeError):
    """QEMU died, the guest did not boot, or a command timed out."""


def ensure_guest_image(force: bool = False) -> None:
    """Build the guest image with tools/build-guest (cached: cheap when up to date)."""
    cmd = [sys.executable, str(BUILD_SCRIPT), *(["--force"] if force else [])]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0 or not (VMLINUX.exists() and INITRAMFS.exists()):
        raise GuestError(
            f"{BUILD_SCRIPT.relative_to(REPO)} failed (status {res.returncode}); "
            f"it needs root, apt and network access to the Debian mirror.\n"
            f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        )


def prerequisite_problems() -> list[str]:
    """What is missing to boot guests with networking (empty when all is well)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("must run as root (network namespaces, taps, apt)")
    for tool, pkg in (("qemu-system-x86_64", "qemu-system-x86"), ("ip", "iproute2")):
        if shutil.which(tool) is None:
            problems.append(f"{tool} not found: apt-get install -y {pkg}")
    if shutil.which("busybox") is None:
        problems.append("busybox not found: apt-get install -y busybox-static")
    if not os.path.exists("/dev/net/tun"):
        problems.append("/dev/net/tun missing")
    return problems


def accel_args() -> list[str]:
    """KVM only when the CPU advertises vmx/svm; the paravirtual /dev/kvm here cannot
    boot stock kernels, so the default is multi-threaded TCG."""
    forced = os.environ.get("TRIONET_QEMU_ACCEL")
    flags = Path("/proc/cpuinfo").read_text()
    use_kvm = forced == "kvm" or (
        forced is None and os.path.exists("/dev/kvm") and re.search(r"\b(vmx|svm)\b", flags)
    )
    if use_kvm:
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", "tcg,thread=multi", "-cpu", "max"]


def qemu_argv(
    *,
    netdev_args: Sequence[str] | None,
    vhost_user_socket: str | None,
    queue_pairs: int,
    mac: str,
    smp: int,
    mem_mb: int,
    reconnect: bool,
    extra_append: str = "",
) -> list[str]:
    argv = [QEMU, *accel_args(), "-smp", str(smp), "-m", f"{mem_mb}M"]
    argv += ["-nodefaults", "-no-user-config", "-display", "none", "-vga", "none"]
    argv += ["-no-reboot", "-monitor", "none"]
    # vhost-user needs guest RAM in a shareable fd.
    argv += ["-object", f"memory-backend-memfd,id=mem,size={mem_mb}M,share=on"]
    argv += ["-numa", "node,memdev=mem"]
    argv += ["-kernel", str(VMLINUX), "-initrd", str(INITRAMFS)]
    argv += ["-append", f"{KERNEL_APPEND} {extra_append}".strip()]
    argv += ["-chardev", "stdio,id=ser0,signal=off", "-serial", "chardev:ser0"]
    # INTx (vectors=0): QEMU 7.2 TCG segfaults starting vhost-user virtio-net with MSI-X.
    device = f"virtio-net-pci,netdev=net0,mac={mac},vectors=0"
    if queue_pairs > 1:
        device += ",mq=on"
    if vhost_user_socket is not None:
        chardev = f"socket,id=chr0,path={vhost_user_socket}"
        if reconnect:
            chardev += ",reconnect=1"
        argv += ["-chardev", chardev]
        argv += ["-netdev", f"type=vhost-user,id=net0,chardev=chr0,queues={queue_pairs}"]
        argv += ["-device", device]
    elif netdev_args:
        argv += list(netdev_args)
        if "-device" not in netdev_args:
            argv += ["-device", device]
    else:
        argv += ["-nic", "none"]
    return argv


def tail_lines(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


class Guest:
    """A running guest. Console output accumulates in memory (and in the log file)."""

    def __init__(self, proc: trio.Process, log_file: object | None) -> None:
        self.proc = proc
        self.pid: int = proc.pid
        self.boot_seconds: float | None = None
        self._log = log_file
        self._console = ""
        self._stderr = ""
        self._cursor = 0
        self._changed = trio.Event()
        self._exited = False
        self._stderr_done = trio.Event()
        self._send_lock = trio.Lock()

    @property
    def console(self) -> str:
        return self._console

    @property
    def stderr(self) -> str:
        return self._stderr

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _pump_console(self) -> None:
        assert self.proc.stdout is not None
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        async for chunk in self.proc.stdout:
            text = dec.decode(chunk).replace("\r", "")
            self._console += text
            if self._log is not None:
                self._log.write(text)  # type: ignore[attr-defined]
                self._log.flush()  # type: ignore[attr-defined]
            self._wake()

    async def _pump_stderr(self) -> None:
        assert self.proc.stderr is not None
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            async for chunk in self.proc.stderr:
                self._stderr += dec.decode(chunk)
        finally:
            self._stderr_done.set()

    async def _watch_exit(self) -> None:
        await self.proc.wait()
        with trio.move_on_after(2):
            await self._stderr_done.wait()
        self._exited = True
        self._wake()

    def describe_failure(self, what: str) -> str:
        status = f"QEMU pid {self.pid} exit status {self.proc.returncode}"
        return (
            f"{what} ({status})\n--- QEMU stderr (tail) ---\n{tail_lines(self._stderr)}\n"
            f"--- guest console (tail) ---\n{tail_lines(self._console)}"
        )

    async def _wait_pattern(
        self, pattern: re.Pattern[str], start: int, timeout: float
    ) -> re.Match[str]:
        with trio.move_on_after(timeout):
            while True:
                m = pattern.search(self._console, start)
                if m:
                    return m
                if self._exited:
                    raise GuestError(
                        self.describe_failure(f"QEMU exited while waiting for {pattern.pattern!r}")
                    )
                await self._changed.wait()
        raise GuestError(
            self.describe_failure(f"timed out after {timeout} s waiting for {pattern.pattern!r}")
        )

    async def wait_for(self, text: str | re.Pattern[str], timeout: float = 60) -> str:
        """Wait until `text` (a string or compiled regex) appears in the console output
        after the previous match; return the output up to and including it."""
        pattern = text if isinstance(text, re.Pattern) else re.compile(re.escape(text))
        m = await self._wait_pattern(pattern, self._cursor, timeout)
        out = self._console[self._cursor : m.end()]
        self._cursor = m.end()
        return out

    async def send(self, data: str) -> None:
        """Write raw bytes to the serial console."""
        assert self.proc.stdin is not None
        async with self._send_lock:
            await self.proc.stdin.send_all(data.encode())

    async def run(self, cmd: str, timeout: float = 60) -> tuple[int, str]:
        """Run `cmd` with the guest's /bin/sh (stdin /dev/null, stderr merged into
        stdout); return (exit status, output). Each call is a fresh `sh -c`."""
        tok = secrets.token_hex(6)
        line = (
            f"printf '%s%s\\n' __TNB_ {tok}; sh -c {shlex.quote(cmd)} </dev/null 2>&1;"
            f" printf '%s%s:%s\\n' __TNE_ {tok} \"$?\"\n"
        )
        if max(len(part) for part in line.split("\n")) > MAX_COMMAND:
            raise ValueError(f"guest command line too long ({len(line)} bytes)")
        start = len(self._console)
        pattern = re.compile(rf"__TNB_{tok}\n(.*?)__TNE_{tok}:(\d+)\n", re.S)
        await self.send(line + RX_PADDING)
        m = await self._wait_pattern(pattern, start, timeout)
        self._cursor = max(self._cursor, m.end())
        return int(m.group(2)), m.group(1)

    async def check(self, cmd: str, timeout: float = 60) -> str:
        """Like run(), but raise GuestError when the command fails."""
        status, out = await self.run(cmd, timeout)
        if status != 0:
            raise GuestError(f"guest command {cmd!r} failed with status {status}:\n{out}")
        return out


@asynccontextmanager
async def boot_guest(
    *,
    netdev_args: list[str] | None,
    vhost_user_socket: str | None = None,
    queue_pairs: int = 1,
    mac: str = "52:54:00:12:34:56",
    smp: int = 2,
    mem_mb: int = 512,
    reconnect: bool = False,
    log_path: Path | None = None,
    netns: str | None = None,
    boot_timeout: float = 180,
    extra_append: str = "",
) -> AsyncIterator[Guest]:
    """Boot the guest and yield it once its console shell is ready.

    netdev_args: raw QEMU arguments defining netdev `net0` (e.g. a tap backend); a
    virtio-net-pci device for it is added unless they contain their own -device.
    vhost_user_socket: connect netdev `net0` to a vhost-user backend at this path
    (takes precedence over netdev_args). netns: run QEMU inside this network namespace.
    """
    for path in (VMLINUX, INITRAMFS):
        if not path.exists():
            raise GuestError(f"{path} missing: run tools/build-guest (or ensure_guest_image())")
    argv = qemu_argv(
        netdev_args=netdev_args,
        vhost_user_socket=vhost_user_socket,
        queue_pairs=queue_pairs,
        mac=mac,
        smp=smp,
        mem_mb=mem_mb,
        reconnect=reconnect,
        extra_append=extra_append,
    )
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    log_file = None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = log_path.open("w", encoding="utf-8")
        log_file.write("# " + shlex.join(argv) + "\n")
    proc = await trio.lowlevel.open_process(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    guest = Guest(proc, log_file)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(guest._pump_console)
            nursery.start_soon(guest._pump_stderr)
            nursery.start_soon(guest._watch_exit)
            t0 = time.monotonic()
            await guest.wait_for(READY_BANNER, boot_timeout)
            await guest.check("true", timeout=30)  # the console shell answers
            guest.boot_seconds = time.monotonic() - t0
            try:
                yield guest
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # Only the body or the boot wait can fail (the pumps do not raise): unwrap so
        # callers see the original exception rather than a one-element group.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()  # SIGKILL to the pid we started
            with trio.move_on_after(10):
                await proc.wait()
            if proc.stdin is not None:
                await proc.stdin.aclose()
        if log_file is not None:
            log_file.write(f"\n# QEMU exit status {proc.returncode}\n# --- QEMU stderr ---\n")
            log_file.write(guest.stderr)
            log_file.close()
