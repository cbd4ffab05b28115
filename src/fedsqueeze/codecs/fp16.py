"""Half precision: float32/float64 tensors travel as IEEE float16 (16 bits per value).

Values are clipped to float16's finite range (±65504) so nothing becomes infinite. Stated bound:
``|x - x̂| <= max(|x| * 2**-11, 2**-25)`` for ``|x| <= 65504`` (round to nearest; the second
term covers subnormals). Other dtypes travel exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedsqueeze.codecs.base import (
    Codec,
    CodecContext,
    Tensors,
    check_table,
    is_float,
    register_codec,
    split_body,
    tensor_table,
)
from fedsqueeze.codecs.zstd import little_endian
from fedsqueeze.errors import PayloadError

FP16_MAX = float(np.finfo(np.float16).max)


@register_codec
class FP16Codec(Codec):
    """float32/float64 → float16 (clipped); everything else raw."""

    codec_id = "fp16"
    lossless = False

    def encode(self, tensors: Tensors, ctx: CodecContext) -> tuple[dict[str, Any], bytes]:
        halves = {n: a for n, a in tensors.items() if is_float(a)}
        exact = {n: a for n, a in tensors.items() if n not in halves}
        h_bytes = b"".join(np.clip(a, -FP16_MAX, FP16_MAX).astype("<f2").tobytes() for a in halves.values())
        e_bytes = b"".join(little_endian(a).tobytes() for a in exact.values())
        meta = {"half": tensor_table(halves), "exact": tensor_table(exact), "lengths": [len(h_bytes), len(e_bytes)]}
        return meta, h_bytes + e_bytes

    def decode(self, meta: dict[str, Any], body: memoryview, ctx: CodecContext) -> Tensors:
        half_rows = check_table(meta.get("half"), ctx)
        exact_rows = check_table(meta.get("exact"), ctx.budget(sum(r[3] for r in half_rows)))
        h_part, e_part = split_body(body, meta.get("lengths"), 2)
        if len(h_part) != 2 * sum(r[3] for r in half_rows):
            raise PayloadError("fp16 part has the wrong length for its table")
        if len(e_part) != sum(r[3] * r[1].itemsize for r in exact_rows):
            raise PayloadError("fp16 payload's exact part has the wrong length for its table")
        out: Tensors = {}
        pos = 0
        for name, dt, shape, numel in half_rows:
            if not np.issubdtype(dt, np.floating) or dt == np.float16:
                raise PayloadError(f"fp16 part declares tensor {name!r} as {dt}")
            out[name] = np.frombuffer(h_part[pos : pos + 2 * numel], "<f2").astype(dt).reshape(shape)
            pos += 2 * numel
        pos = 0
        for name, dt, shape, numel in exact_rows:
            if name in out:
                raise PayloadError(f"tensor {name!r} appears twice in the fp16 payload")
            n = numel * dt.itemsize
            out[name] = np.frombuffer(e_part[pos : pos + n], dt.newbyteorder("<")).reshape(shape)
            pos += n
        return out
