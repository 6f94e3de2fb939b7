"""The dirty-page log of a live migration (SET_LOG_BASE, VHOST_F_LOG_ALL).

While QEMU migrates a guest it copies guest memory to the destination in
rounds and asks every device that writes guest memory behind its back to mark
what it wrote in a shared bitmap, one bit per 4 KiB page by guest physical
address (vhost-user.rst, "Migration").  The VMM sends the bitmap's memfd with
SET_LOG_BASE, then acks ``VHOST_F_LOG_ALL``; from then on the C core marks
every page it writes (``tn_vq_publish``: used entries, used index, the
buffers behind them; the avail-event word and used flags), worker threads
included.

This module owns the bitmap's mapping and decides when the C core sees it:
``mem->log`` points at it only while it is mapped *and* LOG_ALL is acked.  The
log fd is checked like a memory region's (a regular file at least
``offset + size`` long), so marking never touches a page past the end of the
file (SIGBUS).  Replacing or dropping a mapping happens while no worker thread
runs (the session quiesces its workers for SET_LOG_BASE and SET_FEATURES), so
the old mapping can go at once.
"""

from __future__ import annotations

import logging
import mmap
import os
import stat
from dataclasses import dataclass
from typing import Any

from trionet.errors import GuestMemoryError, RemoteProtocolError
from trionet.native import ffi, lib

log = logging.getLogger(__name__)

#: Bytes of guest memory one bit of the log stands for.
LOG_PAGE = 4096
#: Virtio feature bit (in GET/SET_FEATURES): "log every write" (vhost's VHOST_F_LOG_ALL).
VHOST_F_LOG_ALL = 26
_PAGE = mmap.PAGESIZE
_U64 = (1 << 64) - 1


@dataclass(slots=True)
class _LogMapping:
    base: Any  # cdata void*: start of the mmap
    length: int
    log: Any  # cdata struct tn_log *
    size: int
    offset: int


def log_bytes_for(memory_top: int) -> int:
    """Bytes of bitmap that cover guest addresses [0, memory_top)."""
    pages = (memory_top + LOG_PAGE - 1) // LOG_PAGE
    return (pages + 7) // 8


class DirtyLog:
    """The VMM's dirty bitmap for one memory table (``struct tn_mem``)."""

    def __init__(self, table: Any) -> None:
        self._table = table
        self._map: _LogMapping | None = None
        self.active = False  # LOG_ALL acked

    @property
    def mapped(self) -> bool:
        return self._map is not None

    @property
    def size(self) -> int:
        return 0 if self._map is None else self._map.size

    @property
    def marked_beyond(self) -> int:
        """Marks that fell past the bitmap's end (a log too small for the memory)."""
        return 0 if self._map is None else int(self._map.log.beyond)

    def set_base(self, size: int, offset: int, fd: int) -> None:
        """SET_LOG_BASE: map ``size`` bytes of ``fd`` at ``offset`` as the new
        bitmap (the old one goes).  Closes ``fd`` in all cases; a refused log
        leaves no log mapped (nothing is marked into a stale one)."""
        try:
            new = _map_log(size, offset, fd)
        except (RemoteProtocolError, GuestMemoryError):
            self._drop()
            raise
        finally:
            os.close(fd)
        old, self._map = self._map, new
        self._publish()
        if old is not None:
            _unmap(old)
        log.info("dirty log mapped: %d bytes (%d pages)", size, size * 8)

    def set_active(self, on: bool) -> None:
        """LOG_ALL acked (or no longer): start or stop marking.  Refused while
        no log is mapped: acking LOG_ALL without one would lose every mark."""
        if on and self._map is None:
            raise RemoteProtocolError("VHOST_F_LOG_ALL acked without a dirty log (SET_LOG_BASE)")
        if on != self.active:
            log.info("dirty logging %s", "on" if on else "off")
        self.active = on
        self._publish()

    def close(self) -> None:
        self.active = False
        self._drop()

    def _drop(self) -> None:
        old, self._map = self._map, None
        self._publish()
        if old is not None:
            _unmap(old)

    def _publish(self) -> None:
        self._table.log = self._map.log if self._map is not None and self.active else ffi.NULL


def _map_log(size: int, offset: int, fd: int) -> _LogMapping:
    where = f"dirty log size={size:#x} offset={offset:#x}"
    if size == 0:
        raise RemoteProtocolError(f"{where}: size 0")
    if offset + size - 1 > _U64:
        raise RemoteProtocolError(f"{where}: overflows")
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise GuestMemoryError(f"{where}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise GuestMemoryError(f"{where}: its fd is not a memory file (memfd, shm)")
    if offset + size > st.st_size:
        raise GuestMemoryError(f"{where} reaches past the end of its fd ({st.st_size:#x} bytes)")
    aligned = offset - offset % _PAGE
    length = size + offset - aligned
    base = lib.tn_mmap(fd, length, aligned)
    if base == ffi.NULL:
        raise GuestMemoryError(f"cannot map {where}: {os.strerror(ffi.errno)}")
    cdata = ffi.new("struct tn_log *")
    cdata.bitmap = ffi.cast("uint8_t *", base) + (offset - aligned)
    cdata.size = size
    return _LogMapping(base, length, cdata, size, offset)


def _unmap(m: _LogMapping) -> None:
    rc = lib.tn_munmap(m.base, m.length)
    if rc < 0:  # pragma: no cover - munmap of our own mapping does not fail
        log.error("munmap of the dirty log failed: %s", os.strerror(-rc))
