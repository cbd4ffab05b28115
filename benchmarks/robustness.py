"""Robustness table: method family × attack, final accuracy under the plain rule and the robust ones.

A reduced task that trains in seconds (``--model tiny`` on Fashion-MNIST, 10 clients, 5 per round,
5 rounds): the absolute accuracies are low, the point is how far each attack moves them and how
much a robust rule gives back. 20% attackers (2 of 10 clients, a fixed seeded set). Writes
benchmarks/results/robustness.json and prints the markdown table of docs/strategies.md.

    PYTHONPATH=src python benchmarks/robustness.py                 # ~40 tiny runs
    PYTHONPATH=src python benchmarks/robustness.py --families fedavg --rounds 3
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# family -> (method, method options, the attacks to try, {rule label: options of that rule})
FAMILIES = {
    "fedavg (tensor)": (
        "fedavg",
        {},
        ["none", "sign_flip", "scale", "gaussian", "label_flip"],
        {"mean": {}, "median": {"robust": "median"}, "multi_krum f=2": {"robust": "multi_krum", "krum_f": 2}},
    ),
    "lora (PEFT)": (
        "lora",
        {"target_modules": "q_proj,v_proj"},  # the tiny ViT's attention projections
        ["none", "sign_flip", "scale", "gaussian", "label_flip"],
        {"mean": {}, "median": {"robust": "median"}},
    ),
    "deltamask (mask)": (
        "deltamask",
        {},
        ["none", "mask_all", "label_flip"],
        {"sum": {}, "client_flip_cap=0.5": {"client_flip_cap": 0.5}},
    ),
    "decomfl (ZO)": (
        "decomfl",
        {"params": "head"},
        ["none", "sign_flip", "scale", "zo_huge", "label_flip"],
        {"mean": {}, "median": {"aggregate": "median"}},
    ),
}


def run_one(method: str, options: dict, attack: str, args, out: Path) -> dict:
    from fedsqueeze.config import build_config
    from fedsqueeze.runtime.local import run_local

    run = {
        "method": method,
        "model": "tiny",
        "dataset": "fashion-mnist",
        "clients": 10,
        "clients_per_round": 5,
        "rounds": args.rounds,
        "train_size": args.train_size,
        "test_size": args.test_size,
        "local_steps": 10,
        "threads": 1,
        "seed": args.seed,
        "out": str(out),
        "overwrite": True,
        "checkpoint": False,
        "attack": attack,
        "attack_fraction": 0.2,
    }
    cfg = build_config(None, run, dict(options))
    t0 = time.perf_counter()
    res = run_local(cfg, show_progress=False)
    dropped = sum(len(r["dropped"]) for r in res["rounds"])
    return {"accuracy": res["final"]["accuracy"], "loss": res["rounds"][-1]["loss"], "dropped": dropped, "wall_s": time.perf_counter() - t0}


def table(rows: list[dict]) -> str:
    """Markdown: one row per family, one column per attack; each cell 'plain / best robust (rule)'."""
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    lines = ["| family | " + " | ".join(attacks) + " |", "|---|" + "---|" * len(attacks)]
    for family in dict.fromkeys(r["family"] for r in rows):
        cells = []
        for attack in attacks:
            got = [r for r in rows if r["family"] == family and r["attack"] == attack]
            if not got:
                cells.append("—")
                continue
            plain = next(r for r in got if r["plain"])
            robust = [r for r in got if not r["plain"]]
            best = max(robust, key=lambda r: r["accuracy"]) if robust else None
            cell = f"{plain['accuracy']:.3f}"
            if best:
                cell += f" / {best['accuracy']:.3f} ({best['rule']})"
            cells.append(cell)
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated family names (prefixes)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--train-size", type=int, default=1000)
    ap.add_argument("--test-size", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "robustness.json"))
    args = ap.parse_args()
    wanted = [f for f in FAMILIES if any(f.startswith(w.strip()) for w in args.families.split(","))]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in wanted:
            method, base, attacks, rules = FAMILIES[family]
            for attack in attacks:
                for i, (label, rule_opts) in enumerate(rules.items()):
                    got = run_one(method, {**base, **rule_opts}, attack, args, Path(tmp) / "run")
                    row = {
                        "family": family,
                        "method": method,
                        "attack": attack,
                        "rule": label,
                        "plain": i == 0,
                        "options": {**base, **rule_opts},
                        **got,
                    }
                    rows.append(row)
                    print(
                        f"{family:18} {attack:11} {label:15} acc {got['accuracy']:.3f} loss {got['loss']:.3g} dropped {got['dropped']}",
                        flush=True,
                    )
    setup = {
        "model": "tiny",
        "dataset": "fashion-mnist",
        "clients": 10,
        "clients_per_round": 5,
        "rounds": args.rounds,
        "train_size": args.train_size,
        "test_size": args.test_size,
        "local_steps": 10,
        "attack_fraction": 0.2,
        "seed": args.seed,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"setup": setup, "rows": rows}, indent=1) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
