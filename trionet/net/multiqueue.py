"""Active queue pair policy (virtio 1.x §5.1.6.5.5), sans-IO.

After every device activation only pair 0 carries traffic until the driver
asks for more.  The driver asks in one of two ways, and both end in the same
single operation (the session's ``apply_active_pairs``):

* the VMM keeps the control queue (QEMU, cloud-hypervisor, DPDK virtio-user)
  and tells us through SET_VRING_ENABLE: ``count_from_enables``;
* the control queue is handed to us: VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET n.

Restart semantics (``--state-file``): a cold start activates with 1 pair; a
restart that finds a recorded count activates once with it; a state file from
before the count was recorded activates once with every pair (legacy restore).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from trionet.errors import RemoteProtocolError


@dataclass
class ActivePairPolicy:
    max_pairs: int
    restore_target: int | None = None  # used by the first activation only

    def activation_target(self) -> int:
        """Pair count for a (re)activated device: once the restore target, then 1."""
        target, self.restore_target = self.restore_target, None
        if target is None:
            return 1
        return max(1, min(target, self.max_pairs))

    def count_from_enables(self, rx_enabled: Sequence[bool], tx_enabled: Sequence[bool]) -> int:
        """Pairs 0..n-1 with both rings enabled (at least 1): QEMU enables and
        disables whole pairs, lowest first, one vring per message."""
        n = 0
        for rx, tx in zip(rx_enabled, tx_enabled, strict=True):
            if not (rx and tx):
                break
            n += 1
        return max(1, min(n, self.max_pairs))

    def check_requested(self, n: int, *, mq_negotiated: bool) -> int:
        """Validate VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET's argument."""
        if not mq_negotiated:
            raise RemoteProtocolError("MQ_VQ_PAIRS_SET without VIRTIO_NET_F_MQ", fatal=False)
        if not 1 <= n <= self.max_pairs:
            raise RemoteProtocolError(
                f"MQ_VQ_PAIRS_SET {n} outside 1..{self.max_pairs}", fatal=False
            )
        return n
