"""A VMM as its own process, to be killed mid-traffic:
``python -m tests.fakes.vmm_child SOCKET``.

It sets up one queue pair against trionet's loop backend and then keeps frames
going round (TX, looped back to RX) until it is killed; it prints ``flowing``
once the first frame came back."""

from __future__ import annotations

import sys

import trio
from scapy.layers.l2 import ARP, Ether

from tests.fakes.driver import GuestRam
from tests.fakes.frontend import DRIVER_FEATURES, Frontend
from tests.fakes.userguest import UserGuest
from trionet.net import features as F


class _NoStatus:
    def status(self) -> dict[str, object]:
        return {"pairs": [], "active_changes": [], "user": None}


async def main(path: str) -> None:
    ram = GuestRam(4 << 20)
    fe = await Frontend.connect(path, ram)
    await fe.negotiate(DRIVER_FEATURES & ~F.bit(F.CTRL_VQ))
    await fe.setup_pairs(1)
    await fe.sync()
    g = UserGuest(fe, _NoStatus(), 1)  # type: ignore[arg-type]
    g.stock(0, 16)
    frame = bytes(Ether(src="52:54:00:12:34:56", dst="ff:ff:ff:ff:ff:ff") / ARP())
    first = True
    while True:
        g.send(0, frame)
        fe.queues[1].take_used()
        await g.recv_raw(0)
        if first:
            print("flowing", flush=True)
            first = False


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
