"""Downlink benchmark: bytes and accuracy of the full and the delta downlink, one run per setting.

Every setting runs the same federated job (default: the tiny model on WordNet, 10 clients, 5 per
round, 10 rounds, seed 0, one thread) in this process, one after the other, and records the final
accuracy, the mean uplink and downlink bits per parameter, and the ratios against the first
setting (FedAvg, raw both ways), all measured in this one run.

    PYTHONPATH=src HF_HUB_OFFLINE=1 python benchmarks/downlink.py [--rounds 10] [--set key=value ...]

Writes benchmarks/results/downlink.json (``--out`` for another file); ``--only mask`` runs the
mask methods' settings (and the FedAvg reference), e.g. into benchmarks/results/downlink_masks_tiny.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from fedsqueeze.config import RunConfig  # noqa: E402
from fedsqueeze.runtime import run_local  # noqa: E402

DELTA = {"downlink": "delta"}
SETTINGS: list[tuple[str, str, dict[str, Any]]] = [
    ("fedavg, full raw", "fedavg", {}),
    ("fedsz, full raw", "fedsz", {}),
    ("fedsz, full sz3 (REL 1e-2 on the weights)", "fedsz", {"downlink_codec": "sz3"}),
    ("fedsz, delta qsgd (s=16)", "fedsz", {**DELTA, "downlink_codec": "qsgd"}),
    ("fedsz, delta sign", "fedsz", {**DELTA, "downlink_codec": "sign"}),
    (
        "fedsz, delta sz3 (REL 2e-2, nopred)",
        "fedsz",
        {**DELTA, "downlink_codec": "sz3", "downlink_sz3_bound": 2e-2, "downlink_sz3_algo": "nopred"},
    ),
    ("fedsz, delta topk (k=5%)", "fedsz", {**DELTA, "downlink_codec": "topk", "downlink_topk_k": 0.05}),
    ("fedsz, delta eden", "fedsz", {**DELTA, "downlink_codec": "eden"}),
    # the mask methods: the whole coded θ every round, or only its changed symbols (their default)
    *((f"{m}, mask {d}", m, {"downlink": d}) for m in ("deltamask", "deltamask-exact", "fedpm") for d in ("full", "delta")),
]
TINY = dict(model="tiny", dataset="wordnet", clients=10, clients_per_round=5, train_size=400, test_size=200, local_steps=3, batch_size=8)


def parse_sets(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; values parsed as JSON where they are (numbers, booleans), else strings."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def run_setting(method: str, options: dict[str, Any], base: dict[str, Any], out: Path) -> dict[str, Any]:
    cfg = RunConfig(method=method, options=options, out=str(out), checkpoint=False, threads=1, seed=0, **base).validate()
    t0 = time.perf_counter()
    res = run_local(cfg, show_progress=False)
    final = res["final"]
    return {
        "method": method,
        "options": options,
        "accuracy": final["accuracy"],
        "mean_uplink_bpp": final["mean_uplink_bpp"],
        "mean_downlink_bpp": final["mean_downlink_bpp"],
        "downlink_bpp_per_round": [r["downlink_bpp"] for r in res["rounds"]],
        "accuracy_per_round": [r["accuracy"] for r in res["rounds"]],
        "dropped": sum(len(r["dropped"]) for r in res["rounds"]),
        "wall_s": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="run config key=value (e.g. model=minilm)")
    ap.add_argument("--only", action="append", default=[], help="run only the settings whose label contains this")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "downlink.json"))
    args = ap.parse_args()
    base = {**TINY, "rounds": args.rounds, **parse_sets(args.sets)}
    rows = []
    with tempfile.TemporaryDirectory(prefix="fsq-downlink-") as tmp:
        for i, (label, method, options) in enumerate(SETTINGS):
            if args.only and i > 0 and not any(s in label for s in args.only):
                continue
            row = {"label": label, **run_setting(method, options, base, Path(tmp) / f"run{i}")}
            rows.append(row)
            print(
                f"{label}: acc {row['accuracy']:.4f} up {row['mean_uplink_bpp']:.3f} bpp down {row['mean_downlink_bpp']:.3f} bpp",
                flush=True,
            )
    ref = rows[0]
    for row in rows:
        row["uplink_x_smaller"] = ref["mean_uplink_bpp"] / row["mean_uplink_bpp"]
        row["downlink_x_smaller"] = ref["mean_downlink_bpp"] / row["mean_downlink_bpp"]
        row["accuracy_minus_ref"] = row["accuracy"] - ref["accuracy"]
    result = {"config": base, "reference": ref["label"], "machine": platform.machine(), "settings": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
