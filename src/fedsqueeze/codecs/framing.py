"""Payload framing: every byte string that crosses the wire is one frame.

Layout (little endian)::

    magic   4 bytes  b"FSQZ"
    version u8       FORMAT_VERSION
    kind    u16 length + ASCII   the codec/format id, e.g. "raw"
    meta    u32 length + UTF-8 JSON object (small: names, dtypes, shapes, scalars)
    body    u64 length + bytes
    crc32   u32 over everything before it

Decoding checks every length against what is actually there *before* reading or allocating,
then the checksum, and raises :class:`~fedsqueeze.errors.PayloadError` on any mismatch.
JSON is parsed with the standard library (never evaluated, never unpickled).
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any

from fedsqueeze.errors import PayloadError

MAGIC = b"FSQZ"
FORMAT_VERSION = 1
MAX_META_BYTES = 1 << 20  # a frame's JSON header never needs more than 1 MiB
_FIXED = struct.Struct("<4sBH")


def frame(kind: str, meta: dict[str, Any], body: bytes | bytearray | memoryview) -> bytes:
    """Wrap ``body`` with a header describing it and a checksum."""
    kind_b = kind.encode("ascii")
    meta_b = json.dumps(meta, separators=(",", ":"), allow_nan=False).encode()
    if len(meta_b) > MAX_META_BYTES:
        raise ValueError(f"frame meta is {len(meta_b)} bytes, more than {MAX_META_BYTES}")
    head = b"".join(
        [
            _FIXED.pack(MAGIC, FORMAT_VERSION, len(kind_b)),
            kind_b,
            struct.pack("<I", len(meta_b)),
            meta_b,
            struct.pack("<Q", len(body)),
        ]
    )
    crc = zlib.crc32(body, zlib.crc32(head))
    return b"".join([head, bytes(body), struct.pack("<I", crc)])


def json_values_upper_bound(text: str | bytes) -> int:
    """At least the number of values in the JSON ``text``: one more than its commas and colons (each
    separates two), plus its brackets (an empty array or object holds none). Separators inside
    strings only overcount (and UTF-8 never codes them inside another character)."""
    if isinstance(text, bytes):
        text = text.decode("latin-1")  # one character per byte: the same counts
    return 1 + sum(text.count(c) for c in ",:[{")


def unframe(
    data: bytes | bytearray | memoryview,
    *,
    expect_kind: str | set[str] | None = None,
    max_body_bytes: int | None = None,
    max_meta_bytes: int = MAX_META_BYTES,
    max_meta_values: int | None = None,
) -> tuple[str, dict[str, Any], memoryview]:
    """Validate a frame and return ``(kind, meta, body)``; ``body`` is a view into ``data``.

    ``max_meta_bytes`` (at most :data:`MAX_META_BYTES`) caps the JSON header before it is parsed:
    a receiver that knows how many tensors it expects passes a bound that follows from them.
    ``max_meta_values`` caps the JSON values it may hold (counted from its separators and
    brackets, before parsing): a parsed value costs 30-70 bytes of Python objects, so a short
    header of ``[],[],…`` would otherwise cost ~24x its length.
    """
    view = memoryview(data).cast("B")
    n = len(view)
    if n < _FIXED.size + 4 + 8 + 4:
        raise PayloadError(f"payload too short to be a frame ({n} bytes)")
    magic, version, kind_len = _FIXED.unpack_from(view, 0)
    if magic != MAGIC:
        raise PayloadError(f"bad magic {bytes(magic)!r}: not a fedsqueeze payload")
    if version != FORMAT_VERSION:
        raise PayloadError(f"unsupported payload format version {version} (this build reads {FORMAT_VERSION})")
    pos = _FIXED.size
    if pos + kind_len + 4 > n:
        raise PayloadError("payload truncated in its kind field")
    try:
        kind = bytes(view[pos : pos + kind_len]).decode("ascii")
    except UnicodeDecodeError as exc:
        raise PayloadError("payload kind is not ASCII") from exc
    if expect_kind is not None:  # before the header is parsed: a frame of another kind is never read
        allowed = {expect_kind} if isinstance(expect_kind, str) else expect_kind
        if kind not in allowed:
            raise PayloadError(f"payload kind {kind!r} where {sorted(allowed)} was expected")
    pos += kind_len
    (meta_len,) = struct.unpack_from("<I", view, pos)
    pos += 4
    if meta_len > min(max_meta_bytes, MAX_META_BYTES) or pos + meta_len + 8 > n:
        raise PayloadError(f"payload meta length {meta_len} does not fit the {n}-byte payload")
    # decoded straight from the payload, with no copy of its bytes (frames write ASCII JSON); bad
    # UTF-8 is reported after the checksum, like any other damage to the header
    meta_text, bad_text = _text(view[pos : pos + meta_len])
    if max_meta_values is not None and json_values_upper_bound(meta_text) > max_meta_values:
        raise PayloadError(f"payload meta holds more JSON values than the {max_meta_values} this receiver expects")
    pos += meta_len
    (body_len,) = struct.unpack_from("<Q", view, pos)
    pos += 8
    if pos + body_len + 4 != n:
        raise PayloadError(f"payload body length {body_len} disagrees with the payload size ({n - pos - 4} bytes present)")
    if max_body_bytes is not None and body_len > max_body_bytes:
        raise PayloadError(f"payload body of {body_len} bytes exceeds the cap of {max_body_bytes}")
    (crc,) = struct.unpack_from("<I", view, n - 4)
    if zlib.crc32(view[: n - 4]) != crc:
        raise PayloadError("payload checksum mismatch: the bytes were corrupted")
    try:
        if bad_text is not None:
            raise bad_text
        meta = json.loads(meta_text)
    except (ValueError, RecursionError) as exc:
        # ValueError covers bad JSON, bad UTF-8 and integers past Python's digit limit;
        # RecursionError comes from deeply nested arrays, which a checksum does not stop
        raise PayloadError(f"payload meta is not valid JSON: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(meta, dict):
        raise PayloadError("payload meta is not a JSON object")
    return kind, meta, view[pos : pos + body_len]


def _text(raw: memoryview) -> tuple[str, UnicodeDecodeError | None]:
    """The UTF-8 text of a frame's header, or ``("", error)`` when it is not UTF-8."""
    try:
        return str(raw, "utf-8"), None
    except UnicodeDecodeError as exc:
        return "", exc
