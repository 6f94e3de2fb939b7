"""The migration e2e test's datagram check, run with the guest's own awk
(busybox's) on the host over files whose faults are known."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from tests.e2e.test_guest_migration import AWK_CHECK, LINE, datagram

BUSYBOX = shutil.which("busybox")  # tools/setup installs busybox-static


def check(rx: Path, switched_at: int) -> dict[str, object]:
    """What the guest's check prints for the file ``rx``: its counts, and the
    numbers it found missing."""
    assert BUSYBOX is not None, "busybox is missing: run tools/setup"
    cmd = AWK_CHECK.replace("FROM=%d", f"FROM={switched_at}").replace("/tmp/rx", str(rx))
    out = subprocess.run(
        [BUSYBOX, "sh", "-c", cmd], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    m = re.search(r"good=(\d+) bad=(\d+) dup=(\d+) after=(\d+) min=(\d+) max=(\d+)", out)
    assert m, out
    names = ("good", "bad", "dup", "after", "min", "max")
    counts: dict[str, object] = dict(zip(names, map(int, m.groups()), strict=True))
    missing = re.search(r"^missing:((?: \d+)+)$", out, re.M)
    counts["missing"] = [int(n) for n in missing.group(1).split()] if missing else []
    return counts


def test_datagrams_are_lines_of_the_announced_length() -> None:
    for seq in (0, 7, 8, 123, 777, 99999999):
        d = datagram(seq)
        assert len(d) == LINE and d.endswith(b"\n") and d.count(b"\n") == 1


def test_every_intact_datagram_counts_as_good(tmp_path: Path) -> None:
    """Numbers written only with the digits 0-7 ("00000123") included: busybox awk
    reads such a string as octal, and the check once counted 504 of 843 intact
    datagrams as bad for it."""
    rx = tmp_path / "rx"
    rx.write_bytes(b"".join(datagram(i) for i in range(843)))
    want = {"good": 843, "bad": 0, "dup": 0, "after": 443, "min": 0, "max": 842, "missing": []}
    assert check(rx, 400) == want


def test_faults_are_counted(tmp_path: Path) -> None:
    """A changed byte, a truncated datagram, two datagrams run together, an
    older datagram's bytes under a newer number, and a repeated datagram."""
    lines = [datagram(i) for i in range(20)]
    lines[3] = lines[3][:500] + b"X" + lines[3][501:]  # one byte changed
    lines[5] = lines[5][:400] + b"\n"  # truncated
    lines[12] = b"00000012" + datagram(11)[8:]  # the old contents under a new number
    lines[9] = lines[9][:-1] + lines[10]  # run together (the newline lost)
    del lines[10]
    lines.append(datagram(15))  # repeated
    rx = tmp_path / "rx"
    rx.write_bytes(b"".join(lines))
    want = {"good": 16, "bad": 4, "dup": 1, "after": 9, "min": 0, "max": 19}
    assert check(rx, 10) == {**want, "missing": [3, 5, 9, 10, 12]}


def test_lost_datagrams_are_listed(tmp_path: Path) -> None:
    rx = tmp_path / "rx"
    rx.write_bytes(b"".join(datagram(i) for i in range(100) if not 40 <= i < 70))
    got = check(rx, 50)
    assert (got["good"], got["bad"], got["after"]) == (70, 0, 30)
    assert got["missing"] == list(range(40, 60))  # the first 20
