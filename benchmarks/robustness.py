"""Robustness table: method family × attack, final accuracy under the plain rule and the robust ones.

A reduced task that trains in about half a minute a run (``--model tiny`` on Fashion-MNIST) but is
set up so that a 3-point claim can be read off it:

- every client takes part in every round (10 clients, 10 per round), so 20% attackers are exactly
  2 of the 10 updates of every round (with 5 sampled of 10, a round held 0 to 2 of them);
- 15 rounds of 20 local steps (fedavg at lr 3e-3: a random model needs a larger step than the
  pre-trained default), so the no-attack run learns (≈0.69 for fedavg);
- 4000 test examples: the 95% binomial half-width of one accuracy near 0.7 is
  1.96·√(0.7·0.3/4000) = 1.4 points (each row carries its own ``ci95``);
- ``--seeds 0,1,2`` repeats each cell over run seeds (the table shows their mean).

Writes benchmarks/results/robustness.json (``--merge`` keeps the rows of the families not run now)
and prints the markdown table of docs/strategies.md.

    PYTHONPATH=src python benchmarks/robustness.py                          # every family, seed 0
    PYTHONPATH=src python benchmarks/robustness.py --families fedavg --seeds 1,2 --merge
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TENSOR_ATTACKS = ["none", "sign_flip", "scale", "gaussian", "label_flip"]
MASK_ATTACKS = ["none", "mask_all", "label_flip"]
# f = 2: the attackers in every round (2 of the 10 updates); multi-Krum then averages k − f = 8
KRUM = {"robust": "multi_krum", "krum_f": 2}

# family -> (method, method options, the attacks to try, {rule label: options of that rule}); the first rule is the plain one
FAMILIES = {
    "fedavg (tensor)": (
        "fedavg",
        {},
        TENSOR_ATTACKS,
        {
            "mean": {},
            "median": {"robust": "median"},
            "trimmed_mean β=0.2": {"robust": "trimmed_mean", "trim_beta": 0.2},
            "multi_krum f=2": KRUM,
            "centered_clip": {"robust": "centered_clip"},
        },
    ),
    "lora (PEFT)": (
        "lora",
        {"target_modules": "q_proj,v_proj"},  # the tiny ViT's attention projections
        TENSOR_ATTACKS,
        {"mean": {}, "multi_krum f=2": KRUM},
    ),
    "fedpm (mask)": (
        "fedpm",
        {},
        MASK_ATTACKS,
        {"sum": {}, "client_flip_cap=0.5": {"client_flip_cap": 0.5}, "vote_trim=0.2": {"vote_trim": 0.2}},
    ),
    "deltamask (mask)": (
        "deltamask",
        {},
        MASK_ATTACKS,
        {"sum": {}, "vote_trim=0.2": {"vote_trim": 0.2}},
    ),
    "decomfl (ZO)": (
        "decomfl",
        {"params": "head", "warm_start_rounds": 0},  # no linear-probing warm start: every round is zeroth-order, so attackable
        ["none", "sign_flip", "scale", "gaussian", "zo_huge", "label_flip"],
        {
            "mean": {},
            "median": {"aggregate": "median"},
            "trimmed_mean β=0.2": {"aggregate": "trimmed_mean", "trim_beta": 0.2},
            "multi_krum f=2": {"aggregate": "multi_krum", "krum_f": 2},
        },
    ),
}
RUN_LR = {"fedavg": 3e-3, "decomfl": 5e-2}  # run-level lr per method (others: the method's default)


def setup(args) -> dict:
    """The run settings every cell shares."""
    return {
        "model": "tiny",
        "dataset": "fashion-mnist",
        "clients": 10,
        "clients_per_round": 10,
        "rounds": args.rounds,
        "train_size": args.train_size,
        "test_size": args.test_size,
        "local_steps": args.local_steps,
        "attack_fraction": 0.2,
        "attack_scale": 10.0,
        "threads": 1,
        "lr": RUN_LR,
    }


def kept_rows(old: dict, new_setup: dict, redone: set[tuple]) -> list[dict]:
    """The rows of an earlier JSON that still hold under ``new_setup`` and are not redone now: same
    settings, and the same run-level lr for the row's method (a method's lr changed: its rows go)."""
    same = {k: v for k, v in old.get("setup", {}).items() if k != "lr"} == {k: v for k, v in new_setup.items() if k != "lr"}
    if not same:
        return []
    lr_old, lr_new = old["setup"].get("lr", {}), new_setup["lr"]
    return [
        r
        for r in old["rows"]
        if lr_old.get(r["method"], 0.0) == lr_new.get(r["method"], 0.0) and (r["family"], r["attack"], r["rule"], r["seed"]) not in redone
    ]


def ci95(accuracy: float, n: int) -> float:
    """The 95% binomial (normal-approximation) half-width of an accuracy measured on n examples."""
    return 1.96 * math.sqrt(max(accuracy * (1 - accuracy), 0.0) / n)


def run_one(method: str, options: dict, attack: str, seed: int, args, out: Path) -> dict:
    from fedsqueeze.config import build_config
    from fedsqueeze.runtime.local import run_local

    run = {k: v for k, v in setup(args).items() if k != "lr"}
    run.update(method=method, seed=seed, out=str(out), overwrite=True, checkpoint=False, attack=attack, lr=RUN_LR.get(method, 0.0))
    cfg = build_config(None, run, dict(options))
    t0 = time.perf_counter()
    res = run_local(cfg, show_progress=False)
    rounds = res["rounds"]
    dropped = sum(len(r["dropped"]) for r in rounds)
    acc = res["final"]["accuracy"]
    return {
        "accuracy": acc,
        "ci95": ci95(acc, args.test_size),
        "by_round": [round(r["accuracy"], 4) for r in rounds],
        "loss": rounds[-1]["loss"],
        "dropped": dropped,
        "wall_s": time.perf_counter() - t0,
    }


def row_order(row: dict) -> tuple:
    """Rows in FAMILIES' order: family, attack, rule, then seed."""
    families = list(FAMILIES)
    if row["family"] not in FAMILIES:
        return (len(families), row["family"], row["attack"], row["rule"], row["seed"])
    _, _, attacks, rules = FAMILIES[row["family"]]
    return (families.index(row["family"]), "", attacks.index(row["attack"]), list(rules).index(row["rule"]), row["seed"])


