"""Multiqueue semantics through the scripted front-end (loop backend, 4 pairs).

Sequences are the ones QEMU 7.2 sends (control queue kept by the VMM, pair
count through SET_VRING_ENABLE) and the ones of a front-end that hands us the
control queue (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET)."""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from tests.fakes.driver import GuestRam
from tests.fakes.frontend import DRIVER_FEATURES, Frontend
from tests.waits import pairs_become, until
from trionet.backends.loop import LoopBackend
from trionet.net import features as F
from trionet.service.server import Service, ServiceConfig, read_status
from trionet.service.session import Session
from trionet.vhost_user import messages as m

PAIRS = 4
CTRL = 2 * PAIRS


def udp_frame(sport: int, dport: int = 9, src: str = "10.0.0.2", dst: str = "10.0.0.1") -> bytes:
    def ip(a: str) -> bytes:
        return bytes(int(x) for x in a.split("."))

    udp = struct.pack("!HHHH", sport, dport, 8 + 4, 0) + b"data"
    iph = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, ip(src), ip(dst))
    eth = bytes.fromhex("525400000001525400000002") + b"\x08\x00"
    return bytes(12) + eth + iph + udp


@pytest.fixture(params=[False, True], ids=["trio", "threads"])
def threads(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


async def send_on_pair(fe: Frontend, s: Session, pair: int, frame: bytes) -> None:
    """Send ``frame`` on ``pair`` and wait until trionet has dealt with it: looped
    into the pair's RX ring, or discarded (counted) because the pair is off."""
    rx = fe.queues[2 * pair]
    rx_before, dropped_before = rx.used_idx(), discarded(s, pair)
    rx.add_rx(2048)
    fe.queues[2 * pair + 1].add_tx(frame)
    fe.kick(2 * pair + 1)
    await until(
        lambda: rx.used_idx() != rx_before or discarded(s, pair) > dropped_before,
        f"pair {pair} to loop or discard a frame",
    )


def discarded(s: Session, pair: int) -> int:
    drops = s.counters[pair].drops
    return drops["tx_ring_disabled"] + drops["tx_pair_inactive"]


def looped(fe: Frontend, pair: int) -> int:
    return len(fe.queues[2 * pair].take_used())


@asynccontextmanager
async def running(tmp_path: Path, **kw: object) -> AsyncIterator[Service]:
    config = ServiceConfig(
        queue_pairs=PAIRS, socket_path=tmp_path / "s.sock", control_socket=tmp_path / "c.sock", **kw
    )  # type: ignore[arg-type]
    service = Service(config, LoopBackend(PAIRS))
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        yield service
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def connected(service: Service, ram: GuestRam) -> AsyncIterator[Frontend]:
    fe = await Frontend.connect(str(service.config.socket_path), ram)
    try:
        yield fe
    finally:
        fe.close()


def session_of(service: Service):  # type: ignore[no-untyped-def]
    assert service.session is not None
    return service.session


async def test_qemu_sequence_boot_ethtool_and_unload(
    tmp_path: Path, ram: GuestRam, threads: bool
) -> None:
    async with running(tmp_path, threads=threads) as svc, connected(svc, ram) as fe:
        await fe.negotiate(DRIVER_FEATURES & ~F.bit(F.CTRL_VQ))
        for i in range(2 * PAIRS):  # QEMU start: vrings 0-1 enabled, the rest disabled
            await fe.setup_vring(i, enable=i < 2)
        await fe.send(m.SetStatus(status=15))
        await fe.sync()
        s = session_of(svc)
        assert s.active_pairs == 1
        await send_on_pair(fe, s, 2, udp_frame(1000))
        assert looped(fe, 2) == 0  # pair 2 carries nothing: TX discarded
        await send_on_pair(fe, s, 0, udp_frame(1001))
        assert looped(fe, 0) == 1
        for i in range(2, 2 * PAIRS):  # driver load with 4 queues
            await fe.send(m.SetVringEnable(index=i, enable=True))
        await fe.sync()
        assert s.active_pairs == 4
        await send_on_pair(fe, s, 3, udp_frame(1002))
        assert looped(fe, 3) == 1
        for i in (7, 6, 5, 4):  # ethtool -L eth0 combined 2
            await fe.send(m.SetVringEnable(index=i, enable=False))
        await fe.sync()
        assert s.active_pairs == 2
        await send_on_pair(fe, s, 3, udp_frame(1003))
        assert looped(fe, 3) == 0
        st = await trio.to_thread.run_sync(read_status, svc.config.control_socket)
        assert st["active_pairs"] == 2 and st["max_pairs"] == 4
        assert [p["enabled"] for p in st["pairs"]] == [True, True, False, False]
        assert st["pairs"][3]["drops_by_reason"]["tx_ring_disabled"] >= 1
        assert st["pairs"][3]["rx_packets"] == 1  # counters kept across the change
        # rmmod: GET_VRING_BASE on every ring, then SET_STATUS 0: back to one pair
        for i in range(2 * PAIRS):
            await fe.call(m.GetVringBase(index=i))
        await fe.send(m.SetStatus(status=0))
        await fe.sync()
        assert s.active_pairs == 1
        causes = [c for _, c in s.active_changes]
        assert any("GET_VRING_BASE on every ring" in c for c in causes)


async def test_control_queue_sets_pairs(tmp_path: Path, ram: GuestRam, threads: bool) -> None:
    async with running(tmp_path, threads=threads) as svc, connected(svc, ram) as fe:
        await fe.negotiate(DRIVER_FEATURES | F.bit(F.CTRL_RX) | F.bit(F.CTRL_MAC_ADDR))
        for i in range(2 * PAIRS):
            await fe.setup_vring(i, enable=True)
        ctrl = await fe.setup_vring(CTRL, size=64, enable=True)
        await fe.sync()
        s = session_of(svc)
        assert s.active_pairs == 1  # handed the control queue: 1 until the driver asks
        await send_on_pair(fe, s, 2, udp_frame(2000))
        assert looped(fe, 2) == 0

        async def command(cmd: bytes) -> int:
            _, ack = ctrl.add_command(cmd)
            fe.kick(CTRL)
            await until(lambda: ctrl.ram.read(ack, 1)[0] != 0xFF, f"the ack of {cmd.hex()}")
            return ctrl.ram.read(ack, 1)[0]

        assert await command(bytes([4, 0]) + struct.pack("<H", 4)) == 0
        await pairs_become(s, 4)
        await send_on_pair(fe, s, 2, udp_frame(2001))
        assert looped(fe, 2) == 1
        # invalid: 0 pairs, more than max, short, unknown class, VLAN (not offered)
        for bad in (
            bytes([4, 0, 0, 0]),
            bytes([4, 0, 5, 0]),
            bytes([4, 0, 1]),
            bytes([9, 9]),
            bytes([2, 0, 1, 0]),
            b"\x04",
        ):
            assert await command(bad) == 1, bad
        assert s.active_pairs == 4
        assert await command(bytes([4, 0]) + struct.pack("<H", 2)) == 0
        await pairs_become(s, 2)
        assert await command(bytes([0, 0, 1])) == 0  # RX PROMISC on
        assert s.control.rx_mode["promisc"] is True
        assert await command(bytes([1, 1]) + bytes.fromhex("525400abcdef")) == 0
        assert s.control.mac == bytes.fromhex("525400abcdef")
        assert (
            await command(bytes([1, 0]) + struct.pack("<I", 1) + bytes(6) + struct.pack("<I", 0))
            == 0
        )
        assert (
            await command(bytes([1, 0]) + struct.pack("<I", 3) + bytes(6)) == 1
        )  # truncated table


async def test_restart_cold_recorded_and_legacy(
    tmp_path: Path, ram: GuestRam, threads: bool
) -> None:
    state = tmp_path / "state.json"
    # cold boot: no state file -> 1 pair, and the count gets recorded
    async with (
        running(tmp_path, state_file=state, threads=threads) as svc,
        connected(svc, ram) as fe,
    ):
        await fe.negotiate(DRIVER_FEATURES & ~F.bit(F.CTRL_VQ))
        for i in range(2 * 3):
            await fe.setup_vring(i, enable=True)
        await fe.send(m.SetStatus(status=15))  # DRIVER_OK: the enables count from here
        await fe.sync()
        assert session_of(svc).active_pairs == 3
    assert json.loads(state.read_text())["active_pairs"] == 3
    # restart finding the recorded count: the first activation restores it
    async with (
        running(tmp_path, state_file=state, threads=threads) as svc,
        connected(svc, ram) as fe,
    ):
        await fe.negotiate(DRIVER_FEATURES & ~F.bit(F.CTRL_VQ))
        await fe.sync()
        s = session_of(svc)
        assert s.active_pairs == 3
        # later resets inside the same VM go back to the cold-boot rule
        await fe.send(m.SetStatus(status=15))
        await fe.send(m.SetStatus(status=0))
        await fe.sync()
        assert s.active_pairs == 1
    # a state file from before the count was recorded: legacy restore, all pairs
    state.write_text(json.dumps({"version": 1}))
    async with (
        running(tmp_path, state_file=state, threads=threads) as svc,
        connected(svc, ram) as fe,
    ):
        await fe.negotiate(DRIVER_FEATURES & ~F.bit(F.CTRL_VQ))
        await fe.sync()
        assert session_of(svc).active_pairs == PAIRS


async def test_restart_with_control_queue_restores_count(
    tmp_path: Path, ram: GuestRam, threads: bool
) -> None:
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"version": 2, "active_pairs": 3}))
    async with (
        running(tmp_path, state_file=state, threads=threads) as svc,
        connected(svc, ram) as fe,
    ):
        await fe.negotiate(DRIVER_FEATURES | F.bit(F.CTRL_RX))
        for i in range(2 * PAIRS):
            await fe.setup_vring(i, enable=True)
        await fe.setup_vring(CTRL, size=64, enable=True)
        await fe.sync()
        s = session_of(svc)
        await pairs_become(s, 3)
        await send_on_pair(fe, s, 2, udp_frame(3000))
        assert looped(fe, 2) == 1
        await send_on_pair(fe, s, 3, udp_frame(3001))
        assert looped(fe, 3) == 0


