"""Scaled sign with error feedback (EF-signSGD, Karimireddy et al., 2019): one bit per value.

Per float tensor ``p = x + residual`` travels as its signs (packed bits, ``p >= 0`` → 1) and one
float32 scale ``mean(|p|)``; the decoder returns ``scale · sign``. With ``error_feedback`` the
difference ``p - scale·sign`` is remembered (see :mod:`feedback`), which makes the scheme converge
where plain signSGD does not. Stated behaviour: ``decoded + new residual == x + old residual``.
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
from fedsqueeze.codecs.feedback import remember, with_residual
from fedsqueeze.codecs.zstd import pack_lossless, unpack_lossless
from fedsqueeze.errors import PayloadError

MEMORY = "ef:sign"


@dataclass
class SignOptions:
    error_feedback: bool = codec_option(True, "remember what the scaled sign missed and add it next round")


def unpack_signs(bits: memoryview | bytes, numel: int) -> np.ndarray:
    """±1.0 (float32) from packed sign bits."""
    out = np.unpackbits(np.frombuffer(bits, np.uint8), count=numel, bitorder="little").astype(np.float32)
    out *= 2.0  # in place: one float32 array, not three
    out -= 1.0
    return out


@register_codec
class SignCodec(Codec):
    """One bit per value plus one scale per tensor."""

    codec_id = "sign"
    lossless = False
    for_weights = False
    Options = SignOptions

    def encode(self, tensors: Tensors, ctx: CodecContext) -> tuple[dict[str, Any], bytes]:
        floats = {n: a for n, a in tensors.items() if is_float(a) and a.size > 0}
        exact = {n: a for n, a in tensors.items() if n not in floats}
        scales, bits = [], []
        for name, a in floats.items():
            p = with_residual(ctx, MEMORY, name, a) if self.opts.error_feedback else a.reshape(-1).astype(np.float32)
            positive = p >= 0
            scale = np.float32(np.abs(p).mean(dtype=np.float64))
            scales.append(scale)
            bits.append(np.packbits(positive, bitorder="little").tobytes())
            if self.opts.error_feedback:
                p -= np.where(positive, scale, -scale)
                remember(ctx, MEMORY, name, p)
        s_bytes = np.asarray(scales, "<f4").tobytes()
        b_bytes = b"".join(bits)
        exact_table, e_blob = pack_lossless(exact)
        meta = {"signs": tensor_table(floats), "exact": exact_table, "lengths": [len(s_bytes), len(b_bytes), len(e_blob)]}
        return meta, b"".join([s_bytes, b_bytes, e_blob])

    def decode(self, meta: dict[str, Any], body: memoryview, ctx: CodecContext) -> Tensors:
        rows = check_table(meta.get("signs"), ctx)
        if any(numel == 0 or not np.issubdtype(dt, np.floating) for _, dt, _, numel in rows):
            raise PayloadError("sign payload declares an empty or non-float tensor")
        s_bytes, b_bytes, e_blob = split_body(body, meta.get("lengths"), 3)
        nbytes = [-(-numel // 8) for *_, numel in rows]
        if len(s_bytes) != 4 * len(rows) or len(b_bytes) != sum(nbytes):
            raise PayloadError("sign payload parts have the wrong lengths")
        scales = np.frombuffer(s_bytes, "<f4")
        if not np.isfinite(scales).all() or (scales < 0).any():
            raise PayloadError("sign payload holds an invalid scale")
        out = unpack_lossless(meta.get("exact"), e_blob, ctx.budget(sum(r[3] for r in rows)))
        pos = 0
        for (name, dt, shape, numel), nb, scale in zip(rows, nbytes, scales):
            if name in out:
                raise PayloadError(f"tensor {name!r} appears twice in the sign payload")
            values = unpack_signs(b_bytes[pos : pos + nb], numel)
            values *= scale
            out[name] = values.astype(dt, copy=False).reshape(shape)
            pos += nb
        return out