def mean_accuracy(rows: list[dict]) -> float:
    return sum(r["accuracy"] for r in rows) / len(rows)


def table(rows: list[dict]) -> str:
    """Markdown: one row per family and rule, one column per attack; each cell the final accuracy
    (mean over the seeds run) and, under an attack, its change in points from the same rule without
    one (over the seeds both were run with)."""
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    lines = ["| family | rule | " + " | ".join(attacks) + " |", "|---|---|" + "---|" * len(attacks)]
    for family in dict.fromkeys(r["family"] for r in rows):
        for rule in dict.fromkeys(r["rule"] for r in rows if r["family"] == family):
            base = [r for r in rows if r["family"] == family and r["rule"] == rule and r["attack"] == "none"]
            cells = []
            for attack in attacks:
                got = [r for r in rows if r["family"] == family and r["rule"] == rule and r["attack"] == attack]
                if not got:
                    cells.append("—")
                    continue
                cell = f"{mean_accuracy(got):.3f}"
                seeds = {r["seed"] for r in got}
                paired = [r for r in base if r["seed"] in seeds]  # the change is over the seeds both were run with
                if len(seeds) > 1:
                    cell += f" [{len(seeds)} seeds]"
                if paired and attack != "none":
                    mine = [r for r in got if r["seed"] in {b["seed"] for b in paired}]
                    cell += f" ({100 * (mean_accuracy(mine) - mean_accuracy(paired)):+.1f})"
                cells.append(cell)
            lines.append(f"| {family} | {rule} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated family names (prefixes)")
    ap.add_argument("--attacks", default="", help="comma-separated attacks to run (default: each family's list)")
    ap.add_argument("--rules", default="", help="comma-separated rule labels to run (default: each family's list)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--local-steps", type=int, default=20)
    ap.add_argument("--train-size", type=int, default=4000)
    ap.add_argument("--test-size", type=int, default=4000)
    ap.add_argument("--seeds", default="0", help="comma-separated run seeds")
    ap.add_argument("--merge", action="store_true", help="keep the rows of --out that this run does not redo (same setup)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "robustness.json"))
    args = ap.parse_args()
    wanted = [f for f in FAMILIES if any(f.startswith(w.strip()) for w in args.families.split(","))]
    only_attacks = {a for a in args.attacks.split(",") if a}
    only_rules = {r for r in args.rules.split(",") if r}
    seeds = [int(s) for s in args.seeds.split(",")]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in wanted:
            method, base, attacks, rules = FAMILIES[family]
            for attack in attacks:
                if only_attacks and attack not in only_attacks:
                    continue
                for i, (label, rule_opts) in enumerate(rules.items()):
                    if only_rules and label not in only_rules:
                        continue
                    for seed in seeds:
                        got = run_one(method, {**base, **rule_opts}, attack, seed, args, Path(tmp) / "run")
                        rows.append(
                            {
                                "family": family,
                                "method": method,
                                "attack": attack,
                                "rule": label,
                                "plain": i == 0,
                                "seed": seed,
                                "options": {**base, **rule_opts},
                                **got,
                            }
                        )
                        print(
                            f"{family:18} {attack:11} {label:20} seed {seed} acc {got['accuracy']:.3f} ±{got['ci95']:.3f} "
                            f"loss {got['loss']:.3g} dropped {got['dropped']} {got['wall_s']:.0f}s",
                            flush=True,
                        )
    out = Path(args.out)
    if args.merge and out.exists():
        old = json.loads(out.read_text())
        rows = kept_rows(old, setup(args), {(r["family"], r["attack"], r["rule"], r["seed"]) for r in rows}) + rows
    rows.sort(key=row_order)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"setup": setup(args), "rows": rows}, indent=1) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
