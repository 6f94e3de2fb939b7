"""``--metrics`` addresses, parsed without importing prometheus-client (a
trionet started without ``--metrics`` never loads it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"


class MetricsSpecError(ValueError):
    """A ``--metrics`` argument that names no address."""


@dataclass(frozen=True)
class MetricsAddress:
    """Where ``/metrics`` is served: a UNIX socket path, or a TCP host and port."""

    path: Path | None = None
    host: str = DEFAULT_HOST
    port: int = 0

    @classmethod
    def parse(cls, text: str) -> MetricsAddress:
        if text.startswith("unix:"):
            if not text[5:]:
                raise MetricsSpecError("unix: needs a path")
            return cls(path=Path(text[5:]))
        host, sep, port = text.rpartition(":")
        if not sep:
            host, port = DEFAULT_HOST, text
        elif host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not port.isdigit() or not 0 <= int(port) <= 65535:
            raise MetricsSpecError(f"{text!r}: expected HOST:PORT, PORT or unix:PATH")
        return cls(host=host or DEFAULT_HOST, port=int(port))

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"
