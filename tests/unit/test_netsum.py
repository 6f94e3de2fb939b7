"""The native Internet checksum (``native/netsum.h``, through ``tn_sum16``)
against RFC 1071 computed here: any data, any length, any alignment (the
native sum takes 32 bytes a pass, then 4, 2 and 1)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from trionet.native import ffi, lib


def rfc1071(data: bytes) -> int:
    """Ones'-complement sum of big-endian 16-bit words, folded, not complemented."""
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def native(data: bytes, offset: int) -> int:
    buf = bytearray(offset) + data  # the data starts at ``offset`` bytes into the buffer
    view = memoryview(buf)[offset:]
    return int(lib.tn_sum16(ffi.from_buffer("uint8_t[]", view), len(data)))


@given(st.binary(max_size=300), st.integers(0, 7))
def test_the_sum_of_any_data_at_any_alignment(data: bytes, offset: int) -> None:
    assert native(data, offset) == rfc1071(data)


@given(st.integers(0, 255), st.integers(60000, 65600), st.integers(0, 7))
def test_long_runs_of_one_byte_carry_right(byte: int, length: int, offset: int) -> None:
    """All-0xff (and other) runs as long as the largest frames: the partial
    sums carry into bits a 16-bit or 32-bit sum would lose."""
    data = bytes([byte]) * length
    assert native(data, offset) == rfc1071(data)
