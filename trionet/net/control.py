"""virtio-net control virtqueue commands (virtio 1.x §5.1.6.5), sans-IO.

A command is ``class u8, command u8, data…`` (device-readable) followed by a
one-byte ack (device-writable).  ``ControlState.handle`` validates a command
against the negotiated features and returns the ack plus what the session
must do; nothing changes on VIRTIO_NET_ERR.  Dispatch is a table keyed by
(class, command).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from trionet.net import features as F

OK = 0
ERR = 1

CLASS_RX = 0
CLASS_MAC = 1
CLASS_VLAN = 2
CLASS_ANNOUNCE = 3
CLASS_MQ = 4
CLASS_GUEST_OFFLOADS = 5

RX_MODES = ("promisc", "allmulti", "alluni", "nomulti", "nouni", "nobcast")
MAC_TABLE_SET = 0
MAC_ADDR_SET = 1
ANNOUNCE_ACK = 0
MQ_VQ_PAIRS_SET = 0
GUEST_OFFLOADS_SET = 0
MAC_TABLE_MAX = 64  # entries per table we keep; more is accepted as "all" (promisc-like)

# offloads the driver may switch at run time with GUEST_OFFLOADS_SET
GUEST_OFFLOAD_BITS = F.mask(F.GUEST_CSUM, F.GUEST_TSO4, F.GUEST_TSO6, F.GUEST_ECN, F.GUEST_UFO)


def write_filter(state: ControlState, f: Any) -> None:
    """Copy the driver's receive filter into a ``struct tn_rxfilter`` the native
    RX path enforces.  Before any RX command the device receives everything
    (promiscuous, as QEMU's device model starts)."""
    modes = state.rx_mode if state.rx_commands else {**state.rx_mode, "promisc": True}
    for mode in RX_MODES:
        setattr(f, mode, int(modes[mode]))
    f.has_mac = int(state.mac is not None)
    if state.mac is not None:
        f.mac = list(state.mac)
    f.alluni = int(modes["alluni"] or state.mac_table_overflow)
    f.allmulti = int(modes["allmulti"] or state.mac_table_overflow)
    f.nuni, f.nmulti = len(state.unicast), len(state.multicast)
    for i, mac in enumerate(state.unicast):
        f.uni[i] = list(mac)
    for i, mac in enumerate(state.multicast):
        f.multi[i] = list(mac)


class CommandError(Exception):
    """Answered VIRTIO_NET_ERR; the device state is unchanged."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a command asks of the session besides the ack."""

    set_pairs: int | None = None
    guest_offloads: int | None = None
    announce_acked: bool = False


@dataclass
class ControlState:
    features: int
    max_pairs: int
    rx_mode: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(RX_MODES, False))
    mac: bytes | None = None
    unicast: list[bytes] = field(default_factory=list)
    multicast: list[bytes] = field(default_factory=list)
    mac_table_overflow: bool = False
    guest_offloads: int | None = None
    pairs_set: int | None = None  # the count the control queue last applied
    rx_commands: int = 0  # RX/MAC-class commands applied (0: device still receives all)
    errors: int = 0

    def handle(self, readable: bytes) -> tuple[int, Outcome]:
        """Apply one command; returns (ack byte, outcome)."""
        try:
            if len(readable) < 2:
                raise CommandError(f"command of {len(readable)} bytes has no class/command")
            cls, cmd, data = readable[0], readable[1], readable[2:]
            handler = _COMMANDS.get((cls, cmd))
            if handler is None:
                raise CommandError(f"unsupported control command class {cls} command {cmd}")
            return OK, handler(self, data)
        except CommandError:
            self.errors += 1
            raise

    def _need(self, bit: int, what: str) -> None:
        if not F.has(self.features, bit):
            raise CommandError(f"{what} without feature {F.names(1 << bit)[0]}")

    # ---- handlers ------------------------------------------------------------

    def _mq_pairs_set(self, data: bytes) -> Outcome:
        self._need(F.MQ, "MQ_VQ_PAIRS_SET")
        if len(data) != 2:
            raise CommandError(f"MQ_VQ_PAIRS_SET with {len(data)} data bytes, expected 2")
        (n,) = struct.unpack("<H", data)
        if not 1 <= n <= self.max_pairs:
            raise CommandError(f"MQ_VQ_PAIRS_SET {n} outside 1..{self.max_pairs}")
        return Outcome(set_pairs=n)

    def _mac_addr_set(self, data: bytes) -> Outcome:
        self._need(F.CTRL_MAC_ADDR, "MAC_ADDR_SET")
        if len(data) != 6:
            raise CommandError(f"MAC_ADDR_SET with {len(data)} bytes, expected 6")
        self.mac = bytes(data)
        self.rx_commands += 1
        return Outcome()

    def _mac_table_set(self, data: bytes) -> Outcome:
        self._need(F.CTRL_RX, "MAC_TABLE_SET")
        tables: list[list[bytes]] = []
        off = 0
        for _ in range(2):
            if len(data) < off + 4:
                raise CommandError("MAC_TABLE_SET truncated before a table's entry count")
            (entries,) = struct.unpack_from("<I", data, off)
            off += 4
            if len(data) < off + 6 * entries:
                raise CommandError(f"MAC_TABLE_SET table of {entries} entries is truncated")
            tables.append([bytes(data[off + 6 * i : off + 6 * i + 6]) for i in range(entries)])
            off += 6 * entries
        if off != len(data):
            raise CommandError(f"MAC_TABLE_SET has {len(data) - off} trailing bytes")
        uni, multi = tables
        self.mac_table_overflow = len(uni) > MAC_TABLE_MAX or len(multi) > MAC_TABLE_MAX
        self.unicast, self.multicast = uni[:MAC_TABLE_MAX], multi[:MAC_TABLE_MAX]
        self.rx_commands += 1
        return Outcome()

    def _announce_ack(self, data: bytes) -> Outcome:
        self._need(F.GUEST_ANNOUNCE, "ANNOUNCE_ACK")
        if data:
            raise CommandError("ANNOUNCE_ACK carries no data")
        return Outcome(announce_acked=True)

    def _guest_offloads_set(self, data: bytes) -> Outcome:
        self._need(F.CTRL_GUEST_OFFLOADS, "GUEST_OFFLOADS_SET")
        if len(data) != 8:
            raise CommandError(f"GUEST_OFFLOADS_SET with {len(data)} bytes, expected 8")
        (offloads,) = struct.unpack("<Q", data)
        if offloads & ~(self.features & GUEST_OFFLOAD_BITS):
            raise CommandError(f"GUEST_OFFLOADS_SET {offloads:#x} asks for unnegotiated offloads")
        self.guest_offloads = offloads
        return Outcome(guest_offloads=offloads)


