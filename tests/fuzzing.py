"""A generic fuzzer for payload decoders: plug any decoder in with one call.

``fuzz_decoder(name, decode, payload)`` feeds ``decode`` hypothesis-chosen mutations of a valid
``payload`` and fails if anything but :class:`PayloadError` escapes. Mutations come in two kinds:

- *byte level*: truncate, extend, flip, insert, overwrite, replace with noise. Most of these die at
  the frame's checksum, which is right, but they also probe the length fields.
- *frame aware*: unframe the valid payload, damage the kind, the JSON meta (any value anywhere,
  replaced by a hostile one; keys dropped or added; non-JSON and deeply nested text) or the body,
  then re-frame it **with a correct checksum**, so the decoder behind the checksum is exercised.

``fuzz_codec(codec_id, tensors)`` does this for a registered codec, both through
``decode_tensors`` and through the codec's own ``decode`` (strict: no safety net), with the element
cap a server would use. Counters record how many payloads were tried and how many were rejected.

With ``max_peak`` (bytes), every decode also runs under ``tracemalloc`` (numpy's allocations
included) and fails if its peak allocation exceeds it; ``PEAK`` keeps each decoder's largest peak.
The server-side ``decode_update`` tests set it to :func:`decode_budget`: 2 × the float32 size of
what the method legitimately carries (the target of issue 15; benchmarks/hostile_payloads.py sends
10,000 payloads per decoder against the same target).
"""

from __future__ import annotations

import json
import os
import struct
import tracemalloc
import zlib
from collections import Counter
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsqueeze.codecs import CodecContext, decode_tensors, encode_tensors, get_codec
from fedsqueeze.codecs.framing import FORMAT_VERSION, MAGIC, unframe
from fedsqueeze.errors import PayloadError

TRIED: Counter[str] = Counter()  # malformed payloads fed to each decoder
REJECTED: Counter[str] = Counter()  # of those, how many raised PayloadError (the rest decoded fine)
PEAK: Counter[str] = Counter()  # the largest traced allocation of one decode, per decoder with a max_peak
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "250"))  # per decoder and mode; raise it for a longer hunt
HEADER_ALLOWANCE = 64 << 10  # parsing a frame's JSON header and wording an error: a fixed cost, whatever the model


def decode_budget(values: int) -> int:
    """The peak-memory target of a decoder that legitimately carries ``values`` numbers: 2 × their
    float32 size, plus the fixed header allowance (a few dozen numbers' budget cannot parse any header)."""
    return 2 * 4 * values + HEADER_ALLOWANCE


HOSTILE_VALUES: list[Any] = [
    None,
    True,
    False,
    -1,
    0,
    1,
    7,
    2**31,
    2**32 + 1,
    2**40,
    2**62,
    2**64 + 5,
    -(2**63),
    10**30,
    0.5,
    -1e308,
    1e308,
    "",
    "float32",
    "float64",
    "object",
    "<f4",
    "x" * 300,
    [],
    [0],
    [-1],
    [1, -1],
    [2**40, 2**40],
    [2**20] * 9,
    [[1]],
    [None],
    {},
    {"a": 1},
    {"__array__": 0},
    {"__dict__": []},
]
RAW_META_TEXT: list[bytes] = [
    b"",
    b"{",
    b"[]",
    b"null",
    b"123",
    b'"s"',
    b"\xff\xfe\x00",
    b'{"a": NaN}',
    b'{"a": Infinity}',
    b"[" * 100_000 + b"]" * 100_000,
    b'{"t": ' + b"9" * 5000 + b"}",
    b'{"a":1,"a":2}',
]


