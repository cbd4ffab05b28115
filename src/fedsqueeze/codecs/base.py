"""The codec interface and registry (in the spirit of numcodecs).

A codec turns a dict of named numpy arrays into bytes and back. It has an id, a JSON-safe
config (``get_config`` / ``from_config``), and may keep encoder state (error-feedback memory)
in the :class:`CodecContext` the caller hands it. Codecs never pickle: the header is JSON and the
body is raw bytes whose layout the codec documents.

``encode_tensors`` / ``decode_tensors`` wrap a codec's output in a checked frame
(:mod:`fedsqueeze.codecs.framing`) whose kind is the codec id, so a payload names its own codec.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np

from fedsqueeze.codecs.framing import MAX_META_BYTES, frame, unframe
from fedsqueeze.errors import ConfigError, PayloadError
from fedsqueeze.options import option, parse_options

Tensors = dict[str, np.ndarray]

# dtypes a payload may carry; anything else is rejected on decode
ALLOWED_DTYPES = {
    "float16",
    "float32",
    "float64",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "bool",
}


@dataclass
class CodecContext:
    """What a codec may use beyond the tensors: the round's shared seed and its own state.

    ``state`` is the encoder's memory between rounds (e.g. error-feedback residuals); the caller
    owns it and keeps one per client. ``max_elements`` caps what a decoder may allocate.
    ``expect`` (name -> ``(dtype, shape)``), when a server knows what it must receive, makes every
    tensor table of a payload name only those tensors, each with exactly that dtype and shape,
    before anything is allocated.
    """

    seed: int = 0
    state: dict[str, Any] = field(default_factory=dict)
    max_elements: int | None = None
    expect: dict[str, tuple[str, tuple[int, ...]]] | None = None

    def budget(self, used: int) -> CodecContext:
        """The context for a payload's second table: what is left of the cap after ``used`` elements."""
        left = None if self.max_elements is None else self.max_elements - used
        return CodecContext(max_elements=left, expect=self.expect)


def meta_bound(expect: dict[str, tuple[str, tuple[int, ...]]]) -> int:
    """A cap on the JSON header of a payload holding the ``expect`` tensors: every codec's header is
    a few tables and lists with one entry per tensor, so it grows with their number and names, never
    with their sizes (a 1000-tensor table sent to a 2-tensor server is not parsed).

    Honest headers take ~100-170 B plus 25-80 B per tensor (every codec, measured); the cap allows
    512 B plus about 3x that per tensor. It is kept tight because parsing JSON costs memory: a header of
    empty lists becomes ~24 bytes of Python objects per byte of text, and those bytes must fit the
    decoder's budget even for a head of a few thousand values."""
    per_tensor = sum(2 * (len(name) + len(dt) + 8 * (len(shape) + 1) + 40) for name, (dt, shape) in expect.items())
    return min(MAX_META_BYTES, 512 + per_tensor)


def meta_values_bound(expect: dict[str, tuple[str, tuple[int, ...]]]) -> int:
    """A cap on the JSON values in the header of a payload holding the ``expect`` tensors: honest
    headers hold 6-9 per tensor and ~20 more (every codec, measured); the cap allows 16 per tensor
    (plus the shape's dimensions) and 64."""
    return 64 + sum(16 + len(shape) for _, shape in expect.values())


def expect_tensors(shapes: dict[str, tuple[int, ...]], dtype: Any = "float32") -> dict[str, tuple[str, tuple[int, ...]]]:
    """An ``expect`` table: every named tensor with one dtype."""
    dt = str(np.dtype(dtype))
    return {name: (dt, tuple(int(d) for d in shape)) for name, shape in shapes.items()}


# codecs declare options with the one option system (fedsqueeze.options); the old name stays for them
codec_option = option


@dataclass
class NoCodecOptions:
    """A codec without options."""


def parse_codec_options(codec_cls: type[Codec], given: dict[str, Any]) -> Any:
    """Build ``codec_cls.Options`` from ``given``; unknown names or bad values are a ConfigError."""
    return parse_options(codec_cls.Options, given, f"codec {codec_cls.codec_id!r}")


