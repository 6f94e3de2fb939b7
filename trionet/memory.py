"""Guest memory: the regions the VMM shares with us, mapped from their fds.

The C core keeps the table (``struct tn_mem``) it checks every guest address
against; this module owns the mappings' lifetimes.  Regions are validated
(size, overflow, overlap) before anything is mapped, and a table is replaced
only once every new region is mapped, so a failure leaves the old table whole.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from trionet.dirtylog import DirtyLog
from trionet.errors import GuestMemoryError, RemoteProtocolError
from trionet.native import ffi, lib

log = logging.getLogger(__name__)

MAX_REGIONS = 64
_PAGE = mmap.PAGESIZE
_U64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class RegionSpec:
    """A region as the VMM describes it (SET_MEM_TABLE / ADD_MEM_REG)."""

    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int


@dataclass(slots=True)
class _Mapping:
    spec: RegionSpec
    base: Any  # cdata void*: start of the mmap
    length: int
    host: Any  # cdata uint8_t*: guest_addr maps here
    refs: int = 1  # ADD_MEM_REG of an identical region (QEMU: one per vhost_dev) counts


def _check_spec(spec: RegionSpec) -> None:
    if spec.size <= 0:
        raise RemoteProtocolError(f"memory region at {spec.guest_addr:#x} has size 0")
    for name, start in (("guest", spec.guest_addr), ("user", spec.user_addr)):
        if start + spec.size - 1 > _U64:
            raise RemoteProtocolError(
                f"memory region {name} range {start:#x}+{spec.size:#x} overflows"
            )
    if spec.mmap_offset + spec.size - 1 > _U64:
        raise RemoteProtocolError("memory region mmap offset overflows")


def _same(a: RegionSpec, b: RegionSpec) -> bool:
    return (a.guest_addr, a.size, a.user_addr) == (b.guest_addr, b.size, b.user_addr)


def _overlaps(a: RegionSpec, b: RegionSpec) -> bool:
    def hit(x: int, y: int) -> bool:
        return x < y + b.size and y < x + a.size

    return hit(a.guest_addr, b.guest_addr) or hit(a.user_addr, b.user_addr)


def _check_fd(spec: RegionSpec, fd: int) -> None:
    """The region must lie inside its fd: a mapping past the end of a file is
    allowed, touching it is SIGBUS.  Guest memory is a regular file (memfd,
    hugetlbfs, tmpfs, a file), whose size says how far it goes."""
    where = (
        f"memory region gpa={spec.guest_addr:#x} size={spec.size:#x} offset={spec.mmap_offset:#x}"
    )
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise GuestMemoryError(f"{where}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise GuestMemoryError(f"{where}: its fd is not a memory file (memfd, hugetlbfs, shm)")
    if spec.mmap_offset + spec.size > st.st_size:
        raise GuestMemoryError(f"{where} reaches past the end of its fd ({st.st_size:#x} bytes)")


def _map(spec: RegionSpec, fd: int) -> _Mapping:
    _check_fd(spec, fd)
    aligned = spec.mmap_offset - spec.mmap_offset % _PAGE
    delta = spec.mmap_offset - aligned
    length = spec.size + delta
    base = lib.tn_mmap(fd, length, aligned)
    if base == ffi.NULL:
        err = ffi.errno
        raise GuestMemoryError(
            f"cannot map memory region gpa={spec.guest_addr:#x} size={spec.size:#x} "
            f"offset={spec.mmap_offset:#x}: {os.strerror(err)}"
        )
    host = ffi.cast("uint8_t *", base) + delta
    return _Mapping(spec, base, length, host)


def _unmap(m: _Mapping) -> None:
    rc = lib.tn_munmap(m.base, m.length)
    if rc < 0:  # pragma: no cover - munmap of our own mapping does not fail
        log.error("munmap of region %#x failed: %s", m.spec.guest_addr, os.strerror(-rc))


class GuestMemory:
    """The VM's memory as this process sees it.  Every access is range-checked."""

    def __init__(self) -> None:
        self.table: Any = ffi.new("struct tn_mem *")
        self._maps: list[_Mapping] = []
        self.generation = 0  # bumped on every change: rings re-translate
        self.log = DirtyLog(self.table)  # live migration's dirty bitmap

    @property
    def regions(self) -> tuple[RegionSpec, ...]:
        return tuple(m.spec for m in self._maps)

    def __len__(self) -> int:
        return len(self._maps)

    def _publish(self, maps: list[_Mapping]) -> None:
        table = self.table
        table.nregions = len(maps)
        for i, m in enumerate(maps):
            r = table.regions[i]
            r.gpa, r.size, r.uva, r.host = (
                m.spec.guest_addr,
                m.spec.size,
                m.spec.user_addr,
                m.host,
            )
        self._maps = maps
        self.generation += 1

    def set_table(self, specs: Sequence[RegionSpec], fds: Sequence[int]) -> None:
        """Replace every region (SET_MEM_TABLE).  Closes ``fds`` in all cases."""
        try:
            if len(specs) != len(fds):
                raise RemoteProtocolError(f"{len(specs)} memory regions but {len(fds)} fds")
            if len(specs) > MAX_REGIONS:
                raise RemoteProtocolError(f"{len(specs)} memory regions, at most {MAX_REGIONS}")
            for i, spec in enumerate(specs):
                _check_spec(spec)
                for other in specs[:i]:
                    if _overlaps(spec, other):
                        raise RemoteProtocolError("memory regions overlap")
            new: list[_Mapping] = []
            try:
                for spec, fd in zip(specs, fds, strict=True):
                    new.append(_map(spec, fd))
            except BaseException:
                for m in new:
                    _unmap(m)
                raise
        finally:
            close_fds(fds)
        old = self._maps
        self._publish(new)
        for m in old:
            _unmap(m)

    def add_region(self, spec: RegionSpec, fd: int) -> None:
        """ADD_MEM_REG.  Closes ``fd`` in all cases.

        QEMU runs one vhost_dev per queue pair on the same connection and each
        adds the same regions: an identical region is counted, not refused."""
        try:
            _check_spec(spec)
            for m in self._maps:
                if _same(m.spec, spec):
                    m.refs += 1
                    return
            if len(self._maps) >= MAX_REGIONS:
                raise RemoteProtocolError(f"no free memory slot (at most {MAX_REGIONS})")
            for m in self._maps:
                if _overlaps(spec, m.spec):
                    raise RemoteProtocolError(
                        f"memory region gpa={spec.guest_addr:#x} overlaps an existing one"
                    )
            new = _map(spec, fd)
        finally:
            close_fds([fd])
        self._publish([*self._maps, new])

    def remove_region(self, spec: RegionSpec) -> None:
        """REM_MEM_REG: the region with the same guest address, size and user address."""
        for i, m in enumerate(self._maps):
            if _same(m.spec, spec):
                m.refs -= 1
                if m.refs > 0:
                    return
                self._publish(self._maps[:i] + self._maps[i + 1 :])
                _unmap(m)
                return
        raise RemoteProtocolError(f"no memory region at gpa={spec.guest_addr:#x} to remove")

    def clear(self) -> None:
        self.log.close()
        old = self._maps
        self._publish([])
        for m in old:
            _unmap(m)

    # ---- address checks and copies --------------------------------------

    def uva_to_gpa(self, uva: int) -> int:
        out = ffi.new("uint64_t *")
        if lib.tn_mem_uva_to_gpa(self.table, uva, out) < 0:
            raise GuestMemoryError(f"VMM address {uva:#x} is in no memory region")
        return int(out[0])

    def read(self, gpa: int, length: int) -> bytes:
        buf = ffi.new("uint8_t[]", max(length, 1))
        if lib.tn_mem_read(self.table, gpa, buf, length) < 0:
            raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is outside guest memory")
        return bytes(ffi.buffer(buf, length))

    def write(self, gpa: int, data: bytes) -> None:
        if lib.tn_mem_write(self.table, gpa, data, len(data)) < 0:
            raise GuestMemoryError(f"guest range {gpa:#x}+{len(data):#x} is outside guest memory")


def close_fds(fds: Sequence[int]) -> None:
    """Close fds we own, ignoring ones already gone."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
