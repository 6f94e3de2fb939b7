"""``trionet status --format table``: the status JSON laid out for people."""

from __future__ import annotations

from typing import Any

_COLUMNS = (
    ("pair", "index"),
    ("on", "enabled"),
    ("rx pkts", "rx_packets"),
    ("rx bytes", "rx_bytes"),
    ("tx pkts", "tx_packets"),
    ("tx bytes", "tx_bytes"),
    ("drops", "drops"),
    ("kicks", "kicks"),
    ("irqs", "notifications"),
)


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "-"
    if isinstance(value, int) and value >= 100_000:
        return _si(value)
    return str(value)


def _si(n: int) -> str:
    for unit in ("k", "M", "G", "T"):
        n_f = n / 1000
        if n_f < 1000 or unit == "T":
            return f"{n_f:.1f}{unit}"
        n = int(n_f)
    return str(n)  # pragma: no cover


def _forwards(fw: dict[str, Any] | None) -> list[str]:
    """The inbound forwards' line, and one per port that does not listen."""
    if not fw:
        return []
    down = sum(fw.get("not_listening", {}).values())
    if not fw.get("listening") and not down:
        return []
    out = [f"forwards: {fw.get('listening', 0)} listening, {down} NOT listening (retried)"]
    for p in fw.get("failing", []):
        out.append(
            f"  {p['proto']} {p['address']}:{p['port']} -> guest {p['guest_port']}: "
            f"{p['error']} ({p['failures']} attempts)"
        )
    return out


def _netns(ns: dict[str, Any] | None) -> list[str]:
    """--netns: one line per pair's tap counters."""
    if ns is None:
        return []
    return [
        f"netns pair {i}: tap->stack {_cell(p.get('tx_frames', 0))} frames "
        f"({p.get('tx_errors', 0)} errors), stack->tap {_cell(p.get('rx_frames', 0))} frames "
        f"({p.get('rx_errors', 0)} errors)"
        for i, p in enumerate(ns.get("pairs", []))
    ]


def format_table(st: dict[str, Any]) -> str:
    head = [
        f"vm {st.get('vm') or '-'}",
        f"backend {st.get('backend', '?')}",
        "VMM connected" if st.get("connected") else "no VMM",
        f"pairs {st.get('active_pairs', 0)}/{st.get('max_pairs', 0)} active",
        f"connections {st.get('vmm_connections', st.get('sessions_served', 0))}",
        f"rings broken {st.get('rings_broken', 0)}",
    ]
    if st.get("draining"):
        head.append("DRAINING")
    lines = ["  ".join(head)]
    user = st.get("user")
    if user is not None:
        by = user.get("flows_by_protocol", {})
        flows = "  ".join(f"{p} {by.get(p, 0)}" for p in ("tcp", "udp", "icmp"))
        lines.append(f"flows: {flows}  stack drops {user.get('drops', 0)}")
        lines.extend(_forwards(user.get("forwards")))
    lines.extend(_netns(st.get("netns")))
    rows = [[title for title, _ in _COLUMNS]]
    for p in st.get("pairs", []):
        rows.append([_cell(p.get(key, 0)) for _, key in _COLUMNS])
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
    lines.append("")
    for r in rows:
        lines.append("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    reasons = []
    for p in st.get("pairs", []):
        for reason, n in sorted(p.get("drops_by_reason", {}).items()):
            reasons.append(f"pair {p['index']} {reason} {n}")
    if user is not None:
        for reason, n in sorted(user.get("drops_by_reason", {}).items()):
            reasons.append(f"stack {reason} {n}")
    if reasons:
        lines.append("")
        lines.append("drops: " + ", ".join(reasons))
    return "\n".join(lines)
