"""The sandbox's command line (``--user``, ``--group``, ``--no-sandbox``) and
the step run once set-up is done (see :mod:`trionet.service.sandbox`)."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from trionet.service.sandbox import Sandbox, SandboxConfig, SandboxError
from trionet.service.server import ConfigError, ServiceConfig

log = logging.getLogger("trionet.service.sandbox")

SANDBOX_HELP = """\
Sandbox (on unless --no-sandbox): once the sockets are bound, the tap opened
and the host's view read, trionet drops every capability (effective,
permitted, inheritable, ambient and, as root, bounding), sets no_new_privs and
installs a seccomp allow-list of the syscalls it uses from then on (anything
else fails with EPERM). Started as root with --user, it first switches to that
user and group (supplementary groups: just that group); the sockets it bound
are handed to that user. A tap trionet created becomes owned by the user it
runs as and is deleted by the kernel when trionet exits. The --state-file
directory must be writable by that user, and a --connect socket reachable."""


def add_sandbox_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sandbox", SANDBOX_HELP)
    g.add_argument(
        "--user",
        metavar="NAME",
        help="after set-up, run as this user (name or uid; needs root to start)",
    )
    g.add_argument(
        "--group",
        metavar="NAME",
        help="with --user: run as this group (default: the user's primary group)",
    )
    g.add_argument(
        "--no-sandbox",
        action="store_true",
        help="keep privileges, no seccomp filter (debugging only)",
    )


def sandbox_from_args(args: argparse.Namespace) -> Sandbox:
    if args.no_sandbox and (args.user or args.group):
        raise SandboxError("--user and --group need the sandbox (drop --no-sandbox)")
    return Sandbox(SandboxConfig(enabled=not args.no_sandbox, user=args.user, group=args.group))


def sandbox_setup(
    sandbox: Sandbox, config: ServiceConfig, backend: Any
) -> Callable[[], Awaitable[None]]:
    """The ``after_setup`` step: hand what was set up to ``--user``, then apply."""

    async def setup() -> None:
        who = sandbox.identity
        try:
            release = getattr(backend, "release_to", None)
            if sandbox.cfg.enabled and release is not None:
                # a tap trionet created must go when it exits: deleting it then
                # would need the CAP_NET_ADMIN about to be dropped
                release(*((who.uid, who.gid) if who else (os.geteuid(), os.getegid())))
            if who is not None:
                for path in (config.socket_path, config.control_socket):
                    if path is not None:
                        os.chown(path, who.uid, who.gid)
            await sandbox.apply()
        except (SandboxError, OSError) as exc:
            raise ConfigError(f"sandbox: {exc}") from None
        if sandbox.applied and config.state_file is not None:
            _check_state_dir(config.state_file)

    return setup


def _check_state_dir(path: Path) -> None:
    directory = path.parent
    if not os.access(directory, os.W_OK | os.X_OK):
        log.warning(
            "state file directory %s is not writable by uid %d: the state file will not be kept",
            directory,
            os.getuid(),
        )
