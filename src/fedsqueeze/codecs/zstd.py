"""Lossless coding with Zstandard, and the helpers other codecs use for their lossless parts.

``zstd`` codec body: one Zstandard frame holding every tensor's little-endian bytes in table order.
With ``shuffle`` (default) each tensor's bytes are transposed by byte position first (byte ``j`` of
every element, then byte ``j+1``...), the trick of blosc: exponent bytes of floats line up and
compress, mantissa noise stays together. Every dtype round-trips exactly, int64 included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import zstandard

from fedsqueeze.codecs.base import (
    Codec,
    CodecContext,
    Tensors,
    check_table,
    codec_option,
    register_codec,
    tensor_table,
)
from fedsqueeze.errors import ConfigError, PayloadError


def zstd_compress(data: bytes | bytearray | memoryview, level: int = 3) -> bytes:
    """One Zstandard frame (with its content size written, which the decoder checks)."""
    return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(data)


def zstd_decompress(data: bytes | memoryview, size: int) -> bytes:
    """Inverse of :func:`zstd_compress` for a frame that must hold exactly ``size`` bytes."""
    data = bytes(data)
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise PayloadError(f"zstd frame header is invalid: {exc}") from exc
    if declared != size:
        raise PayloadError(f"zstd frame declares {declared} bytes where {size} are expected")
    try:
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise PayloadError(f"zstd data is corrupt: {exc}") from exc
    if len(out) != size:
        raise PayloadError(f"zstd data holds {len(out)} bytes where {size} are expected")
    return out


def little_endian(a: np.ndarray) -> np.ndarray:
    """``a`` as a contiguous little-endian array (a copy only when needed)."""
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))


def shuffle_bytes(a: np.ndarray) -> bytes:
    """The bytes of ``a`` grouped by byte position (see the module docstring)."""
    a = little_endian(a)
    if a.dtype.itemsize == 1:
        return a.tobytes()
    return a.reshape(-1).view(np.uint8).reshape(-1, a.dtype.itemsize).T.tobytes()


def unshuffle_bytes(buf: bytes | memoryview, dtype: np.typing.DTypeLike, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`shuffle_bytes`."""
    dtype = np.dtype(dtype).newbyteorder("<")
    raw = np.frombuffer(buf, dtype=np.uint8)
    if dtype.itemsize > 1:
        raw = np.ascontiguousarray(raw.reshape(dtype.itemsize, -1).T)
    return raw.view(dtype).reshape(shape)


def pack_lossless(tensors: Tensors, level: int = 3, shuffle: bool = True) -> tuple[list[list[Any]], bytes]:
    """``(table, zstd bytes)`` for tensors stored exactly (used by the lossless parts of lossy codecs)."""
    parts = [shuffle_bytes(a) if shuffle else little_endian(a).tobytes() for a in tensors.values()]
    return tensor_table(tensors), zstd_compress(b"".join(parts), level) if parts else b""


def unpack_lossless(table: Any, blob: bytes | memoryview, ctx: CodecContext, shuffle: bool = True) -> Tensors:
    """Inverse of :func:`pack_lossless`, validating the table and every length."""
    rows = check_table(table, ctx)
    need = sum(numel * dt.itemsize for _, dt, _, numel in rows)
    if not rows:
        if len(blob):
            raise PayloadError("lossless part holds bytes but no tensors")
        return {}
    raw = memoryview(zstd_decompress(blob, need))
    out: Tensors = {}
    pos = 0
    for name, dt, shape, numel in rows:
        nbytes = numel * dt.itemsize
        chunk = raw[pos : pos + nbytes]
        out[name] = unshuffle_bytes(chunk, dt, shape) if shuffle else np.frombuffer(chunk, dt.newbyteorder("<")).reshape(shape)
        pos += nbytes
    return out


@dataclass
class ZstdOptions:
    level: int = codec_option(3, "Zstandard level (1 fast ... 19 small)")
    shuffle: bool = codec_option(True, "group bytes by position before compressing (helps floats)")

    def validate(self) -> None:
        if not 1 <= self.level <= 22:
            raise ConfigError(f"zstd level must be in [1, 22], got {self.level}")


@register_codec
class ZstdCodec(Codec):
    """Lossless: byte-shuffled tensors in one Zstandard frame; every dtype exact."""

    codec_id = "zstd"
    lossless = True
    Options = ZstdOptions

    def encode(self, tensors: Tensors, ctx: CodecContext) -> tuple[dict[str, Any], bytes]:
        table, blob = pack_lossless(tensors, self.opts.level, self.opts.shuffle)
        return {"tensors": table, "shuffle": self.opts.shuffle}, blob

    def decode(self, meta: dict[str, Any], body: memoryview, ctx: CodecContext) -> Tensors:
        shuffle = meta.get("shuffle")
        if not isinstance(shuffle, bool):
            raise PayloadError("zstd payload lacks its 'shuffle' flag")
        return unpack_lossless(meta.get("tensors"), body, ctx, shuffle)
