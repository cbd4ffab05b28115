"""SZ3 error-bounded lossy compression (pysz), with FedSZ's lossy/lossless partition.

A float32/float64 tensor goes lossy when it has more than ``threshold`` elements and its name
contains ``name_filter`` (empty: every name); the rest (biases, norms, small or integer tensors)
goes lossless through Zstandard, so counters and ids round-trip exactly.

The error bound is **per tensor**: ``mode="abs"`` bounds ``|x - x̂| <= bound`` elementwise;
``mode="rel"`` bounds it by ``bound * (max(x) - min(x))`` of that tensor (SZ3's REL is relative to
the value range, so one bound over a whole concatenated model would wipe small tensors out).
A tensor with a zero range or a non-finite value goes lossless instead. The encoder's one read of
a tensor (:func:`scan`) gives its range, so a dense REL tensor goes to SZ3 at the ABS bound SZ3's
REL mode would work out from it (:func:`rel_abs_bound`): the same stream, without SZ3's own pass.

Row-sparse tensors (``sparse_rows``, on by default): an update of an embedding table touches only
the rows of the tokens a client saw (96% of MiniLM's 11.7M word-embedding values stay exactly 0
after 10 local steps). When at most half of a 2-D+ lossy tensor's rows are non-zero, only those
rows go through SZ3, with the ABS bound the tensor's own bound works out to (``bound`` × the
range of the *whole* tensor in REL mode), and a bitmap of the kept rows travels with them: the
other rows come back as exact zeros, the stated bound still holds, and SZ3 has half the values to
code for a typical update (faster, and smaller).

Body: the lossless part (a zstd frame), then per lossy tensor its row bitmap (empty when dense)
and its SZ3 stream; the header lists the tensors of each part, the kept-row count of each lossy
tensor (0 = dense) and every section's length, all checked before any decoding.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pysz

from fedsqueeze.codecs.base import (
    Codec,
    CodecContext,
    Tensors,
    check_table,
    codec_option,
    register_codec,
    split_body,
    tensor_table,
)
from fedsqueeze.codecs.zstd import pack_lossless, unpack_lossless
from fedsqueeze.errors import ConfigError, PayloadError


@dataclass
class SZ3Options:
    mode: str = codec_option("rel", "error bound mode: 'rel' (times each tensor's value range) or 'abs'")
    bound: float = codec_option(1e-2, "error bound (REL fraction of the range, or ABS value)")
    threshold: int = codec_option(1024, "tensors with more elements than this go lossy, the rest lossless")
    name_filter: str = codec_option("", "only tensors whose name contains this go lossy ('' = all; FedSZ used 'weight')")
    zstd_level: int = codec_option(3, "Zstandard level of the lossless part")
    sparse_rows: bool = codec_option(True, "send only the non-zero rows of row-sparse tensors (embedding updates) through SZ3")
    algo: str = codec_option(
        "interp_lorenzo",
        "SZ3 predictor: interp_lorenzo (SZ3's default), lorenzo_reg, interp or nopred "
        "(quantization + entropy coding only: faster and smaller on noise-like updates)",
    )

    def validate(self) -> None:
        if self.mode not in ("rel", "abs"):
            raise ConfigError(f"sz3 mode must be 'rel' or 'abs', got {self.mode!r}")
        if not (self.bound > 0 and np.isfinite(self.bound)):
            raise ConfigError(f"sz3 bound must be a positive number, got {self.bound}")
        if self.threshold < 0:
            raise ConfigError("sz3 threshold must be >= 0")
        if self.algo not in SZ3_ALGORITHMS:
            raise ConfigError(f"sz3 algo must be one of {sorted(SZ3_ALGORITHMS)}, got {self.algo!r}")


# the predictor is written into every SZ3 stream, so decoding needs no option
SZ3_ALGORITHMS = {
    "interp_lorenzo": pysz.szAlgorithm.INTERP_LORENZO,
    "lorenzo_reg": pysz.szAlgorithm.LORENZO_REG,
    "interp": pysz.szAlgorithm.INTERP,
    "nopred": pysz.szAlgorithm.NOPRED,
}


def sz3_config(mode: str, bound: float, algo: str = "interp_lorenzo") -> Any:
    """A pysz configuration for one error bound and predictor."""
    cfg = pysz.szConfig()
    cfg.cmprAlgo = SZ3_ALGORITHMS[algo]
    if mode == "rel":
        cfg.errorBoundMode = pysz.szErrorBoundMode.REL
        cfg.relErrorBound = bound
    else:
        cfg.errorBoundMode = pysz.szErrorBoundMode.ABS
        cfg.absErrorBound = bound
    return cfg


_LOSSY_DTYPES = frozenset({np.dtype(np.float32), np.dtype(np.float64)})  # is_float's, as a set: one hash, no compares

# one configuration per setting, built once: pysz sets a configuration's dims from each array inside
# its compress call (which holds the GIL) and changes nothing else, so reusing one gives the same bytes
_shared_config = functools.lru_cache(maxsize=32)(sz3_config)


@register_codec
class SZ3Codec(Codec):
    """Error-bounded lossy (SZ3) for large float tensors, lossless (zstd) for the rest."""

    codec_id = "sz3"
    lossless = False
    Options = SZ3Options

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        # the dense path's configuration, looked up once (its options do not change after construction)
        self._dense_config = _shared_config(self.opts.mode, self.opts.bound, self.opts.algo)

    def goes_lossy(self, name: str, a: np.ndarray) -> bool:
        """Whether ``a`` goes through SZ3 (see :meth:`plan`)."""
        return self.plan(name, a) is not None

    def plan(self, name: str, a: np.ndarray) -> Scan | None:
        """The pre-scan of a tensor that goes lossy, or None when it goes lossless.

        A lossy candidate (float, large, name matched) is read once (:func:`scan`): finiteness, range
        and, for the row-sparse path, its non-zero rows all come from that one pass.
        """
        o = self.opts
        if not (a.dtype in _LOSSY_DTYPES and a.size > o.threshold and o.name_filter in name):
            return None
        if a.ndim == 1 and a.size <= _SMALL_VECTOR_MAX and (o.mode == "abs" or a[0] != a[-1]) and math.isfinite(_vdot(a, a)):
            # a small vector (a bias), which SZ3 codes in tens of µs: only finiteness and a non-zero
            # range decide, and one dot product with itself (BLAS; np.vdot costs less than a sum or
            # a.dot: NaN or inf with any NaN or ±inf in it, an overflow falls through to the scan) and
            # two unequal values settle them
            return _SMALL_VECTOR
        info = scan(a, rows=o.sparse_rows)
        if not info.finite or (o.mode == "rel" and not info.hi > info.lo):
            return None
        return info

    def encode(self, tensors: Tensors, ctx: CodecContext) -> tuple[dict[str, Any], bytes]:
        plans = {n: self.plan(n, a) for n, a in tensors.items()}
        lossy = {n: a for n, a in tensors.items() if plans[n] is not None}
        exact = {n: a for n, a in tensors.items() if n not in lossy}
        exact_table, blob = pack_lossless(exact, self.opts.zstd_level)
        sections, kept = [blob], []
        for n, a in lossy.items():
            info = plans[n]
            assert info is not None  # lossy holds the planned tensors only
            bitmap, stream, rows = self.compress_one(np.ascontiguousarray(a), info)
            sections += [bitmap, stream]
            kept.append(rows)
        meta = {
            "lossy": tensor_table(lossy),
            "exact": exact_table,
            "rows": kept,
            "lengths": [len(x) for x in sections],
            "mode": self.opts.mode,
            "bound": self.opts.bound,
        }
        return meta, b"".join(sections)

    def compress_one(self, a: np.ndarray, info: Scan) -> tuple[bytes, bytes, int]:
        """``(row bitmap, SZ3 stream, kept rows)`` of one lossy tensor; no bitmap and 0 rows when dense."""
        o = self.opts
        nonzero = info.nonzero_rows
        if nonzero is not None:
            rows = int(nonzero.sum())
            if 0 < rows <= a.shape[0] // 2:
                bound = o.bound if o.mode == "abs" else o.bound * (info.hi - info.lo)
                values = a.reshape(a.shape[0], -1)[nonzero].reshape(-1)
                return np.packbits(nonzero).tobytes(), sz3_compress(values, sz3_config("abs", bound, o.algo)), rows
        flat = a if a.ndim == 1 else a.reshape(-1)
        if info.lo == info.lo and o.mode == "rel":  # a range (NaN: a small vector's plan, which takes none)
            # hand SZ3 the ABS bound its REL mode works out from the range, so SZ3 does not take the range
            # again (10-12% of its time on a dense weight, more than the scan); the same stream, byte for byte
            return b"", sz3_compress(flat, sz3_config("abs", rel_abs_bound(o.bound, info, a.dtype), o.algo)), 0
        return b"", sz3_compress(flat, self._dense_config), 0

    def check_header(self, meta: dict[str, Any]) -> None:
        if meta.get("mode") != self.opts.mode or meta.get("bound") != self.opts.bound:
            raise PayloadError(
                f"sz3 payload declares mode={meta.get('mode')!r}, bound={meta.get('bound')!r}; "
                f"this side uses mode={self.opts.mode!r}, bound={self.opts.bound}"
            )

    def decode(self, meta: dict[str, Any], body: memoryview, ctx: CodecContext) -> Tensors:
        lossy_rows = check_table(meta.get("lossy"), ctx)
        exact_table = meta.get("exact")
        parts = split_body(body, meta.get("lengths"))
        kept = meta.get("rows")
        if len(parts) != 2 * len(lossy_rows) + 1 or not (isinstance(kept, list) and len(kept) == len(lossy_rows)):
            raise PayloadError("sz3 payload has a stream count that disagrees with its table")
        out = unpack_lossless(exact_table, parts[0], ctx.budget(sum(r[3] for r in lossy_rows)))
        for i, (name, dt, shape, numel) in enumerate(lossy_rows):
            if dt not in (np.float32, np.float64):
                raise PayloadError(f"sz3 stream for {name!r} declares dtype {dt}")
            if name in out:
                raise PayloadError(f"tensor {name!r} appears twice in the sz3 payload")
            out[name] = decode_tensor(parts[1 + 2 * i], parts[2 + 2 * i], kept[i], dt, shape, numel)
        return out


class Scan(NamedTuple):
    """What one read of a tensor tells the encoder: finite?, its range, its non-zero rows.

    (A named tuple: it is built once per tensor, and a frozen dataclass costs µs to build.)
    """

    finite: bool
    lo: float  # NaN in the plan of a small vector (SZ3Codec.plan): its dense path needs no range
    hi: float
    # bool per row, when asked for and the tensor may be row-sparse; None when it has no rows, or
    # when over half its rows are non-zero at their first value (so the row-sparse path is not taken)
    nonzero_rows: np.ndarray | None


_SCAN_BLOCK = 1 << 16  # elements per block: min and max of a block read it from cache, not memory
# the largest vector planned by one dot product: OpenBLAS takes a second thread above 10,000 values
_SMALL_VECTOR_MAX = 8192
# the ufuncs' own reductions: ndarray.min/max go through a Python wrapper, a µs a call on small tensors
_min, _max, _vdot = np.minimum.reduce, np.maximum.reduce, np.vdot


# the plan of a small finite vector with a non-zero range: its range is not taken (the dense path needs none)
_SMALL_VECTOR = Scan(True, math.nan, math.nan, None)


def scan(a: np.ndarray, rows: bool = True) -> Scan:
    """Min, max (so finiteness: NaN and ±inf show in them) and, with ``rows``, the non-zero rows, in one pass.

    The tensor is walked in cache-sized blocks, whose min and max are taken while the block is in
    cache, so main memory is read once (the old code read it 4-5 times: isfinite, min and max
    twice, a temporary ``!= 0`` mask). The non-zero rows are only needed when at most half the
    rows are (the row-sparse path); a row whose first value is non-zero is non-zero, so when over
    half the rows start non-zero (any dense weight) a strided read of one column settles it and
    the blocks are taken flat. Otherwise the blocks are whole rows and each row's min and max are
    kept. A small tensor costs two reductions and no arrays: SZ3 takes tens of µs on it.
    """
    m = a.reshape(a.shape[0], -1) if rows and a.ndim >= 2 and a.shape[0] > 1 else None
    if m is not None and m.shape[1] and np.count_nonzero(m[:, 0]) <= m.shape[0] // 2:
        step = max(1, _SCAN_BLOCK // m.shape[1])
        if step >= m.shape[0]:  # one block: no loop
            part_lo, part_hi = m.min(axis=1), m.max(axis=1)
        else:
            part_lo, part_hi = np.empty(m.shape[0], dtype=m.dtype), np.empty(m.shape[0], dtype=m.dtype)
            for i in range(0, m.shape[0], step):
                np.min(m[i : i + step], axis=1, out=part_lo[i : i + step])
                np.max(m[i : i + step], axis=1, out=part_hi[i : i + step])
        lo, hi = float(_min(part_lo)), float(_max(part_hi))  # NaN propagates through numpy's min and max
        return Scan(math.isfinite(lo) and math.isfinite(hi), lo, hi, (part_lo != 0) | (part_hi != 0))
    flat = a if a.ndim == 1 else a.reshape(-1)
    if flat.size <= _SCAN_BLOCK:  # fits the cache whole: one min and one max
        lo, hi = float(_min(flat)), float(_max(flat))
    else:  # min and max of each cache-sized block of the flat tensor
        starts = range(0, flat.size, _SCAN_BLOCK)
        lo = float(_min([_min(flat[i : i + _SCAN_BLOCK]) for i in starts]))  # numpy's min keeps a NaN
        hi = float(_max([_max(flat[i : i + _SCAN_BLOCK]) for i in starts]))
    return Scan(math.isfinite(lo) and math.isfinite(hi), lo, hi, None)


def rel_abs_bound(bound: float, info: Scan, dtype: np.dtype) -> float:
    """The ABS bound SZ3's REL mode sets for a tensor of range ``[info.lo, info.hi]``: ``bound`` times
    ``max - min`` taken in the tensor's own type (float32 rounding included), as SZ3 takes it."""
    kind = dtype.type
    return bound * float(kind(info.hi) - kind(info.lo))


