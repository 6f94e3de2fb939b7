"""Loop backend: every frame the guest sends comes back on the pair it left by.

For tests and benchmarks.  It never stops consuming the guest's TX: when the
guest's RX ring has no room the returned frame is dropped and counted.
"""

from __future__ import annotations


class LoopBackend:
    @property
    def name(self) -> str:
        return "loop"

    def __init__(self, queue_pairs: int) -> None:
        self.queue_pairs = queue_pairs
        self.active_pairs = 1

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
