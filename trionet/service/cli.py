"""``trionet``: the command line of the per-VM service (vhost-user backend conventions)."""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar, cast

import trio

from trionet.backends.loop import MAX_FRAME, MIN_FRAME, LoopBackend
from trionet.backends.user import UserBackend
from trionet.backends.user.config import UserConfigError, add_user_arguments, user_config_from_args
from trionet.netns import namespace
from trionet.netns.frontend import FrontendError, NetnsFrontend
from trionet.netns.link import LinkPlan, make
from trionet.service import logs
from trionet.service.metricsaddr import MetricsAddress, MetricsSpecError
from trionet.service.sandbox import SandboxError
from trionet.service.sandbox_cli import add_sandbox_arguments, sandbox_from_args, sandbox_setup
from trionet.service.server import ConfigError, Service, ServiceConfig, read_status
from trionet.service.session import HostBackend
from trionet.service.statusfmt import format_table
from trionet.service.supervise import DEFAULT_GRACE, RunOptions, run_service

MAX_PAIRS = 16
USER_MTU = 65520  # as passt: large frames are what make a user-mode guest fast
OTHER_MTU = 1500


def _pairs(text: str) -> int:
    n = int(text)
    if not 1 <= n <= MAX_PAIRS:
        raise argparse.ArgumentTypeError(f"must be 1..{MAX_PAIRS}")
    return n


def _metrics(text: str) -> MetricsAddress:
    try:
        return MetricsAddress.parse(text)
    except MetricsSpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _grace(text: str) -> float:
    g = float(text)
    if not 0 <= g <= 3600:
        raise argparse.ArgumentTypeError("must be 0..3600 seconds")
    return g


def _add_operations(p: argparse.ArgumentParser) -> None:
    ops = p.add_argument_group("operations")
    ops.add_argument(
        "--metrics",
        type=_metrics,
        metavar="HOST:PORT|unix:PATH",
        help="serve Prometheus metrics at /metrics (a bare PORT listens on 127.0.0.1)",
    )
    ops.add_argument(
        "--ready-fd",
        type=int,
        metavar="N",
        help="write one line to fd N once the socket listens, then close it "
        "(sd_notify READY=1 is sent too when NOTIFY_SOCKET is set)",
    )
    ops.add_argument(
        "--grace",
        type=_grace,
        default=DEFAULT_GRACE,
        metavar="SECONDS",
        help="on SIGTERM, time to finish in-flight batches before exiting "
        f"(default {DEFAULT_GRACE:g})",
    )
    ops.add_argument("--log-format", choices=("text", "json"), default="text")
    ops.add_argument(
        "--vm-id",
        metavar="NAME",
        help="name on every log line, metric (label vm) and status "
        "(default: the socket file's name without its extension)",
    )


