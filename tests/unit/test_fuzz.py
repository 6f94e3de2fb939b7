"""The fuzz targets (tests/fuzz/targets.py): every input that ever failed one,
replayed as bytes; a seeded sweep of each; a short coverage-guided run of
``tools/fuzz`` itself; and the bugs the fuzzer found, as plain tests."""

from __future__ import annotations

import base64
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakes.driver import DESC_F_NEXT, DriverQueue, GuestRam
from tests.fuzz.targets import TARGETS
from trionet.errors import GuestMemoryError, RingError
from trionet.memory import GuestMemory, RegionSpec
from trionet.virtq.vring import DEVICE_READS, RingAddresses, Vring

REPO = Path(__file__).resolve().parents[2]
TOP = 1 << 64

#: Inputs that made a target fail, with what was wrong.  Never remove one.
CRASHES = [
    (
        "memory",
        "KEAtS/8ADgAgAEAABgEAAQAAACgACgAAAAEAAP8ICAgIAPs5BAAICAgICAD7OQAAAAAAAAAAAAQACAgICAgAAAgI"
        "CAgICAgICAgAAAgICAgACAgICAgICAgICAgICAgICAgICAAgAAAAz8/PzwYBAAAA/wQACAgICAgAAAgICAgICAgI"
        "CAgICAhICAgIAPs5nv//////ABYBAAAAAABA",
        "a guest write at the last byte of the address space wrapped to gpa 0 and went on "
        "in the region mapped there (native tn_mem_write; tn_mem_read and descriptor "
        "walks likewise)",
    ),
    (
        "virtq",
        "JwBVVQAAEBEA2f8AAAAAEQD///9B",
        "the harness placed a ring at a VMM address past 2**64 (a harness bug: real "
        "addresses come from u64 fields)",
    ),
    (
        "memory",
        "L1v//////8zMzMzCzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMwfHx8fAAAAAAAAAAAAAAAAAAAAAAAA"
        "AAAAAAAAAAAAAAAAQAAAAAAAABAAAAAAAAAEAAAAAAC5uZkHyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIzMzMzMLM"
        "zMzMzMzMzMzMzMzIyMjIyMjIyMjIyMjIyMjIyMjIyNjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjI"
        "yMjIyMgFAAAAAAAAAMjIyMjI///IyMjI////////////////////////////////////////////////////////"
        "/1j/////////////////////////yMjIyMjIyMjIyMjIyMjIyMjIyMjIyMgICAgICAgIAAAAAAAAAB8fzMzMzMzM"
        "////fX0A",
        "regions aliasing the same bytes of one memfd: a write through one shows in "
        "the other (the harness's model did not know; trionet was right)",
    ),
]


@pytest.mark.parametrize(
    ("target", "data"),
    [(t, base64.b64decode(d)) for t, d, _ in CRASHES],
    ids=[f"{t}-{i}" for i, (t, _, _) in enumerate(CRASHES)],
)
def test_crash_inputs_stay_fixed(target: str, data: bytes) -> None:
    TARGETS[target](data)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_targets_on_seeded_random_inputs(target: str) -> None:
    """Each target as a plain function over random bytes (no fuzzer needed)."""
    rng = random.Random(f"trionet-{target}")
    fds = len(os.listdir("/proc/self/fd"))
    TARGETS[target](b"")  # first call sets up the target's long-lived fds
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(300):
        TARGETS[target](rng.randbytes(rng.randrange(600)))
    assert len(os.listdir("/proc/self/fd")) == fds, "a target leaked fds"


def test_tools_fuzz_short_run(tmp_path: Path) -> None:
    """``tools/fuzz`` under atheris/libFuzzer: every target runs, none fails."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "fuzz"), "--runs", "3000", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert {t["target"] for t in summary["targets"]} == set(TARGETS)
    for t in summary["targets"]:
        assert t["executions"] >= 900, t
        assert t["crashes"] == [], t


# ---- what the fuzzer found ------------------------------------------------------------


def _wrapped_memory() -> tuple[GuestMemory, list[int]]:
    """A page at the very top of the guest address space and one at gpa 0."""
    fds = [os.memfd_create("wrap", os.MFD_CLOEXEC) for _ in range(2)]
    for fd in fds:
        os.ftruncate(fd, 4096)
    mem = GuestMemory()
    mem.set_table(
        [RegionSpec(TOP - 4096, 4096, 0x10000, 0), RegionSpec(0, 4096, 0x20000, 0)],
        [os.dup(fd) for fd in fds],
    )
    return mem, fds


def test_guest_range_past_the_top_of_the_address_space_is_refused() -> None:
    mem, fds = _wrapped_memory()
    try:
        assert mem.read(TOP - 4, 4) == bytes(4)  # up to the last byte: fine
        with pytest.raises(GuestMemoryError):
            mem.read(TOP - 1, 2)
        with pytest.raises(GuestMemoryError):
            mem.write(TOP - 1, b"ab")
        assert os.pread(fds[1], 1, 0) == b"\0", "the write wrapped to gpa 0"
    finally:
        mem.clear()
        for fd in fds:
            os.close(fd)


def test_descriptor_wrapping_past_the_top_breaks_its_ring() -> None:
    ram = GuestRam(1 << 20)
    top = os.memfd_create("top", os.MFD_CLOEXEC)
    os.ftruncate(top, 4096)
    mem = GuestMemory()
    mem.set_table(
        [
            RegionSpec(ram.base, ram.size, ram.uva, 0),
            RegionSpec(TOP - 4096, 4096, 0x10000, 0),
        ],
        [os.dup(ram.fd), top],
    )
    try:
        q = DriverQueue(ram, 16)
        q.set_desc(0, TOP - 8, 16, DESC_F_NEXT, 1)  # 8 bytes at the top, 8 more "at gpa 0"
        q.set_desc(1, 0x8000, 16)
        q.publish_head(0)
        vr = Vring(0)
        vr.set_num(16)
        u = ram.uva - ram.base
        vr.set_addresses(RingAddresses(q.desc + u, q.avail + u, q.used + u))
        vr.started = True
        vr.attach(mem, 0)
        with pytest.raises(RingError, match=r"outside guest memory|address"):
            vr.pop(mem, DEVICE_READS)
        assert vr.broken is not None
    finally:
        mem.clear()
        ram.close()
