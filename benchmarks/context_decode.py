"""The server's decoding of a context flip code: whole-mask (before) against chunked (now), in one run.

A synthetic round at ``--n`` masked weights: θ_start as uint8 symbols (90% near 0.98, the rest at
0.02/0.4/0.6), uniforms from a seeded generator, and a client θ that moved by a little noise on
30% of the positions, which flips about 1.3% of the mask. The client codes the flips
(:func:`fedsqueeze.codecs.sideinfo.encode_flips`, unchanged); the server rebuilds the uniforms and
θ_start and decodes the flipped positions, two ways:

* ``whole`` — the decoder before: float32 uniforms and θ over the whole mask, the contexts, an
  int64 grouping sort of every position (``decode_grouped_bits``), a bool mask, ``flatnonzero``;
* ``chunked`` — the decoder now (``MaskMethod.server_contexts`` + ``decode_flips_counted``): one
  uint8 context per position built a chunk at a time, int32 ranks decoded in pieces and turned
  into positions in place.

The same for fedpm's ``coder=levels`` (the whole sampled mask ``u < θ_client``, ANS-coded per
level of θ): the grouped-bit decode before (an int64 grouping sort, kept here as ``whole_bits``)
against ``decode_grouped_bits`` now (int32 positions of the ones, found chunk by chunk).

Records the median seconds of ``--repeats`` interleaved runs of each (and of the encoders), the
ratios, and each decode's tracemalloc peak against 2 × float32 of the mask. Each pair must give
the same result (checked). Writes benchmarks/results/context_decode.json.

    nice -n 10 env PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/context_decode.py [--n 2000000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import constriction
import numpy as np

from fedsqueeze.codecs.ans import chunk_size, decode_grouped_bits, encode_grouped_bits, group_order
from fedsqueeze.codecs.sideinfo import (
    NUM_CONTEXTS,
    chunked_contexts,
    decode_flips_counted,
    encode_flips,
    flip_contexts,
    unpack_counts,
)
from fedsqueeze.masking import clip_probs, shared_uniforms

OUT = Path(__file__).resolve().parent / "results" / "context_decode.json"
LEVELS, EPS, SEED = 255, 0.02, 7


def theta_start(sym: np.ndarray) -> np.ndarray:
    """θ_start from the server's symbols, as MaskMethod computes it."""
    return clip_probs(sym.astype(np.float32) / np.float32(LEVELS), EPS)


def whole_bits(ones: list[int], body: memoryview | bytes, groups: np.ndarray, num_groups: int) -> np.ndarray:
    """The grouped-bit decode before, kept here as the reference: an int64 grouping sort of every
    position, and each group decoded at once into a bool mask."""
    order, bounds = group_order(groups, num_groups)
    coder = constriction.stream.stack.AnsCoder(np.frombuffer(body, dtype="<u4").astype(np.uint32))
    bits = np.zeros(groups.size, dtype=bool)
    for g in range(num_groups):
        lo, hi = int(bounds[g]), int(bounds[g + 1])
        if ones[g] == hi - lo:
            bits[order[lo:hi]] = True
        elif ones[g] > 0:
            p = ones[g] / (hi - lo)
            model = constriction.stream.model.Categorical(np.array([1.0 - p, p]), perfect=False)
            bits[order[lo:hi]] = coder.decode(model, hi - lo) == 1
    return bits


def decode_whole(sym: np.ndarray, meta: dict[str, Any], body: bytes) -> np.ndarray:
    """The context decoder before: everything over the whole mask at once."""
    u = shared_uniforms(np.random.default_rng(SEED), sym.size)
    contexts = flip_contexts(u, theta_start(sym))
    ones, start = unpack_counts(body, np.bincount(contexts, minlength=NUM_CONTEXTS))
    return np.flatnonzero(whole_bits(ones, body[start:], contexts, NUM_CONTEXTS))


def decode_chunked(sym: np.ndarray, meta: dict[str, Any], body: bytes) -> np.ndarray:
    """The context decoder now: uniforms, θ_start and contexts a chunk at a time, then the bounded decode."""
    n, step, rng = sym.size, chunk_size(sym.size), np.random.default_rng(SEED)
    chunks = ((shared_uniforms(rng, min(step, n - lo)), theta_start(sym[lo : lo + step])) for lo in range(0, n, step))
    return decode_flips_counted(meta, body, chunked_contexts(n, chunks), n)[0]


def peak_of(fn: Callable[[], Any]) -> int:
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    fn()
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return peak


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2_000_000, help="masked weights")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    n, rng = args.n, np.random.default_rng(0)
    ref = np.where(rng.random(n) < 0.9, 0.98, rng.choice([0.02, 0.4, 0.6], n))
    sym = np.rint(ref * LEVELS).astype(np.uint8)
    u, start = shared_uniforms(np.random.default_rng(SEED), n), theta_start(sym)
    theta_client = np.clip(start + rng.normal(0, 0.08, n) * (rng.random(n) < 0.3), 0, 1).astype(np.float32)
    flips = (u < theta_client) != (u < start)

    def encode() -> tuple[dict[str, Any], bytes]:  # the client's side, as MaskMethod.encode_context_flips
        return encode_flips(flips, flip_contexts(u, start))

    meta, body = encode()
    whole, chunked = decode_whole(sym, meta, body), decode_chunked(sym, meta, body)
    assert np.array_equal(whole, np.flatnonzero(flips)) and np.array_equal(chunked, whole), "the context decoders disagree"
    # fedpm coder=levels: the whole sampled mask, grouped by θ's level
    mask = u < theta_client
    lmeta, lbody = encode_grouped_bits(mask, sym, LEVELS + 1)
    assert np.array_equal(whole_bits(lmeta["ones"], lbody, sym, LEVELS + 1), mask), "the levels decoders disagree"
    assert np.array_equal(decode_grouped_bits(lmeta, lbody, sym, LEVELS + 1), mask), "the levels decoders disagree"
    runs: dict[str, Callable[[], Any]] = {
        "context_encode": encode,
        "context_decode_whole": lambda: decode_whole(sym, meta, body),
        "context_decode_chunked": lambda: decode_chunked(sym, meta, body),
        "levels_encode": lambda: encode_grouped_bits(mask, sym, LEVELS + 1),
        "levels_decode_whole": lambda: whole_bits(lmeta["ones"], lbody, sym, LEVELS + 1),
        "levels_decode_chunked": lambda: decode_grouped_bits(lmeta, lbody, sym, LEVELS + 1),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits both alike
        for k, fn in runs.items():
            times[k].append(timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    peaks = {k: peak_of(fn) for k, fn in runs.items() if "decode" in k}
    target = 2 * 4 * n
    codes = ("context", "levels")
    res = {
        "n": n,
        "flips": int(flips.sum()),
        "flip_fraction": round(float(flips.mean()), 5),
        "code_bytes": {"context": len(body), "levels": len(lbody)},
        "repeats": args.repeats,
        "median_s": {k: round(v, 5) for k, v in med.items()},
        "decode_chunked_over_whole": {c: round(med[f"{c}_decode_chunked"] / med[f"{c}_decode_whole"], 3) for c in codes},
        "decode_chunked_over_encode": {c: round(med[f"{c}_decode_chunked"] / med[f"{c}_encode"], 3) for c in codes},
        "peak_bytes": peaks,
        "target_bytes": target,
        "peak_over_target": {k: round(v / target, 3) for k, v in peaks.items()},
        "note": "encoders unchanged (whole-mask, on the client); times are medians of interleaved runs in one process",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