class Codec(ABC):
    """Base class: subclasses set ``codec_id`` and ``lossless`` and implement encode/decode.

    Options are declared as a dataclass ``Options`` (fields made with
    :func:`fedsqueeze.options.option`, alias ``codec_option``; an optional ``validate()`` raising
    ConfigError) and parsed into ``self.opts``; ``self.config``
    holds them as a JSON-safe dict. ``for_weights`` says whether the codec is meant for model
    weights (the downlink), not only for updates: sparsifiers and 1-bit codecs are not.
    """

    codec_id: ClassVar[str]
    lossless: ClassVar[bool] = True
    for_weights: ClassVar[bool] = True
    Options: ClassVar[type] = NoCodecOptions

    def __init__(self, **config: Any) -> None:
        self.opts = parse_codec_options(type(self), config)
        self.config = asdict(self.opts)

    def get_config(self) -> dict[str, Any]:
        """JSON-safe config; ``get_codec(cfg)`` rebuilds an equal codec."""
        return {"id": self.codec_id, **self.config}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Codec:
        cfg = {k: v for k, v in config.items() if k != "id"}
        return cls(**cfg)

    @abstractmethod
    def encode(self, tensors: Tensors, ctx: CodecContext) -> tuple[dict[str, Any], bytes]:
        """Return ``(meta, body)``: a small JSON-safe header and the coded bytes."""

    @abstractmethod
    def decode(self, meta: dict[str, Any], body: memoryview, ctx: CodecContext) -> Tensors:
        """Invert :meth:`encode`; raise :class:`PayloadError` on anything inconsistent."""

    def check_header(self, meta: dict[str, Any]) -> None:
        """Raise PayloadError if ``meta`` declares coding parameters other than this codec's options.

        A server decodes with the codec it configured (``decode_tensors(..., codec=...)``), so a
        header may not pick a bucket, chunk or fraction of its own. Default: nothing to compare.
        """

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}({args})"


