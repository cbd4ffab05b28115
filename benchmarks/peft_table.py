"""Collect FedPEFT runs on the default task into one table (JSON + markdown).

The runs themselves are ordinary CLI runs, each wrapped in the shared heavy-run lock, e.g.::

    flock /tmp/fedsqueeze-heavy.lock env PYTHONPATH=src HF_HUB_OFFLINE=1 \\
        python -m fedsqueeze run --method lora --out /tmp/peft/lora-iid

This script reads their results.json files and writes benchmarks/results/peft.json; it prints the
markdown table used in docs/peft.md. Usage::

    python benchmarks/peft_table.py NAME=RUN_DIR [NAME=RUN_DIR ...] [--reference NAME]

``--reference`` names the run (normally full fedavg) that byte ratios are taken against.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "results" / "peft.json"


def row(name: str, res: dict[str, Any]) -> dict[str, Any]:
    """One table row from a results.json."""
    cfg, final, rounds = res["config"], res["final"], res["rounds"]
    return {
        "name": name,
        "method": res["method"],
        "partition": cfg["partition"] if cfg["partition"] == "iid" else f"dirichlet({cfg['alpha']})",
        "dropout": cfg["dropout"],
        "options": cfg["options"],
        "lr": cfg["lr"],
        "rounds": len(rounds),
        "model_params": res["model_params"],
        "trainable_params": res["trainable_params"],
        "final_accuracy": final["accuracy"],
        "best_accuracy": final.get("best_accuracy"),
        "accuracy_by_round": [r["accuracy"] for r in rounds],
        "total_uplink_bytes": final["total_uplink_bytes"],
        "total_downlink_bytes": final["total_downlink_bytes"],
        "mean_uplink_bpp": final["mean_uplink_bpp"],
        "mean_downlink_bpp": final["mean_downlink_bpp"],
        "uplink_bytes_per_client_round": rounds[0]["uplink_bytes"] / max(rounds[0]["clients_uploaded"], 1),
        "wall_s": final.get("wall_s"),
        "dropped_clients": final.get("dropped_clients", 0),
        "dp_epsilon": final.get("dp_epsilon"),
    }


def markdown(rows: list[dict[str, Any]], reference: dict[str, Any] | None) -> str:
    head = "| run | method | data | dropout | trainable | final acc | best acc | uplink bytes (total) | uplink bpp | % of ref. uplink | wall s |"
    lines = [head, "|---" * 11 + "|"]
    for r in rows:
        share = f"{100 * r['uplink_bytes_per_client_round'] / reference['uplink_bytes_per_client_round']:.3f}%" if reference else "—"
        lines.append(
            f"| {r['name']} | {r['method']} | {r['partition']} | {r['dropout']} | {r['trainable_params']:,} | "
            f"{r['final_accuracy']:.3f} | {r['best_accuracy']:.3f} | {r['total_uplink_bytes']:,} | "
            f"{r['mean_uplink_bpp']:.4f} | {share} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="+", help="NAME=RUN_DIR")
    p.add_argument("--reference", default=None, help="NAME of the run byte shares are relative to")
    args = p.parse_args()
    rows = []
    for spec in args.runs:
        name, _, path = spec.partition("=")
        rows.append(row(name, json.loads((Path(path) / "results.json").read_text())))
    reference = next((r for r in rows if r["name"] == args.reference), None)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"runs": rows, "reference": args.reference}, indent=2))
    print(markdown(rows, reference))


if __name__ == "__main__":
    main()
