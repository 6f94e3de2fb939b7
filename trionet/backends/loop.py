"""Loop backend: every frame the guest sends comes back on the pair it left by.

For tests and benchmarks.  It never stops consuming the guest's TX: when the
guest's RX ring has no room the returned frame is dropped and counted.

With ``generate_size`` it is also a traffic source: every active pair keeps
its RX ring full of one fixed broadcast frame of that many bytes (Ethernet
header and payload, no FCS) with the local-experimental EtherType 0x88B5, so a
receive-only guest (testpmd rxonly) can measure how fast frames come in.
"""

from __future__ import annotations

GENERATED_SRC = bytes.fromhex("02746e000001")  # locally administered
GENERATED_ETHERTYPE = 0x88B5  # IEEE local experimental
MIN_FRAME, MAX_FRAME = 14, 65535


def generated_frame(size: int) -> bytes:
    """The generator's frame: broadcast, from GENERATED_SRC, payload 0, 1, 2, ..."""
    if not MIN_FRAME <= size <= MAX_FRAME:
        raise ValueError(f"frame size {size} outside {MIN_FRAME}..{MAX_FRAME}")
    head = b"\xff" * 6 + GENERATED_SRC + GENERATED_ETHERTYPE.to_bytes(2, "big")
    return head + bytes(i & 0xFF for i in range(size - len(head)))


class LoopBackend:
    @property
    def name(self) -> str:
        return "loop"

    def __init__(self, queue_pairs: int, generate_size: int = 0) -> None:
        self.queue_pairs = queue_pairs
        self.active_pairs = 1
        self.generate = generated_frame(generate_size) if generate_size else None

    def offered_features(self) -> int:
        # Frames go back unchanged, header included: any offload the guest asks
        # of us would have to be one it also accepts, so offer none.
        return 0

    async def open(self) -> None:
        return None

    def set_features(self, features: int) -> None:
        return None

    async def set_active_pairs(self, n: int) -> None:
        self.active_pairs = n

    async def aclose(self) -> None:
        return None
