"""Accuracy against client compute and against bytes (both ways), zeroth-order and first-order runs on the same axes.

Reads results.json files of runs (``--runs NAME=PATH ...``; a results-store entry of results/ works
too) and writes ``benchmarks/results/zo_compare.json`` and the picture ``docs/zo-compare.png``.

Compute is counted per client in *forward-pass equivalents of the whole model on one example*:
a forward is 1, a backward ≈ 2 (so a first-order step on a batch of B costs 3·B); a central
zeroth-order step costs 2·B (two forwards; regenerating z is not counted); the methods that train
only the head on cached backbone features pay one forward per example of the client, once (the
cache), then each step on the cache costs its forwards scaled by trainable / model parameters (the
head's matmul against the whole model's). ``params=top`` caches the lower layers' output in that
same pass, and each of its evaluations costs the top layers' share of a forward (the round's
``zo_forward_share``, top_layers / layers). A zeroth-order step with P perturbations costs P times one
with one (P per round from the round's ``zo_perturbations``, which ``adjust_perturb`` changes); the
moment buffers of ``momentum`` / ``adam_beta2`` cost no forwards and are not counted. Warm-start rounds of the ZO methods are linear probing on
the cache (their 100 steps are counted the same way). Bytes are the run's real
uplink + downlink bytes per round divided by the number of clients (the mean client).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(path: str) -> dict:
    data = json.loads(Path(path).read_text())
    return data.get("results", data)  # a results-store entry wraps the run's results


def head_only(res: dict) -> bool:
    cfg = res["config"]
    return cfg["method"] == "head" or (cfg.get("options") or {}).get("params") == "head"


def perturbations(res: dict, record: dict) -> int:
    """P of a zeroth-order round: the round's own metric (adjust_perturb), else the option, else 1."""
    return int(record.get("zo_perturbations") or (res["config"].get("options") or {}).get("perturbations", 1))


def curves(res: dict) -> dict:
    """Cumulative per-client compute and bytes, and accuracy, after each round."""
    cfg = res["config"]
    clients, per_client_examples = cfg["clients"], cfg["train_size"] / cfg["clients"]
    warm = (cfg.get("options") or {}).get("warm_start_rounds", 1) if cfg["method"] in ("decomfl", "fedkseed", "feedsign") else 0
    zo = cfg["method"] in ("decomfl", "fedkseed", "feedsign")
    batch = cfg["batch_size"]
    zo_batch = (cfg.get("options") or {}).get("zo_batch_size", 0)
    zo_batch = per_client_examples if zo_batch == -1 else (zo_batch or batch)
    head_share = res["trainable_params"] / res["model_params"] if head_only(res) else 10_010 / res["model_params"]
    warm_steps = (cfg.get("options") or {}).get("warm_start_steps", 100)
    compute, nbytes, seen = 0.0, 0.0, False
    out = {"round": [], "accuracy": [], "compute": [], "bytes": []}
    for r in res["rounds"]:
        participants = r.get("clients_uploaded", cfg["clients_per_round"])
        if not seen:  # every client caches its features once (head-only methods, ZO warm start; params=top caches its
            # lower layers' output in the same pass)
            compute += per_client_examples if (head_only(res) or warm) else 0.0
            seen = True
        if zo and r["round"] <= warm:
            step = 3 * batch * warm_steps * head_share
        elif head_only(res):
            step = (2 * zo_batch * perturbations(res, r) if zo else 3 * batch) * cfg["local_steps"] * head_share
        elif zo:  # params=top: each evaluation runs only the top layers (their share of a forward)
            step = 2 * zo_batch * perturbations(res, r) * cfg["local_steps"] * r.get("zo_forward_share", 1.0)
        else:
            step = 3 * batch * cfg["local_steps"]
        compute += step * participants / clients
        nbytes += (r["uplink_bytes"] + r["downlink_bytes"]) / clients
        for k, v in (("round", r["round"]), ("accuracy", r["accuracy"]), ("compute", compute), ("bytes", nbytes)):
            out[k].append(v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", required=True, help="LABEL=path/to/results.json")
    ap.add_argument("--out", default="benchmarks/results/zo_compare.json")
    ap.add_argument("--png", default="docs/zo-compare.png")
    ap.add_argument("--title", default="", help="the setting of the runs (printed above the plots)")
    args = ap.parse_args()
    table = {}
    for spec in args.runs:
        label, path = spec.rsplit("=", 1)  # a label may hold "=", a path rarely does
        res = load(path)
        table[label] = {"source": path, "method": res["config"]["method"], **curves(res)}
    Path(args.out).write_text(json.dumps(table, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, c in table.items():
        style = "-o" if c["method"] in ("decomfl", "fedkseed", "feedsign") else "--s"
        a.plot(c["compute"], c["accuracy"], style, ms=3, label=label)
        b.plot(c["bytes"], c["accuracy"], style, ms=3, label=label)
    a.set_xscale("log")
    a.set_xlabel("client compute, forward-pass equivalents per client (cumulative)")
    b.set_xscale("log")
    b.set_xlabel("bytes per client, uplink + downlink (cumulative)")
    b.axvline(100_000, color="grey", lw=0.8, ls=":")
    for ax in (a, b):
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    b.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{args.title}; solid = zeroth-order, dashed = first-order", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    for label, c in table.items():
        print(f"{label:28s} acc {c['accuracy'][-1]:.3f}  compute {c['compute'][-1]:,.0f}  bytes/client {c['bytes'][-1]:,.0f}")


if __name__ == "__main__":
    main()
