"""Per-queue-pair counters: owned by one pair, summed into status on demand."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from trionet.native import ffi

# struct tn_pair_stats fields folded into the status, by the name they report under
_NATIVE_DROPS = {
    "drops_rx_no_buffer": "rx_no_buffer",
    "drops_tx_bad_frame": "tx_bad_frame",
    "drops_rx_bad_frame": "rx_bad_frame",
    "drops_tx_io": "tx_io_error",
    "drops_rx_io": "rx_io_error",
    "drops_rx_filtered": "rx_filtered",
}


@dataclass
class PairCounters:
    rx_packets: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    kicks: int = 0
    notifications: int = 0
    drops: Counter[str] = field(default_factory=Counter)
    # what the pair's worker thread counts (threaded data path), kept for the pair's life
    native: Any = field(default_factory=lambda: ffi.new("struct tn_pair_stats *"))

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
        if b.drops_filtered:
            self.drops[f"{side}_filtered"] += b.drops_filtered

    def as_dict(self) -> dict[str, Any]:
        n = self.native
        drops = Counter(self.drops)
        for name, reason in _NATIVE_DROPS.items():
            if value := int(getattr(n, name)):
                drops[reason] += value
        return {
            "rx_packets": self.rx_packets + int(n.rx_packets),
            "tx_packets": self.tx_packets + int(n.tx_packets),
            "rx_bytes": self.rx_bytes + int(n.rx_bytes),
            "tx_bytes": self.tx_bytes + int(n.tx_bytes),
            "kicks": self.kicks + int(n.kicks),
            "notifications": self.notifications + int(n.notifications),
            "batches": int(n.batches),
            "drops": sum(drops.values()),
            "drops_by_reason": dict(drops),
        }
