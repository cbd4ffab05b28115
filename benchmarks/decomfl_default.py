"""The zeroth-order methods on the default task: accuracy per round and the exact bytes each client sent and received.

Builds the task once and plays each variant with the local simulator's own round loop, logging the
length of every message per client (results.json only keeps per-round sums). Heavy: run it under
the shared lock, e.g.

    flock /tmp/fedsqueeze-heavy.lock env PYTHONPATH=src HF_HUB_OFFLINE=1 \
        python benchmarks/decomfl_default.py --variants head-zo --out benchmarks/results/decomfl_default.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections import defaultdict
from pathlib import Path

from fedsqueeze.config import RunConfig
from fedsqueeze.methods import RoundContext, get_method
from fedsqueeze.results import ResultsWriter
from fedsqueeze.runtime.common import run_header
from fedsqueeze.runtime.local import run_round
from fedsqueeze.task import build_task


def feedsign_head(steps: int, lr: float, **options) -> dict:
    """A feedsign variant on the head with whole-client batches."""
    return {"method": "feedsign", "run": {"local_steps": steps, "lr": lr}, "options": {"params": "head", "zo_batch_size": -1, **options}}


VARIANTS: dict[str, dict] = {
    # name: (run fields, method options[, method]); the method is decomfl unless named
    "head-zo": {"run": {"local_steps": 20}, "options": {"params": "head", "zo_batch_size": -1}},
    "head-zo-lr1e-2": {"run": {"local_steps": 20, "lr": 1e-2}, "options": {"params": "head", "zo_batch_size": -1}},
    "head-zo-lr1e-1": {"run": {"local_steps": 20, "lr": 1e-1}, "options": {"params": "head", "zo_batch_size": -1}},
    "head-zo-warm300": {
        "run": {"local_steps": 20, "lr": 1e-2},
        "options": {"params": "head", "zo_batch_size": -1, "warm_start_steps": 300},
    },
    "head-zo-warm2": {"run": {"local_steps": 20, "lr": 1e-2}, "options": {"params": "head", "zo_batch_size": -1, "warm_start_rounds": 2}},
    "full-zo": {"run": {"local_steps": 10, "rounds": 3}, "options": {"params": "full"}},
    "warm-only": {"run": {"local_steps": 1, "lr": 1e-12}, "options": {"params": "head"}},
    # issue 18 screens: many cheap steps on the head (cached features), whole-client batches
    "head-k500-lr3e-3": {"run": {"local_steps": 500, "lr": 3e-3}, "options": {"params": "head", "zo_batch_size": -1}},
    "head-k500-lr1e-2": {"run": {"local_steps": 500, "lr": 1e-2}, "options": {"params": "head", "zo_batch_size": -1}},
    "head-k500-lr1e-2-warm300": {
        "run": {"local_steps": 500, "lr": 1e-2},
        "options": {"params": "head", "zo_batch_size": -1, "warm_start_steps": 300},
    },
    "fedkseed-head-k500": {
        "method": "fedkseed",
        "run": {"local_steps": 500, "lr": 1e-2},
        "options": {"params": "head", "zo_batch_size": -1, "pool_size": 1024},
    },
    "fedkseed-pro-head-k500": {
        "method": "fedkseed",
        "run": {"local_steps": 500, "lr": 1e-2},
        "options": {"params": "head", "zo_batch_size": -1, "pool_size": 1024, "importance": "pro"},
    },
    "feedsign-head-k4000": feedsign_head(4000, 1e-3),
    "feedsign-head-k2000": feedsign_head(2000, 1e-3),
    "feedsign-head-k2000-warm300": feedsign_head(2000, 1e-3, warm_start_steps=300),
    "feedsign-head-k8000-lr2.5e-4": feedsign_head(8000, 2.5e-4),
    "lora-k60": {"run": {"local_steps": 60, "lr": 2e-3}, "options": {"params": "lora"}},
}


def probe_ceiling(task, steps: int, lr: float) -> dict:
    """Centralised linear probing on all the training features (full batch, AdamW): the head's ceiling."""
    import torch
    from torch.nn import functional as F

    head = task.model.head
    feats, labels = task.frozen_features("train"), task.train.labels
    opt = torch.optim.AdamW(head.parameters(), lr=lr)
    curve = []
    for step in range(1, steps + 1):
        opt.zero_grad()
        F.cross_entropy(head(feats), labels).backward()
        opt.step()
        if step in (100, 300, 1000, 3000, steps):
            with torch.no_grad():
                acc = float((head(task.frozen_features("test")).argmax(1) == task.test.labels).float().mean())
            curve.append({"steps": step, "accuracy": acc})
            print(f"  probe {step} steps: {acc:.4f}", flush=True)
    return {"curve": curve, "lr": lr}


