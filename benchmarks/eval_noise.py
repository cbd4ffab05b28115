"""How much of a paired accuracy difference is test-set noise? Evaluate finished runs on a larger test set.

The default task evaluates every run on the same 1,000 test glosses (the split depends on the
split seed only). For two finished runs A and B of one seed, this script evaluates each final
model (its checkpoint's server state) on those 1,000 glosses and on ``--extra`` more glosses that no
run trained on (the dataset's pool beyond the training split), keeping each example's correctness.

For a pair, the test-sampling standard deviation of the difference acc(A) - acc(B) measured on n
examples is ``sqrt(p10 + p01 - (p10 - p01)^2) / sqrt(n)`` (p10: share of examples A gets right and B
wrong), far below the binomial sd of one accuracy when the two models agree on most examples. Set
next to the seed-to-seed sd of the same difference (from the results store), it says whether a
larger test set or more seeds cuts a claim's noise cheaper.

    python benchmarks/eval_noise.py RUN_DIR... [--extra 9000]   # RUN_DIR: finished runs (config.toml + checkpoint)

Writes benchmarks/results/eval_noise.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsqueeze.config import build_config
from fedsqueeze.data import load_dataset
from fedsqueeze.models import load_model
from fedsqueeze.runtime.checkpoint import load_checkpoint
from fedsqueeze.runtime.engine import prepare
from fedsqueeze.task import encode_split
from fedsqueeze.training import batch_inputs

OUT = Path(__file__).parent / "results" / "eval_noise.json"


def correctness(run_dir: Path, extra: int) -> dict[str, Any]:
    """Per-example correctness of a finished run's final model on the standard test set and ``extra`` more."""
    cfg = build_config(run_dir / "config.toml", {"out": str(run_dir)})
    ckpt = load_checkpoint(run_dir)
    if ckpt is None or ckpt.round != cfg.rounds:
        raise SystemExit(f"{run_dir}: not a finished run (checkpoint at round {ckpt.round if ckpt else None} of {cfg.rounds})")
    method, task = prepare(cfg)
    n_test, n_train = cfg.test_size, cfg.train_size
    # the pool's permutation puts the test split first and the training split next: examples past both
    # were never trained on; the first n_test of this larger "test" split are the standard test set
    raw = load_dataset(cfg.dataset, 1, n_test + n_train + extra, cfg.text_column, cfg.label_column)
    idx = np.concatenate([np.arange(n_test), np.arange(n_test + n_train, n_test + n_train + extra)])
    split = raw.test.take(idx)
    tokenizer = load_model(cfg.model, raw.kind, raw.num_classes, cfg.seed).tokenizer
    big = encode_split(split, tokenizer, cfg.max_length)
    if not torch.equal(big.labels[:n_test], task.test.labels):
        raise SystemExit("the first examples of the larger split are not the run's test set")
    seen: list[torch.Tensor] = []

    def recording_evaluate(model, data, batch_size=128, forward=None):  # the task's own evaluation, per example
        forward = forward or (lambda inputs: model(**inputs))
        model.eval()
        with torch.no_grad():
            for start in range(0, len(data), batch_size):
                b = torch.arange(start, min(start + batch_size, len(data)))
                seen.append(forward(batch_inputs(data, b)).argmax(-1) == data.labels[b])
        right = torch.cat(seen)
        return float(right.float().mean()), 0.0

    import sys

    from fedsqueeze import training

    original = training.evaluate
    for name, mod in list(sys.modules.items()):  # every module that imported training.evaluate by name
        if name.startswith("fedsqueeze") and vars(mod).get("evaluate") is original:
            mod.evaluate = recording_evaluate  # type: ignore[attr-defined]
    task.test = big
    task._features.pop("test", None)  # the head method's cached test features belong to the old split
    started = time.perf_counter()
    method.evaluate(ckpt.server_state)
    seconds = time.perf_counter() - started
    right = torch.cat(seen).numpy().astype(bool)
    recorded = ckpt.rounds[-1]["accuracy"]
    return {
        "run": run_dir.name,
        "method": cfg.method,
        "seed": cfg.seed,
        "recorded_accuracy": recorded,
        "accuracy_test": float(right[:n_test].mean()),  # equals recorded_accuracy: the same model, the same test set
        "accuracy_extra": float(right[n_test:].mean()),
        "eval_seconds": seconds,
        "examples": int(len(right)),
        "_right": right,
    }


def pair_sd(a: np.ndarray, b: np.ndarray) -> float:
    """Test-sampling sd of mean(a) - mean(b) over the same n examples (a, b: per-example correctness)."""
    p10, p01 = float(np.mean(a & ~b)), float(np.mean(~a & b))
    return math.sqrt(max(p10 + p01 - (p10 - p01) ** 2, 0.0) / len(a))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--extra", type=int, default=9000, help="glosses beyond the training split to evaluate on too")
    args = ap.parse_args()
    models = [correctness(d, args.extra) for d in args.runs]
    n_test = min(len(m["_right"]) for m in models) - args.extra
    pairs = []
    for a, b in itertools.combinations(models, 2):
        ra, rb = a["_right"], b["_right"]
        pairs.append(
            {
                "a": a["method"],
                "b": b["method"],
                "diff_test": float(ra[:n_test].mean() - rb[:n_test].mean()),
                "diff_extra": float(ra[n_test:].mean() - rb[n_test:].mean()),
                "test_sd_of_diff_on_test_set": pair_sd(ra[:n_test], rb[:n_test]),
                "test_sd_of_diff_on_all": pair_sd(ra, rb),
                "binomial_sd_one_accuracy_on_test_set": math.sqrt(ra[:n_test].mean() * (1 - ra[:n_test].mean()) / n_test),
                "test_set": n_test,
                "examples_all": int(len(ra)),
            }
        )
    out = {"runs": [{k: v for k, v in m.items() if not k.startswith("_")} for m in models], "pairs": pairs}
    OUT.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
