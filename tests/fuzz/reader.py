"""A small, total reader over fuzz bytes: every call returns a value, zeros once
the input runs out, so any byte string is a valid input and a crashing input
replays the same way with or without the fuzzer (regression tests hold bytes)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


class Reader:
    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def take(self, n: int) -> bytes:
        out = self._data[self._pos : self._pos + n]
        self._pos += len(out)
        return out

    def uint(self, nbytes: int) -> int:
        return int.from_bytes(self.take(nbytes).ljust(nbytes, b"\0"), "little")

    def u8(self) -> int:
        return self.uint(1)

    def u16(self) -> int:
        return self.uint(2)

    def u32(self) -> int:
        return self.uint(4)

    def u64(self) -> int:
        return self.uint(8)

    def below(self, n: int) -> int:
        """0..n-1 from as few bytes as n needs."""
        if n <= 1:
            return 0
        nbytes = (n - 1).bit_length() + 7 >> 3
        return self.uint(nbytes) % n

    def flag(self) -> bool:
        return bool(self.u8() & 1)

    def pick(self, options: Sequence[T]) -> T:
        return options[self.below(len(options))]

    def blob(self, most: int) -> bytes:
        return self.take(self.below(most + 1))
