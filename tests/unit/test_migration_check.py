"""The migration e2e test's datagram check, run with the guest's own awk
(busybox's) on the host over files whose faults are known."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from tests.e2e.test_guest_migration import LINE, awk_check, datagram

BUSYBOX = shutil.which("busybox")  # tools/setup installs busybox-static


def check(rx: Path, switched_at: int, base: int = 0) -> dict[str, object]:
    """What the guest's check prints for the file ``rx``: its counts, and the
    numbers it found missing."""
    assert BUSYBOX is not None, "busybox is missing: run tools/setup"
    cmd = awk_check(switched_at, base, str(rx))
    out = subprocess.run(
        [BUSYBOX, "sh", "-c", cmd], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    m = re.search(
        r"good=(\d+) bad=(\d+) dup=(\d+) after=(\d+) min=(\d+) max=(\d+) stale=(\d+)", out
    )
    assert m, out
    names = ("good", "bad", "dup", "after", "min", "max", "stale")
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
    want: dict[str, object] = {"good": 843, "bad": 0, "dup": 0, "after": 443, "min": 0}
    want |= {"max": 842, "stale": 0, "missing": []}
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
    want = {"good": 16, "bad": 4, "dup": 1, "after": 9, "min": 0, "max": 19, "stale": 0}
    assert check(rx, 10) == {**want, "missing": [3, 5, 9, 10, 12]}


def test_lost_datagrams_are_listed(tmp_path: Path) -> None:
    rx = tmp_path / "rx"
    rx.write_bytes(b"".join(datagram(i) for i in range(100) if not 40 <= i < 70))
    got = check(rx, 50)
    assert (got["good"], got["bad"], got["after"]) == (70, 0, 30)
    assert got["missing"] == list(range(40, 60))  # the first 20


def test_an_earlier_attempts_datagrams_are_stale_not_repeated(tmp_path: Path) -> None:
    """A second attempt numbers from its base; what a tap queued from the first
    (the same offsets, numbered from 0) is counted apart, not as repeats."""
    base = 1_000_000
    rx = tmp_path / "rx"
    earlier = [datagram(i) for i in range(300, 554)]  # 254 of the first attempt's
    now = [datagram(base + i) for i in range(864)]
    rx.write_bytes(b"".join(now[:400] + earlier + now[400:]))
    got = check(rx, 350, base)
    assert (got["good"], got["dup"], got["stale"], got["bad"]) == (864, 0, 254, 0)
    assert (got["after"], got["min"], got["max"]) == (514, base, base + 863)
    assert got["missing"] == []