CODECS: dict[str, type[Codec]] = {}


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Class decorator: make a codec available by its id."""
    CODECS[cls.codec_id] = cls
    return cls


def get_codec(spec: str | dict[str, Any] | Codec, **options: Any) -> Codec:
    """A codec from its id (plus options), its config dict, or a codec instance."""
    if isinstance(spec, Codec):
        return spec
    if isinstance(spec, dict):
        options = {**{k: v for k, v in spec.items() if k != "id"}, **options}
        spec = spec.get("id", "")
    if spec not in CODECS:
        raise ConfigError(f"unknown codec {spec!r}; choose one of: {', '.join(sorted(CODECS))}")
    try:
        return CODECS[spec](**options)
    except TypeError as exc:
        raise ConfigError(f"bad options for codec {spec!r}: {exc}") from exc


def encode_tensors(codec: Codec, tensors: Tensors, ctx: CodecContext | None = None, **extra: Any) -> bytes:
    """Encode tensors with ``codec`` into one framed payload; ``extra`` goes into the header."""
    ctx = ctx or CodecContext()
    meta, body = codec.encode(tensors, ctx)
    if extra:
        meta = {**meta, "extra": extra}
    return frame(codec.codec_id, meta, body)


def decode_tensors(
    data: bytes | bytearray | memoryview,
    ctx: CodecContext | None = None,
    *,
    allowed: set[str] | None = None,
    codec: Codec | None = None,
    max_body_bytes: int | None = None,
    max_meta_bytes: int | None = None,
) -> tuple[Tensors, dict[str, Any]]:
    """Decode a framed payload; return ``(tensors, extra)``.

    With ``codec`` (what a server configured for this direction) the payload must name that codec,
    its header must declare that codec's options (:meth:`Codec.check_header`), and it is decoded by
    that instance. Without it, any registered codec (or one of ``allowed``) decodes it.
    """
    ctx = ctx or CodecContext()
    if codec is not None:
        allowed = {codec.codec_id} if allowed is None else allowed & {codec.codec_id}
    if max_meta_bytes is None:
        max_meta_bytes = MAX_META_BYTES if ctx.expect is None else meta_bound(ctx.expect)
    max_values = None if ctx.expect is None else meta_values_bound(ctx.expect)
    kind, meta, body = unframe(
        data, expect_kind=allowed, max_body_bytes=max_body_bytes, max_meta_bytes=max_meta_bytes, max_meta_values=max_values
    )
    if kind not in CODECS:
        raise PayloadError(f"payload names unknown codec {kind!r}; this build knows: {', '.join(sorted(CODECS))}")
    config = meta.get("config", {})
    if not isinstance(config, dict):
        raise PayloadError("payload 'config' header is not an object")
    extra = meta.get("extra", {})
    if not isinstance(extra, dict):
        raise PayloadError("payload 'extra' header is not an object")
    try:
        if codec is None:
            codec = CODECS[kind].from_config(config)
        else:
            codec.check_header(meta)
        tensors = codec.decode(meta, body, ctx)
    except PayloadError:
        raise
    except Exception as exc:
        # Last line of defence: a codec that misses a check must not take the server down.
        # The fuzz tests call codec.decode directly, so such a gap still fails a test.
        raise PayloadError(f"codec {kind!r} cannot decode this payload: {type(exc).__name__}: {str(exc)[:200]}") from exc
    return tensors, extra


# ---- shared helpers for codecs that lay tensors out one after another ---------------------------


def tensor_table(tensors: Tensors) -> list[list[Any]]:
    """JSON-safe description ``[[name, dtype, shape], ...]`` of a dict of arrays."""
    return [[name, str(a.dtype), list(a.shape)] for name, a in tensors.items()]


def check_table(table: Any, ctx: CodecContext) -> list[tuple[str, np.dtype, tuple[int, ...], int]]:
    """Validate a tensor table from a header; return ``(name, dtype, shape, numel)`` rows.

    Rejects unknown dtypes, negative or absurd shapes, duplicate names, totals above
    ``ctx.max_elements`` and, given ``ctx.expect``, any tensor whose name, dtype or shape is not the
    expected one, before anything is allocated.
    """
    if not isinstance(table, list):
        raise PayloadError("tensor table is not a list")
    rows = []
    seen: set[str] = set()
    total = 0
    for row in table:
        if not (isinstance(row, list) and len(row) == 3):
            raise PayloadError("malformed tensor table row")
        name, dtype, shape = row
        if not isinstance(name, str) or name in seen:
            raise PayloadError(f"bad or duplicate tensor name {name!r}")
        if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
            raise PayloadError(f"tensor {name!r} has disallowed dtype {dtype!r}")
        if not (isinstance(shape, list) and len(shape) <= 8 and all(type(s) is int and 0 <= s < 1 << 40 for s in shape)):
            raise PayloadError(f"tensor {name!r} has a bad shape {shape!r}")
        numel = math.prod(shape)
        total += numel
        if ctx.max_elements is not None and total > ctx.max_elements:
            raise PayloadError(f"payload declares {total} elements, over the cap of {ctx.max_elements}")
        if ctx.expect is not None:
            want = ctx.expect.get(name)
            if want is None:
                raise PayloadError(f"payload carries tensor {name!r}, which is not expected")
            if dtype != want[0] or tuple(shape) != tuple(want[1]):
                raise PayloadError(f"tensor {name!r} has dtype {dtype} and shape {tuple(shape)}, expected {want[0]} and {tuple(want[1])}")
        seen.add(name)
        rows.append((name, np.dtype(dtype), tuple(shape), numel))
    return rows


@register_codec
class RawCodec(Codec):
    """Lossless: every tensor's bytes as they are (little endian), dtype and shape preserved.

    Body: the tensors' bytes concatenated in table order. This is FedAvg's 32 bits per float32.
    """

    codec_id = "raw"
    lossless = True

    def encode(self, tensors: Tensors, ctx: CodecContext) -> tuple[dict[str, Any], bytes]:
        parts = [np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes() for a in tensors.values()]
        return {"tensors": tensor_table(tensors)}, b"".join(parts)

    def decode(self, meta: dict[str, Any], body: memoryview, ctx: CodecContext) -> Tensors:
        rows = check_table(meta.get("tensors"), ctx)
        need = sum(numel * dt.itemsize for _, dt, _, numel in rows)
        if need != len(body):
            raise PayloadError(f"raw body is {len(body)} bytes, the table needs {need}")
        out: Tensors = {}
        pos = 0
        for name, dt, shape, numel in rows:
            # one read-only ndarray per tensor straight over the payload's bytes (its base is the
            # payload): no copy, and no per-tensor memoryview, 1-D array and dtype objects, which on
            # a few dozen small tensors (biases, a head) cost more than their values
            out[name] = np.ndarray(shape, dtype=little_endian(dt), buffer=body, offset=pos)
            pos += numel * dt.itemsize
        return out


@functools.cache
def little_endian(dt: np.dtype) -> np.dtype:
    """``dt`` in little-endian byte order (the wire's), made once per dtype: ``newbyteorder``
    builds a new dtype object on every call."""
    return dt.newbyteorder("<")


def all_finite(a: np.ndarray) -> bool:
    """Whether every value of the float array ``a`` is finite, checked in slices of about 1/64 of it
    (at least 128 values): ``np.isfinite(a)`` would allocate a bool per value and, on an array
    viewed unaligned in a payload, a float buffer of up to 8192 values as well, which on a decoder
    of a few hundred values costs more than the values themselves."""
    if a.size == 0:
        return True
    if not a.flags.c_contiguous:
        return bool(np.isfinite(a).all())
    flat = a.reshape(-1)  # a view: ``a`` is contiguous
    step = max(128, -(-flat.size // 64))
    return all(np.isfinite(flat[i : i + step]).all() for i in range(0, flat.size, step))


def split_body(body: memoryview, lengths: Any, count: int | None = None) -> list[memoryview]:
    """Cut ``body`` into consecutive parts of the given lengths, which must cover it exactly
    (and, given ``count``, be exactly that many)."""
    if not (isinstance(lengths, list) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in lengths)):
        raise PayloadError("payload part lengths are malformed")
    if count is not None and len(lengths) != count:
        raise PayloadError(f"payload has {len(lengths)} parts, expected {count}")
    if sum(lengths) != len(body):
        raise PayloadError(f"payload parts add up to {sum(lengths)} bytes, the body has {len(body)}")
    parts, pos = [], 0
    for n in lengths:
        parts.append(body[pos : pos + n])
        pos += n
    return parts


def is_float(a: np.ndarray) -> bool:
    """Whether lossy float codecs apply to ``a`` (float32 and float64; float16 stays exact)."""
    return a.dtype in (np.float32, np.float64)
