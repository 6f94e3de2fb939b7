"""``--metrics``: scraped over HTTP and parsed with prometheus-client's own parser."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.frontend import Frontend
from tests.unit.test_session_loop import HDR, wait_used
from trionet.service.metrics import answer, families, make_registry, serve_metrics
from trionet.service.metricsaddr import MetricsAddress, MetricsSpecError
from trionet.service.server import Service
from trionet.service.statusfmt import format_table

REQUIRED = (
    "trionet_pair_rx_packets",
    "trionet_pair_tx_packets",
    "trionet_pair_rx_bytes",
    "trionet_pair_tx_bytes",
    "trionet_pair_drops",
    "trionet_active_pairs",
    "trionet_max_pairs",
    "trionet_flows",
    "trionet_ring_broken",
    "trionet_vmm_connections",
    "trionet_kicks",
    "trionet_notifications",
)


async def fetch(stream: trio.abc.Stream, target: str = "/metrics") -> tuple[str, str]:
    """(status line, body) of one HTTP/1.0 GET."""
    await stream.send_all(f"GET {target} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0].decode(), body.decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(got: dict, name: str, **labels: str) -> float:
    return got[(name, tuple(sorted({"vm": "vm7", **labels}.items())))]


async def test_scrape_over_tcp_parses_and_counts(frontend: Frontend, loop_service: Service) -> None:
    loop_service.config.vm_id = "vm7"
    registry = make_registry(loop_service.status, "vm7")
    async with trio.open_nursery() as nursery:
        [bound] = await nursery.start(serve_metrics, MetricsAddress(port=0), registry)
        assert bound.host == "127.0.0.1" and bound.port > 0

        await frontend.negotiate()
        await frontend.setup_pairs(2)
        await frontend.sync()
        rx, tx = frontend.queues[0], frontend.queues[1]
        for _ in range(8):
            rx.add_rx(2048)
        frame = HDR + bytes(range(60))
        for _ in range(3):
            tx.add_tx(frame)
        frontend.kick(1)
        await wait_used(frontend, 1, 3)
        await wait_used(frontend, 0, 3)

        stream = await trio.open_tcp_stream(bound.host, bound.port)
        status, body = await fetch(stream)
        assert status == "HTTP/1.1 200 OK"
        fams = {f.name for f in text_string_to_metric_families(body)}
        assert set(REQUIRED) <= fams
        got = samples(body)
        # every sample carries the vm label, process_* included
        assert all(dict(labels).get("vm") == "vm7" for _, labels in got)
        assert value(got, "trionet_pair_tx_packets_total", pair="0") == 3
        assert value(got, "trionet_pair_rx_packets_total", pair="0") == 3
        assert value(got, "trionet_pair_tx_bytes_total", pair="0") == 3 * 60
        assert value(got, "trionet_pair_rx_packets_total", pair="1") == 0
        assert value(got, "trionet_max_pairs") == 4
        assert value(got, "trionet_active_pairs") >= 1
        assert value(got, "trionet_vmm_connections_total") == 1
        assert value(got, "trionet_ring_broken_total") == 0
        assert value(got, "trionet_kicks_total", pair="0") >= 1
        assert value(got, "trionet_connected") == 1
        assert ("process_resident_memory_bytes", (("vm", "vm7"),)) in got

        # read at scrape time: more traffic, a fresh scrape sees it
        tx.add_tx(frame)
        frontend.kick(1)
        await wait_used(frontend, 1, 1)
        stream = await trio.open_tcp_stream(bound.host, bound.port)
        _, body = await fetch(stream)
        assert value(samples(body), "trionet_pair_tx_packets_total", pair="0") == 4
        nursery.cancel_scope.cancel()


async def test_unix_socket_and_errors(tmp_path: Path, loop_service: Service) -> None:
    path = tmp_path / "metrics.sock"
    registry = make_registry(loop_service.status, "")
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_metrics, MetricsAddress.parse(f"unix:{path}"), registry)
        for target, want in (("/metrics", "200"), ("/", "404"), ("/metrics?x=1", "200")):
            stream = await trio.open_unix_socket(str(path))
            status, body = await fetch(stream, target)
            assert status.split()[1] == want
        got = samples(body)
        assert got[("trionet_max_pairs", (("vm", ""),))] == 4
        assert got[("trionet_connected", (("vm", ""),))] == 0
        nursery.cancel_scope.cancel()
    assert not path.exists()  # removed on exit


async def test_answer_is_sans_io(loop_service: Service) -> None:
    registry = make_registry(loop_service.status, "a")
    assert answer(b"POST /metrics HTTP/1.1\r\n\r\n", registry).startswith(b"HTTP/1.1 405")
    assert answer(b"garbage\r\n\r\n", registry).startswith(b"HTTP/1.1 400")
    head = answer(b"HEAD /metrics HTTP/1.1\r\n\r\n", registry)
    assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("9100", MetricsAddress(host="127.0.0.1", port=9100)),
        ("0.0.0.0:9100", MetricsAddress(host="0.0.0.0", port=9100)),
        ("[::1]:9100", MetricsAddress(host="::1", port=9100)),
        ("unix:/run/x.sock", MetricsAddress(path=Path("/run/x.sock"))),
    ],
)
def test_metrics_address(text: str, want: MetricsAddress) -> None:
    assert MetricsAddress.parse(text) == want


@pytest.mark.parametrize("text", ["", "unix:", "host:", "host:99999", "a:b"])
def test_metrics_address_refused(text: str) -> None:
    with pytest.raises(MetricsSpecError):
        MetricsAddress.parse(text)


async def test_status_table(frontend: Frontend, loop_service: Service) -> None:
    await frontend.negotiate()
    await frontend.setup_pairs(1)
    await frontend.sync()
    table = format_table(loop_service.status())
    lines = table.splitlines()
    assert "VMM connected" in lines[0] and "pairs 1/4 active" in lines[0]
    header = next(line for line in lines if line.lstrip().startswith("pair"))
    assert header.split()[:3] == ["pair", "on", "rx"]
    rows = [line.split() for line in lines if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["0", "1", "2", "3"]


def test_a_namespace_services_tap_counters_are_exported() -> None:
    st = {
        "pairs": [],
        "netns": {
            "pairs": [
                {"tx_frames": 5, "tx_bytes": 500, "tx_errors": 1, "rx_frames": 7,
                 "rx_bytes": 700, "rx_errors": 2, "kicks": 3, "wakeups": 4},
                {"tx_frames": 9, "tx_bytes": 900, "tx_errors": 0, "rx_frames": 0,
                 "rx_bytes": 0, "rx_errors": 0, "kicks": 0, "wakeups": 0},
            ]
        },
    }  # fmt: skip
    got = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in families(st)
        for s in fam.samples
    }
    assert got[("trionet_netns_frames_total", (("direction", "tx"), ("pair", "0")))] == 5
    assert got[("trionet_netns_bytes_total", (("direction", "rx"), ("pair", "0")))] == 700
    assert got[("trionet_netns_tap_errors_total", (("direction", "rx"), ("pair", "0")))] == 2
    assert got[("trionet_netns_frames_total", (("direction", "tx"), ("pair", "1")))] == 9
    # a VM's service has no such families
    assert not [f for f in families({"pairs": []}) if f.name.startswith("trionet_netns")]


def test_the_table_shows_a_namespaces_tap_counters() -> None:
    pair = {"tx_frames": 1_234_567, "tx_errors": 2, "rx_frames": 89, "rx_errors": 0}
    table = format_table({"pairs": [], "netns": {"pairs": [pair]}})
    assert "netns pair 0: tap->stack 1.2M frames (2 errors), stack->tap 89 frames" in table
    assert "netns" not in format_table({"pairs": []})
