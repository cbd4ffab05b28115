"""Fuse/xor filters and exact position codes over the MiniLM position space (d = 22,713,216).

For N random keys out of d, measures: filter build time (pyfusefilter C), bits per key, the
vectorized query over all d positions (throughput, false positives) against the C ``contain``
(sampled), and the exact coders (Golomb-Rice, Elias-Fano) against the bound log2 C(d, N).
Writes benchmarks/results/fusefilter.json. Run: PYTHONPATH=src python benchmarks/fusefilter.py
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from fedsqueeze.codecs.fusefilter import FILTER_KINDS, build_filter, contain_c, query_universe
from fedsqueeze.codecs.positions import POSITION_CODERS, decode_positions, encode_positions, entropy_bound_bits

D = 22_713_216
KEY_COUNTS = [10_000, 100_000, 200_000, 1_000_000]
C_SAMPLE = 200_000  # positions queried through the C contain, one call each (it is slow)


def best_of(fn, repeat: int = 3) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    rng = np.random.default_rng(0)
    rows = []
    for n in KEY_COUNTS:
        keys = np.sort(rng.choice(D, size=n, replace=False)).astype(np.uint64)
        bound = entropy_bound_bits(n, D)
        row = {"keys": n, "bound_bits_per_key": bound / n, "filters": {}, "exact": {}}
        for kind in FILTER_KINDS:
            build_s, flt = best_of(lambda: build_filter(keys, kind))
            query_s, hits = best_of(lambda: query_universe(flt, D), repeat=2)
            sample = rng.integers(0, D, size=C_SAMPLE, dtype=np.uint64)
            t = time.perf_counter()
            c_hits = contain_c(flt, sample)
            c_s = time.perf_counter() - t
            assert np.array_equal(c_hits, hits[sample.astype(np.int64)]), "vectorized query disagrees with C"
            assert hits[keys.astype(np.int64)].all()
            fp = int(hits.sum()) - n
            row["filters"][kind] = {
                "bytes": int(flt.fingerprints.nbytes),
                "bits_per_key": flt.bits_per_key,
                "build_s": build_s,
                "query_all_s": query_s,
                "query_positions_per_s": D / query_s,
                "c_contain_positions_per_s": C_SAMPLE / c_s,
                "false_positives": fp,
                "false_positive_rate": fp / (D - n),
            }
        for coder in POSITION_CODERS:
            enc_s, (meta, body) = best_of(lambda: encode_positions(keys, D, coder))
            dec_s, back = best_of(lambda: decode_positions(meta, body, D))
            assert np.array_equal(back, keys)
            row["exact"][coder] = {
                "bytes": len(body),
                "bits_per_key": 8 * len(body) / n,
                "over_bound_bits_per_key": 8 * len(body) / n - bound / n,
                "encode_s": enc_s,
                "decode_s": dec_s,
            }
        rows.append(row)
        print(json.dumps(row))
    out = {
        "universe": D,
        "rows": rows,
        "machine": {
            "cpu_count": os.cpu_count(),
            "load_avg_at_end": os.getloadavg(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "note": "single-threaded numpy; shared 2-core machine, other jobs running",
        },
    }
    path = Path(__file__).parent / "results" / "fusefilter.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
