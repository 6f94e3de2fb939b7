"""Per-queue-pair counters: owned by one pair, summed into status on demand."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class PairCounters:
    rx_packets: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    kicks: int = 0
    notifications: int = 0
    drops: Counter[str] = field(default_factory=Counter)

    def add_tx(self, b: Any) -> None:
        """Fold a TX ``struct tn_batch`` in (once per batch, not per packet)."""
        self.tx_packets += b.packets
        self.tx_bytes += b.bytes
        self._drops(b, "tx")

    def add_rx(self, b: Any) -> None:
        self.rx_packets += b.packets
        self.rx_bytes += b.bytes
        self._drops(b, "rx")

    def _drops(self, b: Any, side: str) -> None:
        if b.drops_no_buffer:
            self.drops[f"{side}_no_buffer"] += b.drops_no_buffer
        if b.drops_bad_frame:
            self.drops[f"{side}_bad_frame"] += b.drops_bad_frame
        if b.drops_io:
            self.drops[f"{side}_io_error"] += b.drops_io

    def as_dict(self) -> dict[str, Any]:
        return {
            "rx_packets": self.rx_packets,
            "tx_packets": self.tx_packets,
            "rx_bytes": self.rx_bytes,
            "tx_bytes": self.tx_bytes,
            "kicks": self.kicks,
            "notifications": self.notifications,
            "drops": sum(self.drops.values()),
            "drops_by_reason": dict(self.drops),
        }
