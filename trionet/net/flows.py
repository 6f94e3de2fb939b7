"""The flow-to-queue-pair map shared by every pair of one VM.

The table itself is native (``struct tn_flows``): the batched TX paths note
every frame's flow with the pair it left on, without Python per packet.  This
wrapper is the policy side: look a flow up, place host-originated flows,
re-home flows when pairs go away, and report counters.
"""

from __future__ import annotations

from typing import Any

from trionet.native import ffi, lib

DEFAULT_TTL = 300  # seconds an idle flow keeps its pair
SLOTS = int(lib.TN_FLOW_SLOTS)


class FlowTable:
    def __init__(self, ttl: int = DEFAULT_TTL) -> None:
        self.c: Any = ffi.new("struct tn_flows *")
        self.c.ttl = ttl

    @staticmethod
    def hash_frame(frame: bytes, hdr_len: int) -> int:
        """Symmetric flow hash of a frame that starts with its virtio-net header."""
        return int(lib.tn_flow_hash(frame, len(frame), hdr_len))

    def note(self, flow: int, pair: int) -> None:
        lib.tn_flow_note(self.c, flow, pair, lib.tn_flow_now())

    def lookup(self, flow: int) -> int | None:
        p = int(lib.tn_flow_lookup(self.c, flow, lib.tn_flow_now()))
        return None if p < 0 else p

    def pair_for(self, flow: int, active: int) -> int:
        """Pair for host-side traffic of ``flow``: where the guest last sent it
        (if active), else spread by hash over the active pairs."""
        return int(lib.tn_flow_pair_for(self.c, flow, active, lib.tn_flow_now()))

    def rehome(self, active: int) -> int:
        """Flows on pairs >= ``active`` move to an active pair; returns how many."""
        return int(lib.tn_flow_rehome(self.c, active))

    def stats(self) -> dict[str, int]:
        c = self.c
        return {
            "slots": SLOTS,
            "flows": int(c.count),
            "notes": int(c.notes),
            "collisions": int(c.collisions),
            "rehomed": int(c.rehomed),
        }