E = TypeVar("E", bound=BaseException)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trionet",
        description="vhost-user virtio-net backend: one VM's network on up to 16 queue pairs.",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket-path", type=Path, help="listen on this UNIX socket path")
    where.add_argument("--fd", type=int, help="serve an already-listening UNIX socket fd")
    where.add_argument("--connect", type=Path, help="connect to a VMM that listens here")
    where.add_argument(
        "--netns",
        metavar="PID|PATH",
        help="serve a network namespace instead of a VM (as pasta does): a tap in the "
        "namespace of PID, or of the namespace file PATH, configured and driven by trionet "
        "itself; default one queue pair",
    )
    p.add_argument(
        "--print-capabilities",
        action="store_true",
        help="print the backend's capabilities as JSON and exit",
    )
    p.add_argument(
        "--backend",
        choices=("user", "tap", "loop"),
        default="user",
        help="host side: the rootless user-mode stack (default), a multi-queue tap (root), "
        "or loop frames back (tests)",
    )
    p.add_argument("--tap", default="trionet0", help="tap device to attach to or create")
    p.add_argument(
        "--netns-ifname",
        default="eth0",
        metavar="NAME",
        help="with --netns: the tap's name in the namespace (default eth0)",
    )
    p.add_argument(
        "--queue-pairs",
        type=_pairs,
        help="queue pairs offered to the guest (1..16, default 16; with --netns, the tap's "
        "queues, default 1)",
    )
    p.add_argument(
        "--loop-generate",
        type=int,
        default=0,
        metavar="SIZE",
        help="loop backend only: also keep each active pair's RX ring full of SIZE-byte "
        "generated frames (a traffic source for receive benchmarks)",
    )
    p.add_argument(
        "--mtu",
        type=int,
        help=f"MTU of the guest link (default {USER_MTU} with --backend user, given to the "
        f"guest by DHCP and RA; {OTHER_MTU} otherwise)",
    )
    p.add_argument("--state-file", type=Path, help="record state here to survive a restart")
    p.add_argument("--control-socket", type=Path, help="serve status JSON on this UNIX socket")
    p.add_argument(
        "--threads",
        action="store_true",
        help="serve each queue pair on its own native worker thread (uses up to N cores)",
    )
    add_sandbox_arguments(p)
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    _add_operations(p)
    add_user_arguments(p)
    return p


def capabilities() -> dict[str, object]:
    return {"type": "net"}


async def _main(args: argparse.Namespace) -> None:
    mtu = args.mtu or (USER_MTU if args.backend == "user" else OTHER_MTU)
    try:
        sandbox = sandbox_from_args(args)
    except SandboxError as exc:
        raise ConfigError(str(exc)) from None
    config = ServiceConfig(
        queue_pairs=args.queue_pairs,
        socket_path=args.socket_path,
        listen_fd=args.fd,
        connect_path=args.connect,
        control_socket=args.control_socket,
        state_file=args.state_file,
        mtu=mtu,
        threads=args.threads,
        vm_id=args.vm_id,
    )
    backend: HostBackend
    if args.backend == "loop":
        backend = LoopBackend(args.queue_pairs, args.loop_generate)
    elif args.backend == "user":
        backend = await _user_backend(args, mtu)
    else:
        from trionet.backends.tap import TapBackend

        backend = TapBackend(args.tap, args.queue_pairs)
    await backend.open()
    if args.netns:
        assert isinstance(backend, UserBackend)
        config.frontend = await _netns_frontend(args, backend)
    config.after_setup = sandbox_setup(sandbox, config, backend)
    try:
        opts = RunOptions(metrics=args.metrics, ready_fd=args.ready_fd, grace=args.grace)
        await run_service(Service(config, backend), opts)
    finally:
        with trio.CancelScope(shield=True):
            await backend.aclose()


async def _user_backend(args: argparse.Namespace, mtu: int) -> UserBackend:
    log = logging.getLogger("trionet")
    try:
        cfg = await user_config_from_args(args, mtu)
    except UserConfigError as exc:
        raise ConfigError(str(exc)) from None
    for family, c in (("IPv4", cfg.v4), ("IPv6", cfg.v6)):
        if c is not None:
            log.info(
                "user stack %s: guest %s/%d, gateway %s, DNS %s",
                family, c.address, c.prefix_len, c.gateway, ", ".join(map(str, c.dns)) or "none",
            )  # fmt: skip
    log.info("user stack: MTU %d, DNS upstreams %s", cfg.mtu, cfg.dns_upstreams or "none")
    return UserBackend(cfg, args.queue_pairs)


