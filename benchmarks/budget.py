"""Budget controller benchmark: achieved against target uplink bits per parameter, every round and client.

Summarises finished runs (``fedsqueeze run ... --set budget_bpp=X --out DIR``) against baselines
without a budget (a run directory or a record of the results store, results/default/KEY.json):
per round the reported ``uplink_bpp``, each client's own bits per model parameter (from the link
model's per-client bytes), the knob the controller chose (``budget_bound`` for fedsz,
``budget_flips`` for deltamask), accuracy and codec seconds, and whether every client landed
within ±10% of the target.

    python benchmarks/budget.py --run fedsz-1.0=/tmp/budget-fedsz --baseline fedsz=results/default/40a5bdef9a3208f0.json \\
        [--run NAME=DIR ...] [--baseline NAME=PATH ...] [--note NAME=TEXT ...] [--out benchmarks/results/budget.json]

A run's baseline is the one whose NAME is the part of the run's NAME before the first '-'.
benchmarks/results/budget.json came from the three runs of docs/codecs.md ("An uplink budget") and::

    python benchmarks/budget.py \
     --run fedsz-1.0=/tmp/budget-fedsz --baseline fedsz=results/default/40a5bdef9a3208f0.json \
     --note "fedsz=..." --run deltamask-0.018=/tmp/budget-deltamask --run deltamask-0.03=/tmp/budget-deltamask-0.03 \
     --note "deltamask-0.03=..." --baseline deltamask=/tmp/budget-deltamask-0.03 --note "deltamask=..."

(the notes, in full, are in the JSON).
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path
from typing import Any

PROMISE = 0.10  # every client within ±10% of the target
ROUND_KEYS = ("round", "accuracy", "uplink_bpp", "codec_s", "train_s", "wall_s", "budget_bound", "budget_bound_min", "budget_bound_max")


def load_results(path: Path) -> dict[str, Any]:
    """results.json's content from a run directory, a results.json or a results-store record."""
    if path.is_dir():
        path = path / "results.json"
    data = json.loads(path.read_text())
    return data["results"] if "results" in data and "rounds" not in data else data


def round_row(r: dict[str, Any], model_params: int, target: float | None) -> dict[str, Any]:
    """One round's numbers; with a target, each client's ratio to it and whether all are within the promise."""
    row = {k: r[k] for k in ROUND_KEYS if r.get(k) is not None}
    if r.get("budget_flips") is not None:
        row["budget_flips"] = r["budget_flips"]
    clients = [c["uplink_bytes"] * 8 / model_params for c in r.get("sim_clients", [])]
    row["client_uplink_bpp"] = clients
    if target:
        ratios = [b / target for b in clients]
        row["client_ratio_min"], row["client_ratio_max"] = min(ratios), max(ratios)
        row["within_10pct"] = all(abs(x - 1) <= PROMISE for x in ratios) and abs(r["uplink_bpp"] / target - 1) <= PROMISE
    return row


def summarise(res: dict[str, Any], target: float | None) -> dict[str, Any]:
    """A run: its method, options, per-round rows and the means over its rounds."""
    cfg = res["config"]
    rounds = [round_row(r, res["model_params"], target) for r in res["rounds"]]
    out: dict[str, Any] = {
        "method": res["method"],
        # the default task's command with this run's method, rounds, threads and budget (its other fields are the default task's)
        "command": f"fedsqueeze run --config examples/default.toml --method {res['method']} --rounds {cfg.get('rounds')} "
        f"--set threads={cfg.get('threads')}" + (f" --set budget_bpp={cfg['budget_bpp']:g}" if cfg.get("budget_bpp") else ""),
        "rounds_run": len(rounds),
        "budget_bpp": target,
        "options": cfg.get("options", {}),
        "threads": cfg.get("threads"),
        "final_accuracy": rounds[-1]["accuracy"] if rounds else None,
        "mean_uplink_bpp": sum(r["uplink_bpp"] for r in rounds) / len(rounds),
        "mean_codec_s": sum(r.get("codec_s", 0.0) for r in rounds) / len(rounds),
        "rounds": rounds,
    }
    if target:
        out["every_round_within_10pct"] = all(r["within_10pct"] for r in rounds)
        out["worst_client_miss"] = max(max(abs(r["client_ratio_min"] - 1), abs(r["client_ratio_max"] - 1)) for r in rounds)
    return out


def named(pairs: list[str]) -> dict[str, Path]:
    out = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep:
            raise SystemExit(f"expected NAME=PATH, got {pair!r}")
        out[name] = Path(path)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", default=[], help="NAME=DIR of a run with budget_bpp set")
    ap.add_argument("--baseline", action="append", default=[], help="NAME=PATH of the same job without a budget")
    ap.add_argument("--note", action="append", default=[], help="NAME=TEXT: a note on a run or baseline")
    ap.add_argument("--out", default="benchmarks/results/budget.json")
    args = ap.parse_args()
    notes = dict(n.partition("=")[::2] for n in args.note)
    baselines = {name: load_results(p) for name, p in named(args.baseline).items()}
    result: dict[str, Any] = {
        "what": "budget controller: per-round uplink bits per model parameter against the target budget_bpp (default task unless noted)",
        "summarised_at": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "promise": "every client of every round within ±10% of budget_bpp (uplink_bytes · 8 / model_params)",
        "runs": {},
        "baselines": {},
    }
    for name, path in named(args.run).items():
        res = load_results(path)
        run = summarise(res, float(res["config"]["budget_bpp"]))
        base = baselines.get(name.split("-")[0])
        if base is not None:  # the baseline's first rounds, as many as the run played
            base_rows = [round_row(r, base["model_params"], None) for r in base["rounds"][: run["rounds_run"]]]
            run["vs_baseline"] = {
                "accuracy_at_last_round": base_rows[-1]["accuracy"],
                "mean_uplink_bpp": sum(r["uplink_bpp"] for r in base_rows) / len(base_rows),
                "mean_codec_s": sum(r.get("codec_s", 0.0) for r in base_rows) / len(base_rows),
            }
        result["runs"][name] = {**({"note": notes[name]} if name in notes else {}), **run}
    for name, base in baselines.items():
        result["baselines"][name] = {**({"note": notes[name]} if name in notes else {}), **summarise(base, None)}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for name, run in result["runs"].items():
        print(
            f"{name}: target {run['budget_bpp']} bpp, mean {run['mean_uplink_bpp']:.4f}, worst client miss {run['worst_client_miss']:.1%}, "
            f"all within ±10%: {run['every_round_within_10pct']}, accuracy {run['final_accuracy']} "
            f"(baseline {run.get('vs_baseline', {}).get('accuracy_at_last_round')})"
        )


if __name__ == "__main__":
    main()
