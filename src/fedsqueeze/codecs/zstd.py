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


def check_frame_size(data: bytes | memoryview, size: int) -> None:
    """Refuse a zstd frame whose header does not declare exactly ``size`` bytes (before anything is decompressed)."""
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise PayloadError(f"zstd frame header is invalid: {exc}") from exc
    if declared != size:
        raise PayloadError(f"zstd frame declares {declared} bytes where {size} are expected")


def zstd_decompress(data: bytes | memoryview, size: int) -> bytes:
    """Inverse of :func:`zstd_compress` for a frame that must hold exactly ``size`` bytes."""
    data = bytes(data)
    check_frame_size(data, size)
    try:
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise PayloadError(f"zstd data is corrupt: {exc}") from exc
    if len(out) != size:
        raise PayloadError(f"zstd data holds {len(out)} bytes where {size} are expected")
    return out


class ZstdReader:
    """A zstd frame of exactly ``size`` bytes, read piece by piece (so a caller can skip padding
    without ever holding the whole output)."""

    def __init__(self, data: bytes | memoryview, size: int) -> None:
        check_frame_size(data, size)
        self._reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=False)
        self.left = size

    def read(self, n: int) -> bytes:
        """The next ``n`` bytes of the frame's content (all of them, or a PayloadError)."""
        if n > self.left:
            raise PayloadError("zstd read past the declared content")
        parts, got = [], 0
        try:
            while got < n:
                chunk = self._reader.read(n - got)
                if not chunk:
                    break
                parts.append(chunk)
                got += len(chunk)
        except zstandard.ZstdError as exc:
            raise PayloadError(f"zstd data is corrupt: {exc}") from exc
        if got != n:
            raise PayloadError(f"zstd data ends after {got} of {n} bytes")
        self.left -= n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def skip(self, n: int, piece: int = 1 << 20) -> None:
        """Read and drop ``n`` bytes, at most ``piece`` at a time."""
        while n > 0:
            step = min(n, piece)
            self.read(step)
            n -= step


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
    # streamed one tensor (one byte plane, when shuffled) at a time: the output plus one plane is
    # all that is held, never the whole decompressed body next to its unshuffled copy
    reader = ZstdReader(blob, need)
    out: Tensors = {}
    for name, dt, shape, numel in rows:
        le = dt.newbyteorder("<")
        if shuffle and dt.itemsize > 1:
            planes = np.empty((numel, dt.itemsize), dtype=np.uint8)
            for j in range(dt.itemsize):
                planes[:, j] = np.frombuffer(reader.read(numel), dtype=np.uint8)
            out[name] = planes.reshape(-1).view(le).reshape(shape)
        else:
            out[name] = np.frombuffer(reader.read(numel * dt.itemsize), dtype=le).reshape(shape)
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

    def check_header(self, meta: dict[str, Any]) -> None:
        if meta.get("shuffle") is not self.opts.shuffle:
            raise PayloadError(f"zstd payload declares shuffle={meta.get('shuffle')!r}; this side uses shuffle={self.opts.shuffle}")

    def decode(self, meta: dict[str, Any], body: memoryview, ctx: CodecContext) -> Tensors:
        shuffle = meta.get("shuffle")
        if not isinstance(shuffle, bool):
            raise PayloadError("zstd payload lacks its 'shuffle' flag")
        return unpack_lossless(meta.get("tensors"), body, ctx, shuffle)
