"""QSGD (Alistarh et al., 2017): stochastic s-level quantization, entropy-coded with Zstandard.

Each float tensor is flattened and cut into buckets of ``bucket`` values. Per bucket, with
``r = ||v||_2``, a value becomes ``sign(v_i) * l_i`` where ``l_i`` is ``floor(s·|v_i|/r + u_i)`` and
``u_i ~ U[0, 1)`` comes from the round's seed: an unbiased estimate (E[x̂] = x). Stated bound:
``|x_i - x̂_i| <= r / s`` for every value of a bucket with norm ``r``.

Body: zstd frame of [bucket norms (float32) | signed levels (int8, or int16 when s > 127)], then the
lossless part (zstd) for non-float tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsqueeze.codecs.base import (
    Codec,
    CodecContext,
    Tensors,
    check_table,
    codec_option,
    is_float,
    register_codec,
    split_body,
    tensor_table,
)
from fedsqueeze.codecs.zstd import ZstdReader, pack_lossless, unpack_lossless, zstd_compress
from fedsqueeze.errors import ConfigError, PayloadError


@dataclass
class QSGDOptions:
    levels: int = codec_option(16, "quantization levels s per sign (1 = ternary; up to 32767)")
    bucket: int = codec_option(512, "values sharing one norm")
    zstd_level: int = codec_option(3, "Zstandard level of the entropy coder")

    def validate(self) -> None:
        if not 1 <= self.levels <= 32767:
            raise ConfigError(f"qsgd levels must be in [1, 32767], got {self.levels}")
        if not 1 <= self.bucket <= 1 << 20:
            raise ConfigError(f"qsgd bucket must be in [1, 2**20], got {self.bucket}")


def level_dtype(levels: int) -> np.dtype:
    return np.dtype("<i1") if levels <= 127 else np.dtype("<i2")


def bucketize(x: np.ndarray, bucket: int) -> np.ndarray:
    """``x`` flattened, zero-padded to whole buckets, as a (buckets, bucket) float32 matrix."""
    flat = x.reshape(-1).astype(np.float32)
    pad = (-flat.size) % bucket
    if pad:
        flat = np.concatenate([flat, np.zeros(pad, np.float32)])
    return flat.reshape(-1, bucket)


@register_codec
class QSGDCodec(Codec):
    """Unbiased stochastic quantization to s levels per bucket norm."""

    codec_id = "qsgd"
    lossless = False
    for_weights = False
    Options = QSGDOptions

    def encode(self, tensors: Tensors, ctx: CodecContext) -> tuple[dict[str, Any], bytes]:
        s, bucket = self.opts.levels, self.opts.bucket
        floats = {n: a for n, a in tensors.items() if is_float(a) and a.size > 0}
        exact = {n: a for n, a in tensors.items() if n not in floats}
        rng = np.random.default_rng(ctx.seed)
        norms, codes = [], []
        for a in floats.values():
            v = bucketize(a, bucket)
            # float64: squares of tiny float32 values underflow, which would zero a whole bucket
            r = np.sqrt(np.einsum("ij,ij->i", v, v, dtype=np.float64)).astype(np.float32)
            # |v| / r first: s / r overflows float32 when the norm is subnormal
            scaled = (np.abs(v) / np.where(r > 0, r, 1.0)[:, None]) * np.float32(s)
            lv = np.minimum(np.floor(scaled + rng.random(v.shape, dtype=np.float32)), s)
            codes.append((np.sign(v) * lv).astype(level_dtype(s)).reshape(-1))
            norms.append(r)
        raw = b"".join([np.concatenate(norms).astype("<f4").tobytes() if norms else b"", np.concatenate(codes).tobytes() if codes else b""])
        q_blob = zstd_compress(raw, self.opts.zstd_level) if raw else b""
        exact_table, e_blob = pack_lossless(exact)
        meta = {
            "quantized": tensor_table(floats),
            "exact": exact_table,
            "levels": s,
            "bucket": bucket,
            "lengths": [len(q_blob), len(e_blob)],
        }
        return meta, q_blob + e_blob

    def check_header(self, meta: dict[str, Any]) -> None:
        if meta.get("levels") != self.opts.levels or meta.get("bucket") != self.opts.bucket:
            raise PayloadError(
                f"qsgd payload declares levels={meta.get('levels')!r}, bucket={meta.get('bucket')!r}; "
                f"this side uses levels={self.opts.levels}, bucket={self.opts.bucket}"
            )

    def decode(self, meta: dict[str, Any], body: memoryview, ctx: CodecContext) -> Tensors:
        rows = check_table(meta.get("quantized"), ctx)
        s, bucket = meta.get("levels"), meta.get("bucket")
        if not (isinstance(s, int) and 1 <= s <= 32767 and isinstance(bucket, int) and 1 <= bucket <= 1 << 20):
            raise PayloadError("qsgd payload has bad levels or bucket")
        q_part, e_part = split_body(body, meta.get("lengths"), 2)
        out = unpack_lossless(meta.get("exact"), e_part, ctx.budget(sum(r[3] for r in rows)))
        n_buckets = [-(-numel // bucket) for *_, numel in rows]
        if any(numel == 0 or not np.issubdtype(dt, np.floating) for _, dt, _, numel in rows):
            raise PayloadError("qsgd payload declares an empty or non-float quantized tensor")
        if len(set(r[0] for r in rows)) != len(rows) or any(r[0] in out for r in rows):
            raise PayloadError("a tensor appears twice in the qsgd payload")
        ldt = level_dtype(s)
        n_norms = sum(n_buckets)
        need = 4 * n_norms + ldt.itemsize * bucket * n_norms
        if not need:
            if len(q_part):
                raise PayloadError("qsgd payload holds quantized bytes but no quantized tensors")
            return out
        # Streamed: the padding of each tensor's last bucket is read and dropped, never held, so
        # what is allocated follows the tensors' sizes (the header's bucket does not multiply it).
        reader = ZstdReader(q_part, need)
        norms = np.frombuffer(reader.read(4 * n_norms), "<f4")
        if not np.isfinite(norms).all() or (norms < 0).any():
            raise PayloadError("qsgd payload holds invalid norms or levels")
        step = norms.astype(np.float64) / s  # float64: r / s underflows float32 for a subnormal norm
        nb_pos = 0
        for (name, dt, shape, numel), nb in zip(rows, n_buckets):
            codes = np.frombuffer(reader.read(ldt.itemsize * numel), ldt)
            reader.skip(ldt.itemsize * (nb * bucket - numel))
            if codes.size and (int(codes.max()) > s or int(codes.min()) < -s):  # no widened copy of the levels
                raise PayloadError("qsgd payload holds invalid norms or levels")
            values = np.empty(numel, dtype=dt)
            # in pieces, so the float64 products never take more than a few MB
            for lo in range(0, numel, 1 << 16):
                hi = min(numel, lo + (1 << 16))
                r = step[nb_pos + np.arange(lo, hi) // bucket]
                values[lo:hi] = (codes[lo:hi].astype(np.float64) * r).astype(dt)
            out[name] = values.reshape(shape)
            nb_pos += nb
        return out
