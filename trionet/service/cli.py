"""``trionet``: the command line of the per-VM service (vhost-user backend conventions)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from trionet.backends.loop import MAX_FRAME, MIN_FRAME, LoopBackend
from trionet.backends.user import UserBackend
from trionet.backends.user.config import UserConfigError, add_user_arguments, user_config_from_args
from trionet.service.sandbox import SandboxError
from trionet.service.sandbox_cli import add_sandbox_arguments, sandbox_from_args, sandbox_setup
from trionet.service.server import ConfigError, Service, ServiceConfig, read_status
from trionet.service.session import HostBackend

MAX_PAIRS = 16
USER_MTU = 65520  # as passt: large frames are what make a user-mode guest fast
OTHER_MTU = 1500


def _pairs(text: str) -> int:
    n = int(text)
    if not 1 <= n <= MAX_PAIRS:
        raise argparse.ArgumentTypeError(f"must be 1..{MAX_PAIRS}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trionet",
        description="vhost-user virtio-net backend: one VM's network on up to 16 queue pairs.",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket-path", type=Path, help="listen on this UNIX socket path")
    where.add_argument("--fd", type=int, help="serve an already-listening UNIX socket fd")
    where.add_argument("--connect", type=Path, help="connect to a VMM that listens here")
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
        "--queue-pairs",
        type=_pairs,
        default=MAX_PAIRS,
        help="queue pairs offered to the guest (1..16, default 16)",
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
    config.after_setup = sandbox_setup(sandbox, config, backend)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
            await Service(config, backend).run()
            nursery.cancel_scope.cancel()
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


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            logging.getLogger("trionet").info("%s: shutting down", signal.Signals(signum).name)
            scope.cancel()
            return


def status_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="trionet status", description="print a running trionet's status"
    )
    p.add_argument("--control-socket", type=Path, required=True)
    args = p.parse_args(argv)
    try:
        data = read_status(args.control_socket)
    except OSError as exc:
        print(f"trionet status: {args.control_socket}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2, sort_keys=True))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["status"]:
        return status_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.print_capabilities:
        print(json.dumps(capabilities()))
        return 0
    if args.socket_path is None and args.fd is None and args.connect is None:
        print("trionet: one of --socket-path, --fd or --connect is required", file=sys.stderr)
        return 2
    if args.loop_generate and (
        args.backend != "loop" or not MIN_FRAME <= args.loop_generate <= MAX_FRAME
    ):
        print(
            f"trionet: --loop-generate takes {MIN_FRAME}..{MAX_FRAME} and needs --backend loop",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s trionet[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("trionet").setLevel(getattr(logging, args.log_level.upper()))
    problem: ConfigError | None = None
    try:
        trio.run(_main, args)
    except* ConfigError as group:
        problem = _first(group)
    except* KeyboardInterrupt:
        pass
    if problem is not None:
        print(f"trionet: {problem}", file=sys.stderr)
        return 2
    return 0


def _first(group: BaseExceptionGroup[ConfigError]) -> ConfigError:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    assert isinstance(exc, ConfigError)
    return exc


if __name__ == "__main__":
    sys.exit(main())