def _rx_handler(mode: str) -> Callable[[ControlState, bytes], Outcome]:
    extra = mode in ("alluni", "nomulti", "nouni", "nobcast")

    def handle(state: ControlState, data: bytes) -> Outcome:
        state._need(F.CTRL_RX, f"RX {mode}")
        if extra:
            state._need(F.CTRL_RX_EXTRA, f"RX {mode}")
        if len(data) != 1:
            raise CommandError(f"RX {mode} with {len(data)} bytes, expected 1")
        state.rx_mode[mode] = bool(data[0])
        state.rx_commands += 1
        return Outcome()

    return handle


_COMMANDS: dict[tuple[int, int], Callable[[ControlState, bytes], Outcome]] = {
    **{(CLASS_RX, i): _rx_handler(mode) for i, mode in enumerate(RX_MODES)},
    (CLASS_MAC, MAC_TABLE_SET): ControlState._mac_table_set,
    (CLASS_MAC, MAC_ADDR_SET): ControlState._mac_addr_set,
    (CLASS_ANNOUNCE, ANNOUNCE_ACK): ControlState._announce_ack,
    (CLASS_MQ, MQ_VQ_PAIRS_SET): ControlState._mq_pairs_set,
    (CLASS_GUEST_OFFLOADS, GUEST_OFFLOADS_SET): ControlState._guest_offloads_set,
}
