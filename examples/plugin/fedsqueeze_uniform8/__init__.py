"""An example fedsqueeze plugin: a codec and a method added by subclassing.

``uniform8`` quantizes every float tensor to 8 bits on a uniform grid between its minimum and
maximum: ``code = round((x - lo) / (hi - lo) * 255)``, so ``|x - x̂| <= (hi - lo) / 510``.
Other dtypes travel exactly. Body: the float tensors' codes (one byte each), then the other
tensors' bytes; the header holds the tables, each float tensor's ``[lo, hi]`` and the two lengths.

``fedavg-u8`` is FedAvg whose upload uses ``uniform8`` by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsqueeze.codecs.base import Codec, CodecContext, Tensors, check_table, is_float, register_codec, split_body, tensor_table
from fedsqueeze.errors import PayloadError
from fedsqueeze.methods.base import register_method
from fedsqueeze.methods.fedavg import FedAvg
from fedsqueeze.methods.tensor import TensorOptions, codec_ids
from fedsqueeze.options import option

LEVELS = 255


@register_codec
class Uniform8Codec(Codec):
    """Float tensors to 8-bit codes on [min, max]; everything else exact."""

    codec_id = "uniform8"
    lossless = False

    def encode(self, tensors: Tensors, ctx: CodecContext) -> tuple[dict[str, Any], bytes]:
        floats = {n: a for n, a in tensors.items() if is_float(a)}
        exact = {n: a for n, a in tensors.items() if n not in floats}
        ranges, codes = [], []
        for a in floats.values():
            lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
            scale = (hi - lo) / LEVELS if hi > lo else 1.0
            codes.append(np.rint((a.reshape(-1).astype(np.float64) - lo) / scale).astype(np.uint8).tobytes())
            ranges.append([lo, hi])
        q_bytes = b"".join(codes)
        e_bytes = b"".join(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes() for a in exact.values())
        meta = {"floats": tensor_table(floats), "ranges": ranges, "exact": tensor_table(exact), "lengths": [len(q_bytes), len(e_bytes)]}
        return meta, q_bytes + e_bytes

    def decode(self, meta: dict[str, Any], body: memoryview, ctx: CodecContext) -> Tensors:
        # every header field is checked against the body before anything is allocated
        float_rows = check_table(meta.get("floats"), ctx)
        exact_rows = check_table(meta.get("exact"), ctx.budget(sum(r[3] for r in float_rows)))
        ranges = meta.get("ranges")
        if not (isinstance(ranges, list) and len(ranges) == len(float_rows)):
            raise PayloadError("uniform8 ranges do not match the float table")
        q_part, e_part = split_body(body, meta.get("lengths"), 2)
        if len(q_part) != sum(r[3] for r in float_rows):
            raise PayloadError("uniform8 code part has the wrong length")
        if len(e_part) != sum(r[3] * r[1].itemsize for r in exact_rows):
            raise PayloadError("uniform8 exact part has the wrong length")
        out: Tensors = {}
        pos = 0
        for (name, dtype, shape, numel), pair in zip(float_rows, ranges):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, float | int) and math.isfinite(v) for v in pair)):
                raise PayloadError(f"uniform8 range of {name!r} is malformed")
            lo, hi = float(pair[0]), float(pair[1])
            if hi < lo:
                raise PayloadError(f"uniform8 range of {name!r} is reversed")
            scale = (hi - lo) / LEVELS if hi > lo else 1.0
            codes = np.frombuffer(q_part[pos : pos + numel], dtype=np.uint8)
            out[name] = (lo + codes.astype(np.float64) * scale).astype(dtype).reshape(shape)
            pos += numel
        pos = 0
        for name, dtype, shape, numel in exact_rows:
            size = numel * dtype.itemsize
            out[name] = np.frombuffer(e_part[pos : pos + size], dtype=dtype.newbyteorder("<")).reshape(shape).copy()
            pos += size
        return out


@dataclass
class Uniform8Options(TensorOptions):
    uplink_codec: str = option("uniform8", "codec for the client upload (uniform8: 8 bits per value)", choices=codec_ids)


@register_method
class FedAvgUniform8(FedAvg):
    name = "fedavg-u8"
    summary = "FedAvg + 8-bit uniform quantization of the update (example plugin)"
    Options = Uniform8Options