def reframe(kind: bytes, meta: bytes, body: bytes, version: int = FORMAT_VERSION, magic: bytes = MAGIC) -> bytes:
    """A frame with arbitrary fields and a *correct* checksum (unlike ``frame``, which refuses bad input)."""
    head = b"".join(
        [
            struct.pack("<4sBH", magic, version & 0xFF, len(kind) & 0xFFFF),
            kind,
            struct.pack("<I", len(meta)),
            meta,
            struct.pack("<Q", len(body)),
        ]
    )
    return head + body + struct.pack("<I", zlib.crc32(body, zlib.crc32(head)))


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every position in a JSON value, as a tuple of keys/indices."""
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


def _replace(node: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    node = dict(node) if isinstance(node, dict) else list(node)
    node[path[0]] = _replace(node[path[0]], path[1:], value)
    return node


def _delete(node: Any, path: tuple) -> Any:
    if len(path) == 1:
        node = dict(node) if isinstance(node, dict) else list(node)
        del node[path[0]]
        return node
    node = dict(node) if isinstance(node, dict) else list(node)
    node[path[0]] = _delete(node[path[0]], path[1:])
    return node


@st.composite
def byte_mutations(draw: st.DrawFn, payload: bytes) -> bytes:
    """Damage ``payload`` as raw bytes."""
    n = len(payload)
    how = draw(st.sampled_from(["truncate", "extend", "flip", "insert", "overwrite", "noise", "empty"]))
    if how == "truncate":
        return payload[: draw(st.integers(0, max(n - 1, 0)))]
    if how == "extend":
        return payload + draw(st.binary(min_size=1, max_size=64))
    if how == "flip" and n:
        buf = bytearray(payload)
        for pos in draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=8)):
            buf[pos] ^= draw(st.integers(1, 255))
        return bytes(buf)
    if how == "insert":
        pos = draw(st.integers(0, n))
        return payload[:pos] + draw(st.binary(min_size=1, max_size=16)) + payload[pos:]
    if how == "overwrite" and n:
        pos = draw(st.integers(0, n - 1))
        chunk = draw(st.binary(min_size=1, max_size=16))
        return payload[:pos] + chunk + payload[pos + len(chunk) :]
    if how == "empty":
        return b""
    return draw(st.binary(min_size=0, max_size=256))


@st.composite
def frame_mutations(draw: st.DrawFn, payload: bytes) -> bytes:
    """Damage one field of a valid frame, then re-frame it with a valid checksum."""
    kind_s, meta, body = unframe(payload)
    kind, body = kind_s.encode(), bytes(body)
    meta_b = json.dumps(meta).encode()
    version, magic = FORMAT_VERSION, MAGIC
    what = draw(
        st.sampled_from(
            ["meta_value", "meta_value", "meta_value", "meta_drop", "meta_add", "meta_text", "body", "body", "kind", "version", "magic"]
        )
    )
    if what == "meta_value":
        path = draw(st.sampled_from(_paths(meta)))
        value = draw(
            st.one_of(
                st.sampled_from(HOSTILE_VALUES),
                st.integers(),
                st.floats(allow_nan=False),
                st.text(max_size=20),
                st.lists(st.integers(-4, 2**41), max_size=10),
            )
        )
        meta_b = json.dumps(_replace(meta, path, value)).encode()
    elif what == "meta_drop":
        paths = [p for p in _paths(meta) if p]
        if paths:
            meta_b = json.dumps(_delete(meta, draw(st.sampled_from(paths)))).encode()
    elif what == "meta_add":
        key = draw(st.sampled_from(["config", "extra", "tensors", "version", "arrays", "skeleton", "x"]))
        meta_b = json.dumps({**meta, key: draw(st.sampled_from(HOSTILE_VALUES))}).encode()
    elif what == "meta_text":
        meta_b = draw(st.sampled_from(RAW_META_TEXT))
    elif what == "body":
        body = draw(byte_mutations(body)) if body else draw(st.binary(min_size=1, max_size=64))
    elif what == "kind":
        kind = draw(st.sampled_from([b"", b"nosuch", b"\xff\xfe", b"tree", b"raw", b"k" * 300]))
    elif what == "version":
        version = draw(st.sampled_from([0, FORMAT_VERSION + 1, 255]))
    else:
        magic = draw(st.binary(min_size=4, max_size=4))
    return reframe(kind, meta_b, body, version, magic)


def traced_peak(fn: Callable[[], Any]) -> tuple[int, Exception | None]:
    """Bytes ``fn()`` allocated at its peak above what was allocated before, and the exception it
    raised, if any. Tracing is on only while ``fn`` runs (it would slow hypothesis' own work down)."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    err: Exception | None = None
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - returned to the caller, which re-raises it
        err = exc
    peak = tracemalloc.get_traced_memory()[1] - base
    if started:
        tracemalloc.stop()
    return peak, err


def fuzz_decoder(name: str, decode: Callable[[bytes], Any], payload: bytes, examples: int = EXAMPLES, max_peak: int | None = None) -> None:
    """Assert that no mutation of ``payload`` makes ``decode`` raise anything but PayloadError
    (nor, with ``max_peak``, allocate more than ``max_peak`` bytes at once)."""
    decode(payload)  # the untouched payload must decode: otherwise the fuzzing proves nothing; warms caches

    def run(data: bytes) -> None:
        if max_peak is None:
            decode(data)
            return
        peak, err = traced_peak(lambda: decode(data))
        PEAK[name] = max(PEAK[name], peak)
        if peak > max_peak:
            raise AssertionError(f"{name}: decoding {data[:60]!r}... allocated {peak} bytes at its peak, over {max_peak}")
        if err is not None:
            raise err

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.one_of(byte_mutations(payload), frame_mutations(payload)))
    def check(mutated: bytes) -> None:
        if mutated == payload:
            return
        TRIED[name] += 1
        try:
            run(mutated)
        except PayloadError:
            REJECTED[name] += 1
        except AssertionError:
            raise
        except Exception as exc:  # noqa: BLE001 - this is what the fuzzer looks for
            raise AssertionError(f"{name}: {type(exc).__name__} escaped instead of PayloadError on {mutated[:80]!r}...: {exc}") from exc

    run(payload)  # the valid payload is held to the same bound
    check()


def fuzz_codec(codec_id: str, tensors: dict, options: dict | None = None, examples: int = EXAMPLES, seed: int = 7) -> None:
    """Fuzz a registered codec's decoder: strictly (its own ``decode``) and through ``decode_tensors``."""
    codec = get_codec(codec_id, **(options or {}))
    cap = sum(int(a.size) for a in tensors.values())
    payload = encode_tensors(codec, tensors, CodecContext(seed=seed), n=3)

    def strict(data: bytes) -> Any:
        kind, meta, body = unframe(data)
        config = meta.get("config", {})
        if kind != codec_id or not isinstance(config, dict):
            raise PayloadError("not this codec's frame")
        try:  # building the codec from a hostile config is guarded by decode_tensors; decode itself is not
            inner = type(codec).from_config(config)
        except Exception as exc:  # noqa: BLE001
            raise PayloadError(str(exc)) from exc
        return inner.decode(meta, body, CodecContext(seed=seed, max_elements=cap))

    fuzz_decoder(f"{codec_id}.decode", strict, payload, examples)
    fuzz_decoder(f"decode_tensors[{codec_id}]", lambda d: decode_tensors(d, CodecContext(seed=seed, max_elements=cap)), payload, examples)
