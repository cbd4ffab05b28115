"""Import the runs behind the pre-pipeline README table into the default suite's results store.

Their results.json files were never committed; what the repository holds of them is the report
``fedsqueeze report`` made from them (docs/results/report.md at commit 9b0c742): per run, the
options, its totals and means, the trainable parameters and a per-round table (accuracy to 4 decimals, exact uplink and
downlink bytes, bpp to 4 significant digits, wall and simulated seconds to 0.1 s). This script turns
each per-round table back into a results.json with only those fields: ``loss`` is None (the report
does not give it), a round without a simulated time has no ``sim_time_s``, and the config holds
only the fields the report states (its task line, the fields it says differ, the options column).
Each record is stored with epoch ``pre-pipeline`` and an unknown code version, so the report marks
it stale and the suite replaces it when that entry is filled.

    python scripts/import_published.py [--commit 9b0c742] [--store results/default]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
from pathlib import Path
from typing import Any

from fedsqueeze.bench import load_suite
from fedsqueeze.config import parse_value
from fedsqueeze.results import summarize
from fedsqueeze.store import PRE_PIPELINE, make_record, write_record

SUITE = "benchmarks/suites/default.toml"


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _rows(text: str, heading: str) -> list[list[str]]:
    """The body rows of the first table after ``heading``."""
    lines = text.split(heading + "\n", 1)[1].splitlines()
    rows, started = [], False
    for line in lines:
        if line.startswith("|"):
            started = True
            rows.append(_cells(line))
        elif started:
            break
    return rows[2:]  # header and alignment rows


def _num(cell: str) -> float:
    return float(cell.replace(",", ""))


def _value(text: str) -> Any:
    return None if text == "None" else parse_value(text)


def parse_report(text: str) -> list[dict[str, Any]]:
    """One partial results.json per run of a ``fedsqueeze report`` report.md."""
    task = dict(pair.split("=", 1) for pair in re.search(r"^Task: (.*)\.$", text, re.M).group(1).split(", "))  # type: ignore[union-attr]
    base = {k: _value(v) for k, v in task.items()}
    model_params = int(_num(re.search(r"Model parameters \(bpp denominator\): ([\d,]+)", text).group(1)))  # type: ignore[union-attr]
    differs: dict[str, dict[str, Any]] = {}
    for name, detail in re.findall(r"^- \*\*(\w+) differs between runs\*\* \((.*)\): compare with care\.$", text, re.M):
        differs[name] = {m: _value(v) for m, v in (pair.rsplit(": ", 1) for pair in detail.split(", "))}
    table = {r[0]: r for r in _rows(text, "## Accuracy and bytes")}
    runs = []
    for method, options, _ in _rows(text, "## Runs"):
        config: dict[str, Any] = {"method": method, **base}
        for name, per_run in differs.items():
            if per_run.get(method) is None:
                config.pop(name, None)  # the run predates the field: it is not in its config
            else:
                config[name] = per_run[method]
        opts = {} if options == "defaults" else {k: parse_value(v) for k, v in (p.split("=", 1) for p in options.split(", "))}
        if "lr" in opts:
            config["lr"] = opts.pop("lr")
        config["options"] = opts
        rounds = []
        for r in _rows(text, f"### {method}"):
            rec: dict[str, Any] = {
                "round": int(r[0]),
                "accuracy": float(r[1]),
                "loss": None,
                "uplink_bytes": int(_num(r[2])),
                "downlink_bytes": int(_num(r[3])),
                "uplink_bpp": float(r[4]),
                "downlink_bpp": float(r[5]),
                "wall_s": float(r[6]),
            }
            if r[7] != "n/a":
                rec["sim_time_s"] = float(r[7])
            rounds.append(rec)
        final = summarize(rounds)
        # the run's own means and sums, as the report printed them (not re-derived from rounded rounds)
        row = table[method]
        final.update(mean_uplink_bpp=float(row[7]), mean_downlink_bpp=float(row[8]), wall_s=float(row[10]))
        if row[11] == "n/a":
            final.pop("sim_time_s")
        else:
            final["sim_time_s"] = float(row[11])
        runs.append(
            {
                "method": method,
                "config": config,
                "model_params": model_params,
                "trainable_params": int(_num(table[method][9])),
                "rounds": rounds,
                "final": final,
            }
        )
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--commit", default="9b0c742", help="the commit whose docs/results/report.md is read")
    ap.add_argument("--store", default=None, help="results store (default: the default suite's)")
    args = ap.parse_args()
    text = subprocess.run(["git", "show", f"{args.commit}:docs/results/report.md"], capture_output=True, text=True, check=True).stdout
    suite = load_suite(SUITE)
    store = Path(args.store) if args.store else suite.store
    source = (
        f"reconstructed from docs/results/report.md at commit {args.commit} (scripts/import_published.py): "
        "per-round accuracy, bytes, bpp (4 significant digits), wall and simulated seconds; no loss; config as far as the report states it"
    )
    for res in parse_report(text):
        seed = res["config"]["seed"]
        labels = {"task": "wordnet", "setting": "iid", "method": res["method"], "seed": seed}
        key = hashlib.sha256(
            json.dumps({"epoch": PRE_PIPELINE, "source": source, "config": res["config"]}, sort_keys=True).encode()
        ).hexdigest()[:16]
        code = {"version": None, "commit": None, "dirty": None}
        path = write_record(store, make_record(res, labels, suite.name, key, PRE_PIPELINE, code, source))
        print(f"{res['method']}: {res['final']['accuracy']:.4f} → {path}")


if __name__ == "__main__":
    main()
