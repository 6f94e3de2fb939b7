"""Log lines for a host running many trionets: ``--vm-id`` on every line,
and ``--log-format json`` for log shippers (one object per line).

A JSON line holds ``time`` (RFC 3339, UTC, milliseconds), ``level``, ``vm``,
``pid``, ``logger``, ``event`` (the message), ``pair`` when the line is about
one queue pair, and ``exc`` with the traceback when there is one.  The pair is
taken from an ``extra={"pair": n}`` or, for the data path's ``"pair %d: ..."``
messages, from the message's first argument.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

TEXT_FORMAT = "%(asctime)s trionet[%(process)d] %(vm_field)s%(levelname)s %(name)s: %(message)s"


class VmFilter(logging.Filter):
    """Stamps every record with the VM id and, when it can tell, the pair."""

    def __init__(self, vm: str) -> None:
        super().__init__()
        self.vm = vm

    def filter(self, record: logging.LogRecord) -> bool:
        record.vm = self.vm
        record.vm_field = f"vm={self.vm} " if self.vm else ""
        if getattr(record, "pair", None) is None:
            record.pair = _pair_of(record)
        return True


def _pair_of(record: logging.LogRecord) -> int | None:
    msg = record.msg
    if isinstance(msg, str) and msg.startswith("pair %d") and isinstance(record.args, tuple):
        first = record.args[0] if record.args else None
        if isinstance(first, int):
            return first
    return None


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        t = time.gmtime(record.created)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"
        out: dict[str, Any] = {
            "time": stamp,
            "level": record.levelname.lower(),
            "vm": getattr(record, "vm", ""),
            "pid": record.process,
            "logger": record.name,
            "event": record.getMessage(),
        }
        pair = getattr(record, "pair", None)
        if pair is not None:
            out["pair"] = pair
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure(level: str, fmt: str, vm: str) -> None:
    """The root handler on stderr: text (the default) or JSON lines, both
    stamped with ``vm``; trionet's own loggers at ``level``, others at WARNING."""
    handler = logging.StreamHandler()
    handler.addFilter(VmFilter(vm))
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("trionet").setLevel(getattr(logging, level.upper()))
