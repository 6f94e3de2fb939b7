"""TCP segments from the guest: their fields and options, sequence number
arithmetic, the pure ACKs of a batch that a later one supersedes, and the
data that arrived past a gap.

Without holding segments past a gap, every segment behind a lost one is
thrown away and the guest sends the whole flight again.  Held, the guest's
one retransmission fills the gap and one ACK covers all that followed
(RFC 9293 §3.10.7.4: segments past RCV.NXT but within the window are kept
for later processing).  Without SACK the guest still learns of one hole per
round trip (NewReno), and after a burst loss it repairs them one
retransmission timeout at a time; with SACK (RFC 2018, when the guest's SYN
permits it) every ACK sent while data is held says which ranges arrived, so
the guest resends only the holes, all in one round trip.  The other way,
the guest's SACK blocks about our data are kept in a ``Scoreboard``, and a
fast retransmit resends only its holes (RFC 6675) instead of everything
after the first.  Sans-IO.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from trionet.backends.user import packets as P

FIN, SYN, RST, ACK = P.TCP_FIN, P.TCP_SYN, P.TCP_RST, P.TCP_ACK
MAX_WSCALE = 14
REASSEMBLY_LIMIT = 1 << 20  # bytes held past a gap per connection, at most
REASSEMBLY_SEGMENTS = 512  # and segments (tiny ones must not cost more than their bytes)
MASK = 0xFFFFFFFF


def seq_lt(a: int, b: int) -> bool:
    return ((a - b) & MASK) > 0x7FFFFFFF


def seq_le(a: int, b: int) -> bool:
    return a == b or seq_lt(a, b)


def seq_diff(a: int, b: int) -> int:
    """``a - b`` in sequence space (both within 2**31 of each other)."""
    d = (a - b) & MASK
    return d - (1 << 32) if d > 0x7FFFFFFF else d


# ---- the segment as the guest sent it ---------------------------------------------


@dataclass(frozen=True, slots=True)
class Segment:
    seq: int
    ack: int
    flags: int
    window: int  # as on the wire, unscaled
    payload: bytes
    mss: int | None = None  # options, read from SYN segments only
    wscale: int | None = None
    sack_ok: bool = False  # SACK-permitted
    sack: tuple[tuple[int, int], ...] = ()  # SACK blocks (left, right), from ACKs

    @property
    def seg_len(self) -> int:
        """Sequence space the segment occupies (SYN and FIN count one)."""
        return len(self.payload) + bool(self.flags & SYN) + bool(self.flags & FIN)


def parse_segment(pkt: P.Packet) -> Segment:
    """The TCP fields of a parsed frame (``packets.parse`` checked lengths)."""
    seg = pkt.l4
    if len(seg) < 20:
        raise P.Drop("short_tcp")
    seq, ack, off, flags, window = struct.unpack_from("!IIBBH", seg, 4)
    hlen = (off >> 4) * 4
    if flags & SYN and flags & (FIN | RST):
        raise P.Drop("tcp_flags")
    if hlen <= 20:
        return Segment(seq, ack, flags, window, pkt.payload)
    mss, wscale, sack_ok, sack = _options(seg[20:hlen])
    if flags & SYN:
        return Segment(seq, ack, flags, window, pkt.payload, mss, wscale, sack_ok)
    return Segment(seq, ack, flags, window, pkt.payload, sack=sack if flags & ACK else ())


def _options(opts: bytes) -> tuple[int | None, int | None, bool, tuple[tuple[int, int], ...]]:
    """MSS, window scale, SACK-permitted (a SYN's) and SACK blocks (an ACK's)
    from a segment's options; others (timestamps) are ignored, and a
    malformed list ends the walk."""
    mss = wscale = None
    sack_ok = False
    sack: tuple[tuple[int, int], ...] = ()
    i = 0
    while i < len(opts):
        kind = opts[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= len(opts) or opts[i + 1] < 2 or i + opts[i + 1] > len(opts):
            break
        size = opts[i + 1]
        if kind == 2 and size == 4:
            mss = struct.unpack_from("!H", opts, i + 2)[0]
        elif kind == 3 and size == 3:
            wscale = min(opts[i + 2], MAX_WSCALE)
        elif kind == 4 and size == 2:
            sack_ok = True
        elif kind == 5 and size in (10, 18, 26, 34):
            edges = struct.unpack_from(f"!{(size - 2) // 4}I", opts, i + 2)
            sack = tuple(zip(edges[::2], edges[1::2], strict=True))
        i += size
    return mss, wscale, sack_ok, sack


def syn_options(mss: int, wscale: int | None, sack: bool = False) -> bytes:
    """Our SYN options: MSS, window scale when offered, SACK-permitted when
    offered (padded with NOP)."""
    out = struct.pack("!BBH", 2, 4, mss)
    if wscale is not None:
        out += struct.pack("!BBBB", 1, 3, 3, wscale)
    if sack:
        out += struct.pack("!BBBB", 1, 1, 4, 2)
    return out


SACK_BLOCKS = 4  # what fits the 40 bytes of options without timestamps


def sack_option(blocks: list[tuple[int, int]]) -> bytes:
    """A SACK option (RFC 2018 §3) for up to ``SACK_BLOCKS`` ranges (left
    edge, right edge), padded with two NOPs to a multiple of four bytes."""
    blocks = blocks[:SACK_BLOCKS]
    out = struct.pack("!BBBB", 1, 1, 5, 2 + 8 * len(blocks))
    for left, right in blocks:
        out += struct.pack("!II", left & MASK, right & MASK)
    return out


# ---- pure ACKs a later one supersedes --------------------------------------------


def superseded_acks(frames: Sequence[bytes]) -> set[int]:
    """Indexes of pure ACKs in one batch of guest frames that a later pure ACK
    of the same connection supersedes: same sequence number, a strictly higher
    acknowledgment, and no other segment of that connection in between.  Only
    the later one needs handling (cumulative ACKs; its window is the newer);
    duplicate ACKs (equal numbers) are all kept for fast retransmit.  Under
    load the guest's ACKs pile up in a batch, and the stack's work per batch
    stays one ACK per connection.  Read from the raw bytes (IPv4 without
    options, IPv6 without extension headers, a 20-byte TCP header); a TCP
    frame of any other shape ends coalescing for the batch."""
    later: dict[bytes, tuple[int, int]] = {}  # connection -> (seq, ack) of its next frame
    out: set[int] = set()
    for i in range(len(frames) - 1, -1, -1):
        f = frames[i]
        if len(f) < 54:
            continue
        if f[12:14] == b"\x08\x00":
            if f[23] != P.IPPROTO_TCP:
                continue
            if f[14] != 0x45:
                later.clear()
                continue
            key, th, pure = f[26:38], 34, f[16:18] == b"\x00\x28"
        elif f[12:14] == b"\x86\xdd" and len(f) >= 74:
            if f[20] != P.IPPROTO_TCP:
                if f[20] in _V6_EXTENSIONS:
                    later.clear()
                continue
            key, th, pure = f[22:58], 54, f[18:20] == b"\x00\x14"
        else:
            continue
        pure = pure and f[th + 12] == 0x50 and f[th + 13] == ACK
        if not pure:
            later.pop(key, None)  # a segment of its own: nothing before it is coalesced
            continue
        seq, ack = struct.unpack_from("!II", f, th + 4)
        nxt = later.get(key)
        if nxt is not None and nxt[0] == seq and seq_lt(ack, nxt[1]):
            out.add(i)
        else:
            later[key] = (seq, ack)
    return out


# IPv6 next-header values that precede a transport header (hop-by-hop,
# routing, fragment, destination options, AH, ESP, mobility)
_V6_EXTENSIONS = frozenset((0, 43, 44, 60, 51, 50, 135))


# ---- data past a gap --------------------------------------------------------------


class Reassembly:
    """Segments past ``rcv_nxt``, by sequence number: at most ``limit`` bytes
    in at most ``max_segments`` segments."""

    def __init__(
        self, limit: int = REASSEMBLY_LIMIT, max_segments: int = REASSEMBLY_SEGMENTS
    ) -> None:
        self.limit = limit
        self.max_segments = max_segments
        self.segments: dict[int, bytes] = {}
        self.bytes = 0
        self.queued = 0  # segments taken in
        self.refused = 0  # segments past the window or the limit
        self.last: int | None = None  # the segment added last (SACK's first block holds it)
        # all the held ranges, merged, as offsets from _anchor (None: to be
        # rebuilt): kept up to date by add, as every out-of-order segment asks
        # for its blocks and every in-order one whether the gap filled
        self._anchor = 0
        self._spans: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.segments)

    def add(self, seq: int, data: bytes, rcv_nxt: int, window: int) -> bool:
        """Hold ``data`` at ``seq`` (past ``rcv_nxt``, within ``window`` bytes
        of it); False when it is not taken."""
        off = seq_diff(seq, rcv_nxt)
        if off <= 0 or off + len(data) > window:
            self.refused += 1
            return False
        old = self.segments.get(seq)
        self.last = seq
        if old is not None and len(old) >= len(data):
            return True  # a duplicate
        grow = len(data) - (len(old) if old is not None else 0)
        if self.bytes + grow > self.limit or (
            old is None and len(self.segments) >= self.max_segments
        ):
            self.refused += 1
            return False
        if not self.segments:
            self._anchor, self._spans = rcv_nxt, []
        self.segments[seq] = data
        self.bytes += grow
        self.queued += 1
        if self._spans is not None:
            start = seq_diff(seq, self._anchor)
            self._insert(start, start + len(data))
        return True

    def _insert(self, a: int, b: int) -> None:
        spans = self._spans
        assert spans is not None
        i = bisect.bisect_left(spans, [a, b])
        if i > 0 and spans[i - 1][1] >= a:
            i -= 1
        j = i
        while j < len(spans) and spans[j][0] <= b:
            a, b = min(a, spans[j][0]), max(b, spans[j][1])
            j += 1
        spans[i:j] = [[a, b]]

    def put_back(self, seq: int, data: bytes) -> None:
        """What the host socket did not take of what ``take`` gave: first next time."""
        self.bytes += len(data) - len(self.segments.get(seq, b""))
        self.segments[seq] = data
        self._spans = None

    def take(self, rcv_nxt: int) -> bytes | None:
        """The held bytes that continue the stream at ``rcv_nxt`` (what is
        already below it cut off), or None; anything wholly below it is dropped."""
        spans = self._spans
        if spans is not None and (not spans or spans[0][0] > seq_diff(rcv_nxt, self._anchor)):
            return None  # all of it lies past a gap still
        self._spans = None
        data = self.segments.pop(rcv_nxt, None)
        if data is not None:
            self.bytes -= len(data)
            return data
        best: bytes | None = None
        for seq in [s for s in self.segments if seq_diff(rcv_nxt, s) >= 0]:
            data = self.segments.pop(seq)
            self.bytes -= len(data)
            rest = data[seq_diff(rcv_nxt, seq) :]
            if rest and (best is None or len(rest) > len(best)):
                best = rest
        return best

    def blocks(self, rcv_nxt: int) -> list[tuple[int, int]]:
        """The held data past ``rcv_nxt`` as SACK blocks (left edge, right
        edge), contiguous and overlapping segments merged: first the block
        holding the segment added last, then the others from the highest
        down (RFC 2018 §4)."""
        spans = self._spans
        if spans is None or (spans and spans[0][0] <= seq_diff(rcv_nxt, self._anchor)):
            # rebuilt; kept only when it holds every segment (none reaches rcv_nxt)
            spans = []
            self._anchor, self._spans = rcv_nxt, spans
            past = True
            for seq, data in self.segments.items():
                start = seq_diff(seq, rcv_nxt)
                if data and start > 0:
                    self._insert(start, start + len(data))
                else:
                    past = False
            if not past:
                self._spans = None
        base = self._anchor
        last = seq_diff(self.last, base) if self.last is not None else -1
        first = [m for m in spans if m[0] <= last < m[1]]
        rest = [m for m in reversed(spans) if not m[0] <= last < m[1]]
        return [((base + a) & MASK, (base + b) & MASK) for a, b in first + rest]

    def clear(self) -> None:
        self.segments.clear()
        self.bytes = 0
        self._spans = None


# ---- what the guest SACKed of ours --------------------------------------------------


class Scoreboard:
    """The ranges of our data above ``snd_una`` that the guest's SACK blocks
    reported received (RFC 6675 §3's scoreboard): sorted, disjoint, not
    touching, all within ``(snd_una, snd_max]``."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []  # (left, right) sequence numbers

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def update(self, blocks: tuple[tuple[int, int], ...], snd_una: int, snd_max: int) -> None:
        """Add the guest's blocks; what lies at or below ``snd_una`` (D-SACK,
        RFC 2883) or past ``snd_max`` (never sent) is not believed.  Ranges
        at or below ``snd_una`` are dropped."""
        span = seq_diff(snd_max, snd_una)
        spans = [(seq_diff(a, snd_una), seq_diff(b, snd_una)) for a, b in self.ranges]
        for left, right in blocks:
            a, b = seq_diff(left, snd_una), seq_diff(right, snd_una)
            if 0 < b <= span and a < b:
                spans.append((max(a, 0), b))
        spans.sort()
        merged: list[list[int]] = []
        for a, b in spans:
            if b <= 0:
                continue
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([max(a, 0), b])
        self.ranges = [((snd_una + a) & MASK, (snd_una + b) & MASK) for a, b in merged]

    def sacked(self, snd_una: int) -> int:
        """Bytes SACKed above ``snd_una``."""
        return sum(seq_diff(b, a) for a, b in self.ranges if seq_lt(snd_una, b))

    def holes(self, start: int, snd_una: int) -> list[tuple[int, int]]:
        """The bytes not SACKed from ``start`` (at or past ``snd_una``) up to
        the highest SACKed one, as (sequence number, length): what a fast
        retransmit resends.  Past the highest SACKed byte nothing is presumed
        lost (RFC 6675 §4's IsLost)."""
        out: list[tuple[int, int]] = []
        at = seq_diff(start, snd_una)
        for left, right in self.ranges:
            a, b = seq_diff(left, snd_una), seq_diff(right, snd_una)
            if at < a:
                out.append(((snd_una + at) & MASK, a - at))
            at = max(at, b)
        return out

    def clear(self) -> None:
        self.ranges.clear()