async def test_enables_replayed_before_driver_ok_keep_restored_count(
    tmp_path: Path, ram: GuestRam, threads: bool
) -> None:
    """QEMU reconnecting to a restarted trionet replays each pair's enables before
    setting up its rings; the restored count must not be undone pair by pair."""
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"version": 2, "active_pairs": 4}))
    async with (
        running(tmp_path, state_file=state, threads=threads) as svc,
        connected(svc, ram) as fe,
    ):
        await fe.negotiate(DRIVER_FEATURES & ~F.bit(F.CTRL_VQ))
        for p in range(PAIRS):
            for i in (2 * p, 2 * p + 1):
                await fe.send(m.SetVringEnable(index=i, enable=True))
            await fe.setup_vring(2 * p, enable=True)
            await fe.setup_vring(2 * p + 1, enable=True)
        await fe.sync()
        s = session_of(svc)
        assert [n for n, _ in s.active_changes] == [4]
        await fe.send(m.SetStatus(status=15))
        await fe.sync()
        assert [n for n, _ in s.active_changes] == [4]  # DRIVER_OK counts 4 again: no change
        assert json.loads(state.read_text())["active_pairs"] == 4


async def test_flows_follow_pair_and_are_rehomed(
    tmp_path: Path, ram: GuestRam, threads: bool
) -> None:
    async with running(tmp_path, threads=threads) as svc, connected(svc, ram) as fe:
        await fe.negotiate(DRIVER_FEATURES & ~F.bit(F.CTRL_VQ))
        for i in range(2 * PAIRS):
            await fe.setup_vring(i, enable=True)
        await fe.send(m.SetStatus(status=15))
        await fe.sync()
        s = session_of(svc)
        frame = udp_frame(4000)
        await send_on_pair(fe, s, 3, frame)
        flow = s.flows.hash_frame(frame, 12)
        reply = udp_frame(9, 4000, src="10.0.0.1", dst="10.0.0.2")
        assert s.flows.hash_frame(reply, 12) == flow  # a reply is the same flow
        assert s.flows.lookup(flow) == 3
        assert s.flows.pair_for(flow, s.active_pairs) == 3
        for i in (7, 6):
            await fe.send(m.SetVringEnable(index=i, enable=False))
        await fe.sync()
        assert s.active_pairs == 3
        assert s.flows.lookup(flow) == flow % 3  # re-homed, not dropped
        # host-side flows never seen before spread over the active pairs
        pairs = {
            s.flows.pair_for(s.flows.hash_frame(udp_frame(5000 + i), 12), 3) for i in range(64)
        }
        assert pairs == {0, 1, 2}
