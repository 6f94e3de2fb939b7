"""``--metrics``: Prometheus metrics, read from the service at scrape time.

Nothing here runs per packet.  The pair counters (Python ones folded in once
per batch, native ones in each pair's ``struct tn_pair_stats``) are read when
Prometheus scrapes, through the same ``Service.status()`` that ``trionet
status`` prints, by a custom collector.  The exposition text comes from
prometheus-client (``generate_latest``); the HTTP side is a small Trio task
that answers ``GET /metrics`` on a TCP address (loopback by default) or a
UNIX socket (``unix:PATH``): one request per connection, then close.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import socket
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from trionet.service.metricsaddr import MetricsAddress
from trionet.service.server import ConfigError

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
REQUEST_MAX = 16384
REQUEST_TIMEOUT = 10.0
CONCURRENT_MAX = 8

# per-pair counters: (metric name without trionet_pair_, status key, help)
_PAIR_COUNTERS = (
    ("rx_packets", "rx_packets", "frames written into the guest's RX ring"),
    ("tx_packets", "tx_packets", "frames taken from the guest's TX ring"),
    ("rx_bytes", "rx_bytes", "bytes written into the guest's RX ring (virtio-net header excluded)"),
    ("tx_bytes", "tx_bytes", "bytes taken from the guest's TX ring (virtio-net header excluded)"),
    ("batches", "batches", "batches run by the pair's native worker thread"),
)


class ServiceCollector(Collector):
    """One scrape = one ``snapshot()`` (the service's status dict), turned into
    metric families; every sample carries ``vm``."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]], vm: str) -> None:
        self.snapshot = snapshot
        self.vm = vm

    def collect(self) -> Iterable[Metric]:
        return [_with_vm(f, self.vm) for f in families(self.snapshot())]


class _VmLabelled(Collector):
    """Another collector's families, each sample given the ``vm`` label."""

    def __init__(self, inner: Collector, vm: str) -> None:
        self.inner = inner
        self.vm = vm

    def collect(self) -> Iterable[Metric]:
        return [_with_vm(f, self.vm) for f in self.inner.collect()]


def _with_vm(family: Metric, vm: str) -> Metric:
    family.samples = [s._replace(labels={"vm": vm, **s.labels}) for s in family.samples]
    return family


def make_registry(snapshot: Callable[[], dict[str, Any]], vm: str) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(snapshot, vm))
    # process_* (RSS, CPU seconds, fds): what an operator running many of us sizes by
    registry.register(_VmLabelled(ProcessCollector(registry=None), vm))
    return registry


def _version() -> str:
    try:
        return importlib.metadata.version("trionet")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def families(st: dict[str, Any]) -> list[Metric]:
    """The metric families of one status snapshot (see ``Service.status``)."""
    out: list[Metric] = []
    info = GaugeMetricFamily(
        "trionet_info", "trionet version and host backend", labels=["version", "backend"]
    )
    info.add_metric([_version(), str(st.get("backend", ""))], 1)
    out.append(info)
    pairs = st.get("pairs", [])
    for name, key, doc in _PAIR_COUNTERS:
        fam = CounterMetricFamily(f"trionet_pair_{name}", doc, labels=["pair"])
        for p in pairs:
            fam.add_metric([str(p["index"])], p.get(key, 0))
        out.append(fam)
    drops = CounterMetricFamily(
        "trionet_pair_drops", "frames dropped on a pair, by reason", labels=["pair", "reason"]
    )
    for p in pairs:
        for reason, n in sorted(p.get("drops_by_reason", {}).items()):
            drops.add_metric([str(p["index"]), reason], n)
    out.append(drops)
    enabled = GaugeMetricFamily(
        "trionet_pair_enabled", "1 when the pair carries traffic", labels=["pair"]
    )
    for p in pairs:
        enabled.add_metric([str(p["index"])], 1 if p.get("enabled") else 0)
    out.append(enabled)
    for name, key, doc in (
        ("kicks", "kicks", "kick eventfd reads (guest notifications taken)"),
        ("notifications", "notifications", "call eventfd writes (interrupts to the guest)"),
    ):
        fam = CounterMetricFamily(f"trionet_{name}", doc, labels=["pair"])
        for p in pairs:
            fam.add_metric([str(p["index"])], p.get(key, 0))
        out.append(fam)
    out.append(GaugeMetricFamily("trionet_active_pairs", "queue pairs carrying traffic",
                                 value=st.get("active_pairs", 0)))  # fmt: skip
    out.append(GaugeMetricFamily("trionet_max_pairs", "queue pairs offered to the guest",
                                 value=st.get("max_pairs", 0)))  # fmt: skip
    out.append(GaugeMetricFamily("trionet_connected", "1 while a VMM is connected",
                                 value=1 if st.get("connected") else 0))  # fmt: skip
    out.append(CounterMetricFamily("trionet_vmm_connections", "VMM connections accepted or dialled",
                                   value=st.get("vmm_connections", 0)))  # fmt: skip
    out.append(CounterMetricFamily("trionet_ring_broken", "vrings stopped for a guest error",
                                   value=st.get("rings_broken", 0)))  # fmt: skip
    out.append(GaugeMetricFamily("trionet_draining", "1 while draining for shutdown",
                                 value=1 if st.get("draining") else 0))  # fmt: skip
    out.extend(_flow_families(st))
    out.extend(_netns_families(st))
    return out


