"""trionet as a separate process, for tests where the process dying (or
freezing) is the failure being guarded against.

``ServiceProcess.start`` runs ``python -m trionet --backend loop`` on a socket
under a temporary directory and waits until it listens; ``stop`` sends
SIGTERM and says whether it exited cleanly in time.  Its log goes to a file
the test can read.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import trio

from tests.fakes.driver import GuestRam
from tests.fakes.frontend import Frontend
from trionet.vhost_user import messages as m

START_TIMEOUT = 20.0


class ServiceProcess:
    def __init__(
        self,
        directory: Path,
        *args: str,
        queue_pairs: int = 4,
        env: dict[str, str] | None = None,
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        self.socket_path = directory / "vhost.sock"
        self.control_path = directory / "control.sock"
        self.log_path = directory / "trionet.log"
        self.queue_pairs = queue_pairs
        self._log = self.log_path.open("wb")
        cmd = [
            sys.executable, "-m", "trionet", "--backend", "loop",
            "--queue-pairs", str(queue_pairs),
            "--socket-path", str(self.socket_path),
            "--control-socket", str(self.control_path),
            *args,
        ]  # fmt: skip
        self.popen = subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env} if env is not None else None,
            pass_fds=pass_fds,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    async def started(self) -> None:
        with trio.fail_after(START_TIMEOUT):
            while not (self.socket_path.exists() and self.control_path.exists()):
                assert self.popen.poll() is None, f"trionet exited at start: {self.log()}"
                await trio.sleep(0.02)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def assert_alive(self) -> None:
        rc = self.popen.poll()
        if rc is not None:
            how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"status {rc}"
            raise AssertionError(f"trionet died ({how}):\n{self.log()}")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def peak_rss(self) -> int:
        """VmHWM in bytes: the most memory the process ever had resident."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")

    async def serves_next_connection(self, ram: GuestRam) -> None:
        """Alive, and a fresh VMM connection is answered."""
        self.assert_alive()
        fe = await Frontend.connect(str(self.socket_path), ram)
        try:
            with trio.fail_after(5):
                assert await fe.u64(m.GetQueueNum()) == self.queue_pairs
        finally:
            fe.close()
        self.assert_alive()

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM; the exit status, or None when it did not exit in time (then killed)."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.popen.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        rc = self.popen.poll()
        if rc is None:
            self.popen.kill()
            self.popen.wait()
        self._log.close()
        return rc
