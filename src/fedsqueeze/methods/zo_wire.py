"""The compact frame of the zeroth-order methods' tiny messages, and the varints inside it.

A DeComFL uplink carries a handful of float32 scalars (20 bytes at K = 1, P = 5); the general
frame (:mod:`fedsqueeze.codecs.framing`: magic, kind string, JSON meta, u64 body length, CRC)
costs more than that by itself. Everything else such a message could say is known to both ends
(the run seed gives every step seed, the run config gives K and P), so the compact frame says
only what is not::

    tag     u8      (kind << 4) | COMPACT_VERSION    which message and which layout version
    round   varint  the round the message is for (checked by the receiver)
    fields  varints message-specific counts and indices (see each method's wire module)
    body    bytes   fixed-width values (float32 scalars, packed sign bits, ...)
    crc32   u32     over everything before it (little endian)

So a message costs its information content + 1 (tag) + 1–3 (round) + a few varints + 4 (CRC).
A receiver knows which kind it expects and how long the body must be, checks the CRC and the
tag before reading anything else, caps every varint at 9 bytes (63 bits), and never allocates
from a length it read: lengths are compared with what the configured method expects.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Sequence

from fedsqueeze.errors import PayloadError

COMPACT_VERSION = 1
CRC = struct.Struct("<I")
# the kinds of compact frames (4 bits each); a receiver passes the one it expects
KINDS = {
    "decomfl-up": 1,
    "decomfl-down": 2,
    "fedkseed-up": 3,
    "fedkseed-down": 4,
    "feedsign-up": 5,
    "feedsign-down": 6,
}
MAX_VARINT_BYTES = 9  # 63 bits: every count, index and round fits


def varint(value: int) -> bytes:
    """LEB128: 7 bits per byte, low bits first, high bit = more bytes follow."""
    if value < 0 or value >= 1 << 63:
        raise ValueError(f"varint out of range: {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def varints(values: Iterable[int]) -> bytes:
    return b"".join(varint(v) for v in values)


class Reader:
    """Reads varints and fixed-size byte runs from a checked frame's content, raising PayloadError."""

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.pos = 0

    def varint(self, limit: int) -> int:
        """The next varint; PayloadError if it is malformed or above ``limit``."""
        value, shift = 0, 0
        for _ in range(MAX_VARINT_BYTES):
            if self.pos >= len(self.data):
                raise PayloadError("message truncated inside a varint")
            byte = self.data[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                if value > limit:
                    raise PayloadError(f"message field {value} is over its bound {limit}")
                return value
            shift += 7
        raise PayloadError("message varint is longer than 9 bytes")

    def take(self, size: int) -> memoryview:
        """The next ``size`` bytes (``size`` comes from the receiver's expectation, never the wire)."""
        if self.pos + size > len(self.data):
            raise PayloadError(f"message truncated: {size} bytes needed, {len(self.data) - self.pos} left")
        out = self.data[self.pos : self.pos + size]
        self.pos += size
        return out

    def rest(self) -> int:
        return len(self.data) - self.pos

    def end(self) -> None:
        if self.pos != len(self.data):
            raise PayloadError(f"message has {len(self.data) - self.pos} trailing bytes")


def compact_frame(kind: str, round_: int, fields: Sequence[int], body: bytes) -> bytes:
    """One compact frame: tag, round, ``fields`` as varints, ``body``, CRC-32."""
    content = bytes([KINDS[kind] << 4 | COMPACT_VERSION]) + varint(round_) + varints(fields) + body
    return content + CRC.pack(zlib.crc32(content))


def compact_unframe(data: bytes | bytearray | memoryview, kind: str, round_: int) -> Reader:
    """Check a compact frame's CRC, kind, version and round; return a Reader positioned after the round."""
    view = memoryview(data).cast("B")
    if len(view) < 1 + 1 + CRC.size:
        raise PayloadError(f"message too short ({len(view)} bytes)")
    content = view[: len(view) - CRC.size]
    if zlib.crc32(content) != CRC.unpack_from(view, len(view) - CRC.size)[0]:
        raise PayloadError("message checksum mismatch: the bytes were corrupted")
    tag = content[0]
    if tag & 0x0F != COMPACT_VERSION:
        raise PayloadError(f"unsupported compact message version {tag & 0x0F} (this build reads {COMPACT_VERSION})")
    if tag >> 4 != KINDS[kind]:
        raise PayloadError(f"message kind {tag >> 4} where {kind!r} ({KINDS[kind]}) was expected")
    reader = Reader(content)
    reader.pos = 1
    got = reader.varint(1 << 62)
    if got != round_:
        raise PayloadError(f"message is for round {got}, expected {round_}")
    return reader


def encode_runs(rounds: Sequence[int], current: int) -> list[int]:
    """Increasing record rounds below ``current`` as varint fields: ``[runs, (gap, length)…]``.

    Runs of consecutive rounds, newest first; each gap counts the rounds skipped back from where
    the previous run (or ``current``) started. The usual case, every round since the client last
    took part, is one run: 3 small varints whatever the number of rounds.
    """
    runs: list[tuple[int, int]] = []  # (first, last) of each run, increasing
    for r in rounds:
        if runs and r == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], r)
        else:
            runs.append((r, r))
    fields = [len(runs)]
    top = current
    for first, last in reversed(runs):
        fields += [top - last - 1, last - first + 1]
        top = first
    return fields


def decode_runs(reader: Reader, current: int, max_records: int) -> list[int]:
    """The increasing record rounds of :func:`encode_runs`; at most ``max_records``, all in [1, current)."""
    count = reader.varint(max_records)
    out: list[int] = []
    top = current
    for _ in range(count):
        gap = reader.varint(current)
        length = reader.varint(max_records - len(out))
        last = top - gap - 1
        first = last - length + 1
        if length < 1 or first < 1:
            raise PayloadError("message has a malformed record list")
        out[:0] = range(first, last + 1)
        top = first
    return out