async def _netns_frontend(args: argparse.Namespace, backend: UserBackend) -> NetnsFrontend:
    """The tap in the namespace, made and configured from a thread inside it."""
    v4 = backend.cfg.v4
    plan = LinkPlan(
        ifname=args.netns_ifname,
        queues=args.queue_pairs,
        mtu=backend.cfg.mtu,
        address=ipaddress.IPv4Interface(f"{v4.address}/{v4.prefix_len}") if v4 else None,
        gateway=ipaddress.IPv4Address(str(v4.gateway)) if v4 else None,
        mac=backend.cfg.guest_mac,
    )
    try:
        inside = namespace.run_inside
        taps, mac = await trio.to_thread.run_sync(inside, args.netns_fd, lambda: make(plan))
    except OSError as exc:
        raise ConfigError(f"--netns {args.netns}: {exc}") from None
    finally:
        os.close(args.netns_fd)
    # Known from the start: a forward's SYN to a namespace that has not sent a
    # frame yet must not go to the broadcast address (its kernel drops it).
    backend.stack.guest_mac = mac
    logging.getLogger("trionet").info(
        "namespace %s: %s (%s) with %d queue(s), MTU %d%s",
        args.netns, plan.ifname, mac.hex(":"), plan.queues, plan.mtu,
        f", {plan.address} via {plan.gateway}" if plan.address else "",
    )  # fmt: skip
    return NetnsFrontend(taps)


def status_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="trionet status", description="print a running trionet's status"
    )
    p.add_argument("--control-socket", type=Path, required=True)
    p.add_argument(
        "--format", choices=("json", "table"), default="json", help="JSON (default) or a table"
    )
    args = p.parse_args(argv)
    try:
        data = read_status(args.control_socket)
    except OSError as exc:
        print(f"trionet status: {args.control_socket}: {exc}", file=sys.stderr)
        return 1
    if args.format == "table":
        print(format_table(data))
    else:
        print(json.dumps(data, indent=2, sort_keys=True))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["status"]:
        return status_main(argv[1:])
    if "--print-capabilities" in argv:  # the convention: every other argument is ignored
        print(json.dumps(capabilities()))
        return 0
    args = build_parser().parse_args(argv)
    if args.socket_path is None and args.fd is None and args.connect is None and not args.netns:
        print(
            "trionet: one of --socket-path, --fd, --connect or --netns is required",
            file=sys.stderr,
        )
        return 2
    if args.queue_pairs is None:
        args.queue_pairs = 1 if args.netns else MAX_PAIRS
    if args.netns and args.backend != "user":
        print("trionet: --netns serves the namespace with --backend user only", file=sys.stderr)
        return 2
    if args.loop_generate and (
        args.backend != "loop" or not MIN_FRAME <= args.loop_generate <= MAX_FRAME
    ):
        print(
            f"trionet: --loop-generate takes {MIN_FRAME}..{MAX_FRAME} and needs --backend loop",
            file=sys.stderr,
        )
        return 2
    if args.vm_id is None:
        named = args.socket_path or args.connect
        args.vm_id = named.stem if named is not None else ""
    if args.ready_fd is not None and not _is_open(args.ready_fd):
        print(f"trionet: --ready-fd {args.ready_fd} is not an open file", file=sys.stderr)
        return 2
    logs.configure(args.log_level, args.log_format, args.vm_id)
    problem: ConfigError | None = None
    failed: FrontendError | None = None
    if args.netns:
        # before any thread exists: joining a user namespace needs a single thread
        try:
            args.netns_fd = namespace.open_netns(args.netns)
            if namespace.join_owner(args.netns_fd):
                logging.getLogger("trionet").info(
                    "joined the user namespace that owns %s (no CAP_SYS_ADMIN)", args.netns
                )
        except namespace.NetnsError as exc:
            print(f"trionet: {exc}", file=sys.stderr)
            return 2
    try:
        trio.run(_main, args)
    except* ConfigError as group:
        problem = _first(group)
    except* FrontendError as group:
        failed = _first(group)
    except* KeyboardInterrupt:
        pass
    if problem is not None:
        print(f"trionet: {problem}", file=sys.stderr)
        return 2
    if failed is not None:
        print(f"trionet: {failed}", file=sys.stderr)
        return 1
    return 0


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _first(group: BaseExceptionGroup[E]) -> E:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return cast(E, exc)


if __name__ == "__main__":
    sys.exit(main())