def _netns_families(st: dict[str, Any]) -> list[Metric]:
    """--netns: the driver loops' tap counters (tx: tap -> stack, rx: stack -> tap)."""
    netns = st.get("netns")
    if netns is None:
        return []
    out: list[Metric] = []
    for name, key, doc in (
        ("frames", "frames", "frames between the namespace's tap and the rings"),
        ("bytes", "bytes", "bytes between the namespace's tap and the rings"),
        ("tap_errors", "errors", "tap reads or writes that failed (the frame dropped)"),
    ):
        fam = CounterMetricFamily(f"trionet_netns_{name}", doc, labels=["pair", "direction"])
        for index, p in enumerate(netns.get("pairs", [])):
            for direction in ("tx", "rx"):
                fam.add_metric([str(index), direction], p.get(f"{direction}_{key}", 0))
        out.append(fam)
    return out


def _flow_families(st: dict[str, Any]) -> list[Metric]:
    flows = GaugeMetricFamily(
        "trionet_flows", "flows the user stack holds, by protocol", labels=["protocol"]
    )
    user = st.get("user")
    if user is not None:
        for proto in ("tcp", "udp", "icmp"):
            flows.add_metric([proto], user.get("flows_by_protocol", {}).get(proto, 0))
    table = st.get("flows") or {}
    steering = GaugeMetricFamily(
        "trionet_flow_table_entries",
        "entries in the pair steering table",
        value=table.get("flows", 0),
    )
    out: list[Metric] = [flows, steering]
    if user is not None:
        udrops = CounterMetricFamily(
            "trionet_user_drops",
            "guest frames the user stack refused, by reason",
            labels=["reason"],
        )
        for reason, n in sorted(user.get("drops_by_reason", {}).items()):
            udrops.add_metric([reason], n)
        out.append(udrops)
        idle = GaugeMetricFamily(
            "trionet_forwards_not_listening",
            "inbound forward ports that could not be bound (retried with backoff)",
            labels=["protocol"],
        )
        for proto, n in sorted(user.get("forwards", {}).get("not_listening", {}).items()):
            idle.add_metric([proto], n)
        out.append(idle)
    return out


# ---- the HTTP side --------------------------------------------------------------


def _response(status: str, body: bytes, content_type: str, head: bool = False) -> bytes:
    header = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    return header if head else header + body


def answer(request: bytes, registry: CollectorRegistry) -> bytes:
    """The whole response to one request head (sans-IO)."""
    line = request.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return _response("400 Bad Request", b"bad request\n", "text/plain")
    method, target = parts[0], parts[1].split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        return _response("405 Method Not Allowed", b"GET /metrics\n", "text/plain")
    if target != "/metrics":
        return _response("404 Not Found", b"see /metrics\n", "text/plain", method == "HEAD")
    return _response("200 OK", generate_latest(registry), CONTENT_TYPE, method == "HEAD")


async def _handle(stream: trio.abc.Stream, registry: CollectorRegistry) -> None:
    buf = b""
    try:
        with trio.move_on_after(REQUEST_TIMEOUT):
            while b"\r\n\r\n" not in buf and b"\n\n" not in buf and len(buf) < REQUEST_MAX:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                buf += chunk
        if buf:
            await stream.send_all(answer(buf, registry))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def _unix_listener(path: Path) -> trio.SocketListener:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(16)
    return trio.SocketListener(sock)


async def serve_metrics(
    where: MetricsAddress,
    registry: CollectorRegistry,
    *,
    task_status: trio.TaskStatus[list[MetricsAddress]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/metrics`` until cancelled; ``started`` with the bound addresses
    (a TCP port 0 becomes the port the kernel chose)."""
    listeners: list[trio.SocketListener]
    try:
        if where.path is not None:
            listeners = [await _unix_listener(where.path)]
        else:
            listeners = await trio.open_tcp_listeners(where.port, host=where.host)
    except OSError as exc:
        raise ConfigError(f"--metrics {where}: {exc.strerror or exc}") from None
    bound = [where] if where.path is not None else [_bound(ls) for ls in listeners]
    for b in bound:
        log.info("metrics: GET /metrics on %s", b)
    try:
        async with trio.open_nursery() as nursery:
            for ls in listeners:
                nursery.start_soon(_accept, ls, registry, nursery)
            task_status.started(bound)
    finally:
        if where.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(where.path)


async def _accept(
    listener: trio.SocketListener, registry: CollectorRegistry, nursery: trio.Nursery
) -> None:
    # a few scrapes at a time: a client holding connections open (each is
    # bounded by REQUEST_TIMEOUT) delays the next accept, it cannot pile them up
    limiter = trio.CapacityLimiter(CONCURRENT_MAX)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            await _handle(stream, registry)
        finally:
            limiter.release_on_behalf_of(stream)

    async with listener:
        while True:
            stream = await listener.accept()
            await limiter.acquire_on_behalf_of(stream)
            nursery.start_soon(handle, stream)


def _bound(listener: trio.SocketListener) -> MetricsAddress:
    host, port = listener.socket.getsockname()[:2]
    return MetricsAddress(host=host, port=port)
