"""Driver-side fakes: guest RAM in a memfd and split rings laid out in it.

Built like rust-vmm's ``MockSplitQueue``: the test plays the guest driver,
writing descriptors and avail entries itself (including hostile ones) and
reading what the device put in the used ring.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
UVA_OFFSET = 0x7F00_0000_0000  # the fake VMM's "virtual address" of gpa 0


class GuestRam:
    """``size`` bytes of guest memory at gpa ``base`` in a memfd, with a bump allocator."""

    def __init__(self, size: int = 4 << 20, base: int = 0) -> None:
        self.size = size
        self.base = base
        self.fd = os.memfd_create("trionet-test-guest", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size)
        self._next = 0x1000

    @property
    def uva(self) -> int:
        return UVA_OFFSET + self.base

    def alloc(self, n: int, align: int = 16) -> int:
        self._next = (self._next + align - 1) // align * align
        gpa = self.base + self._next
        self._next += n
        if self._next > self.size:
            raise MemoryError("fake guest RAM exhausted")
        return gpa

    def off(self, gpa: int) -> int:
        return gpa - self.base

    def write(self, gpa: int, data: bytes) -> None:
        o = self.off(gpa)
        self.map[o : o + len(data)] = data

    def read(self, gpa: int, n: int) -> bytes:
        o = self.off(gpa)
        return bytes(self.map[o : o + n])

    def u16(self, gpa: int) -> int:
        return int(struct.unpack_from("<H", self.map, self.off(gpa))[0])

    def put_u16(self, gpa: int, v: int) -> None:
        struct.pack_into("<H", self.map, self.off(gpa), v)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


@dataclass
class Used:
    head: int
    length: int


class DriverQueue:
    """One split ring as the driver sees it."""

    def __init__(self, ram: GuestRam, size: int = 256) -> None:
        self.ram = ram
        self.size = size
        self.desc = ram.alloc(16 * size, 16)
        self.avail = ram.alloc(6 + 2 * size, 2)
        self.used = ram.alloc(6 + 8 * size, 4)
        self.avail_idx = 0
        self.last_used = 0
        self._free = list(range(size))
        self.buffers: dict[int, list[tuple[int, int]]] = {}  # head -> [(gpa, len)] of writables

    # --- raw access (hostile tests write what they like) -------------------
    def set_desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        self.ram.write(self.desc + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def publish_head(self, head: int) -> None:
        self.ram.put_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.ram.put_u16(self.avail + 2, self.avail_idx)

    def set_avail_idx(self, idx: int) -> None:
        self.avail_idx = idx & 0xFFFF
        self.ram.put_u16(self.avail + 2, self.avail_idx)

    def set_used_event(self, v: int) -> None:
        self.ram.put_u16(self.avail + 4 + 2 * self.size, v)

    def avail_event(self) -> int:
        return self.ram.u16(self.used + 4 + 8 * self.size)

    def set_avail_flags(self, flags: int) -> None:
        self.ram.put_u16(self.avail, flags)

    def used_flags(self) -> int:
        return self.ram.u16(self.used)

    # --- well-formed chains --------------------------------------------------
    def add_tx(self, frame: bytes, segments: int = 1, indirect: bool = False) -> int:
        """A device-readable chain holding ``frame`` in ``segments`` pieces."""
        step = max(1, -(-len(frame) // segments))
        pieces = [frame[i : i + step] for i in range(0, len(frame), step)] or [b""]
        bufs = []
        for piece in pieces:
            gpa = self.ram.alloc(max(len(piece), 1))
            self.ram.write(gpa, piece)
            bufs.append((gpa, len(piece), 0))
        return self._add(bufs, indirect)

    def add_rx(self, capacity: int = 2048, segments: int = 1, indirect: bool = False) -> int:
        step = -(-capacity // segments)
        bufs = [(self.ram.alloc(step), step, DESC_F_WRITE) for _ in range(segments)]
        head = self._add(bufs, indirect)
        self.buffers[head] = [(g, n) for g, n, _ in bufs]
        return head

    def add_rx_chain(self, sizes: list[int], indirect: bool = False) -> int:
        """A device-writable chain of buffers of the given ``sizes`` (a 12-byte
        first one, say, as Linux's big-packet receive buffers have)."""
        bufs = [(self.ram.alloc(n), n, DESC_F_WRITE) for n in sizes]
        head = self._add(bufs, indirect)
        self.buffers[head] = [(g, n) for g, n, _ in bufs]
        return head

    def repost(self, head: int) -> None:
        """Make a chain the device used available again, as it was (a driver
        recycling its receive buffers; the descriptors are unchanged)."""
        self.publish_head(head)

    def add_command(self, command: bytes) -> tuple[int, int]:
        """A control-queue chain: the command (readable) then a 1-byte ack (writable).
        Returns (head, gpa of the ack byte)."""
        cmd = self.ram.alloc(max(len(command), 1))
        self.ram.write(cmd, command)
        ack = self.ram.alloc(1)
        self.ram.write(ack, b"\xff")
        head = self._add([(cmd, len(command), 0), (ack, 1, DESC_F_WRITE)], False)
        return head, ack

    def _add(self, bufs: list[tuple[int, int, int]], indirect: bool) -> int:
        if indirect:
            table = self.ram.alloc(16 * len(bufs), 16)
            for i, (gpa, n, fl) in enumerate(bufs):
                nxt = DESC_F_NEXT if i + 1 < len(bufs) else 0
                self.ram.write(table + 16 * i, struct.pack("<QIHH", gpa, n, fl | nxt, i + 1))
            head = self._free.pop(0)
            self.set_desc(head, table, 16 * len(bufs), DESC_F_INDIRECT)
        else:
            ids = [self._free.pop(0) for _ in bufs]
            for k, (i, (gpa, n, fl)) in enumerate(zip(ids, bufs, strict=True)):
                last = k + 1 == len(ids)
                self.set_desc(
                    i, gpa, n, fl | (0 if last else DESC_F_NEXT), 0 if last else ids[k + 1]
                )
            head = ids[0]
        self.publish_head(head)
        return head

    def used_idx(self) -> int:
        return self.ram.u16(self.used + 2)

    def take_used(self) -> list[Used]:
        out = []
        while self.last_used != self.used_idx():
            e = self.used + 4 + 8 * (self.last_used % self.size)
            head, length = struct.unpack("<II", self.ram.read(e, 8))
            out.append(Used(head, length))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def read_rx(self, used: Used) -> bytes:
        """Bytes the device wrote into the chain ``used.head``."""
        out = b""
        left = used.length
        for gpa, n in self.buffers.get(used.head, []):
            take = min(n, left)
            out += self.ram.read(gpa, take)
            left -= take
        return out