def sz3_compress(values: np.ndarray, cfg: Any) -> bytes:
    # pysz returns a view into a buffer of SZ3's worst-case size: copy the stream out, so that buffer goes
    return bytes(pysz.sz.compress(values, cfg)[0])


def decode_tensor(bitmap: memoryview, stream: memoryview, rows: Any, dtype: np.dtype, shape: tuple[int, ...], numel: int) -> np.ndarray:
    """One lossy tensor: a dense SZ3 stream, or its kept rows scattered into zeros by the bitmap."""
    if type(rows) is not int or rows < 0:
        raise PayloadError(f"sz3 kept-row count {rows!r} is not a count")
    if rows == 0:
        if len(bitmap):
            raise PayloadError("dense sz3 tensor carries a row bitmap")
        return decode_stream(stream, dtype, numel).reshape(shape)
    if len(shape) < 2 or rows > shape[0] or len(bitmap) != (shape[0] + 7) // 8:
        raise PayloadError(f"sz3 row bitmap of {len(bitmap)} bytes does not fit {rows} rows of shape {shape}")
    nonzero = np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8), count=shape[0]).astype(bool)
    if int(nonzero.sum()) != rows:
        raise PayloadError(f"sz3 row bitmap marks {int(nonzero.sum())} rows, the header says {rows}")
    row_size = numel // shape[0]
    out = np.zeros((shape[0], row_size), dtype=dtype)
    out[nonzero] = decode_stream(stream, dtype, rows * row_size).reshape(rows, row_size)
    return out.reshape(shape)


def decode_stream(stream: memoryview, dtype: np.dtype, numel: int) -> np.ndarray:
    """One SZ3 stream back to ``numel`` values; any complaint from SZ3 becomes a PayloadError."""
    if numel == 0:
        raise PayloadError("sz3 stream for an empty tensor")
    try:
        values, _ = pysz.sz.decompress(np.frombuffer(stream, dtype=np.uint8).copy(), dtype.type, (numel,))
    except Exception as exc:  # pysz raises ValueError/IndexError/RuntimeError on bad streams
        raise PayloadError(f"sz3 stream is corrupt: {exc}") from exc
    values = np.asarray(values)
    if values.dtype != dtype or values.size != numel:
        raise PayloadError("sz3 stream decoded to the wrong dtype or size")
    return values