def play(cfg: RunConfig, task, pristine: dict, out_dir: Path | None) -> dict:
    """Run ``cfg`` on the shared ``task``; return accuracy per round and bytes per client."""
    task.model.load_state_dict(pristine)
    method = get_method(cfg.method)(cfg)
    method.setup(task)
    per_client: dict[int, int] = defaultdict(int)
    downlink, decode = method.downlink, method.decode_update

    def logged_downlink(state, ctx, client):
        msg = downlink(state, ctx, client)
        per_client[client] += len(msg)
        return msg

    def logged_decode(payload, client, state, ctx):
        per_client[client] += len(payload)
        return decode(payload, client, state, ctx)

    method.downlink, method.decode_update = logged_downlink, logged_decode
    state = method.init_server()
    client_states: dict = {}
    writer = ResultsWriter(str(out_dir) if out_dir else cfg.out, run_header(cfg, task.model_params, method.trainable_params(), "local"))
    rounds = []
    for r in range(1, cfg.rounds + 1):
        ctx = RoundContext(round=r, rounds=cfg.rounds, seed=cfg.seed)
        state, record = run_round(method, task, cfg, state, client_states, ctx)
        writer.add_round(record)
        keep = (
            "round",
            "accuracy",
            "loss",
            "uplink_bytes",
            "downlink_bytes",
            "wall_s",
            "train_loss",
            "zo_scalar_abs_mean",
            "vote_agreement",
        )
        rounds.append({k: record[k] for k in keep if k in record})
        print(
            f"  round {r:2d} acc {record['accuracy']:.4f} up {record['uplink_bytes']} down {record['downlink_bytes']} {record['wall_s']:.1f}s",
            flush=True,
        )
    if out_dir:
        writer.write_json()
    totals = [per_client.get(c, 0) for c in range(cfg.clients)]
    return {
        "method": cfg.method,
        "options": cfg.options,
        "local_steps": cfg.local_steps,
        "lr": method.lr,
        "rounds": rounds,
        "final_accuracy": rounds[-1]["accuracy"],
        "bytes_per_client": totals,
        "max_bytes_per_client": max(totals),
        "mean_bytes_per_client": sum(totals) / len(totals),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="head-zo")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--out", default="benchmarks/results/decomfl_default.json")
    ap.add_argument("--runs-dir", default="", help="also write each variant's results.json under this folder")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    base = RunConfig(method="decomfl", rounds=args.rounds, model=args.model, threads=args.threads).validate()
    t0 = time.perf_counter()
    task = build_task(base)
    task.frozen_features("train"), task.frozen_features("test")
    pristine = copy.deepcopy(task.model.state_dict())
    print(f"task ready in {time.perf_counter() - t0:.0f}s", flush=True)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    for name in args.variants.split(","):
        if name == "probe-ceiling":
            results[name] = probe_ceiling(task, 3000, 1e-2)
            task.model.load_state_dict(pristine)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1))
            continue
        v = VARIANTS[name]
        run = {"rounds": args.rounds, **v["run"]}
        cfg = RunConfig(
            method=v.get("method", "decomfl"), model=args.model, threads=args.threads, **run, options=dict(v["options"])
        ).validate()
        print(name, flush=True)
        t = time.perf_counter()
        run_dir = Path(args.runs_dir) / name if args.runs_dir else None
        results[name] = {**play(cfg, task, pristine, run_dir), "wall_s": time.perf_counter() - t}
        print(
            f"  bytes per client: max {results[name]['max_bytes_per_client']} mean {results[name]['mean_bytes_per_client']:.0f}", flush=True
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
