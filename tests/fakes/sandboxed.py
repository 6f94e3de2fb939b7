"""In-process services under the sandbox, for tests that re-run a test module
in a sandboxed child process (``TRIONET_TEST_SANDBOX=1``): the first service
started applies the sandbox to the whole test process, later ones find it
applied."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

from trionet.service.sandbox import Sandbox, SandboxConfig

SANDBOX_ENV = "TRIONET_TEST_SANDBOX"
_sandbox: Sandbox | None = None


def sandbox_for_tests() -> Callable[[], Awaitable[None]] | None:
    """The ``after_setup`` step for a test's ServiceConfig (None unless asked for)."""
    if not os.environ.get(SANDBOX_ENV):
        return None

    async def apply() -> None:
        global _sandbox
        if _sandbox is None:
            _sandbox = Sandbox(SandboxConfig())
        await _sandbox.apply()

    return apply
