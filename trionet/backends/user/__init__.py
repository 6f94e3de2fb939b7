"""The rootless user-mode network backend (``--backend user``, the default).

No tap, no namespace, no privileges: the guest's frames end in trionet's own
stack (``stack.py``), which answers ARP, DHCP, NDP and DHCPv6 and translates
UDP and ICMP echo into host sockets, as passt does.  Every flow carries the
queue pair of the guest's last frame for it.
"""

from __future__ import annotations

from trionet.backends.user.config import UserConfig
from trionet.backends.user.stack import UserStack
from trionet.net import features as F

# Checksums: the guest may leave its TX checksums partial (we verify only the
# ones it completed); we produce every checksum and mark RX DATA_VALID.  TSO
# both ways: a guest may send TCP in GSO frames (HOST_TSO4/6: the payload goes
# to the socket whole), and one that takes them gets host data so (GUEST_TSO4/6:
# GSO frames of many segments, checksums partial, NEEDS_CSUM).
USER_FEATURES = F.mask(
    *(F.CSUM, F.GUEST_CSUM, F.GUEST_TSO4, F.GUEST_TSO6, F.HOST_TSO4, F.HOST_TSO6)
)


class UserBackend:
    def __init__(self, cfg: UserConfig, queue_pairs: int) -> None:
        self.cfg = cfg
        self.queue_pairs = queue_pairs
        self.stack = UserStack(cfg, queue_pairs)
        self.features = 0

    @property
    def name(self) -> str:
        return "user"

    async def open(self) -> None:
        return None

    def offered_features(self) -> int:
        return USER_FEATURES

    def set_features(self, features: int) -> None:
        self.features = features
        self.stack.set_features(features)

    async def set_active_pairs(self, n: int) -> None:
        self.stack.set_active_pairs(n)

    async def aclose(self) -> None:
        self.stack.close()
