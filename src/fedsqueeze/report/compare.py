"""Compare runs: report.md and plots from their results.json (runs are made by :mod:`fedsqueeze.runners`).

Everything here reads only results.json files, so ``fedsqueeze report`` (alias
``plot``) rebuilds the same report from runs made elsewhere, by anyone, at any time.

Outputs in the report directory:

- ``report.md``: per method, final accuracy, bytes (total and mean per round, both directions),
  bpp, wall and simulated time, ratios against ``fedavg``, and time to a target accuracy.
- ``pareto.png``: accuracy against cumulative uplink bytes (log x), one point per round.
- ``accuracy.png``: accuracy per round.
- ``bpp.png``: uplink and downlink bits per parameter per round (log y).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from fedsqueeze.errors import ConfigError
from fedsqueeze.report.plots import write_plots

log = logging.getLogger("fedsqueeze")

# Config fields that define the task: runs compared side by side should agree on all of them.
TASK_FIELDS = (
    "model",
    "dataset",
    "clients",
    "clients_per_round",
    "rounds",
    "seed",
    "partition",
    "alpha",
    "train_size",
    "test_size",
    "max_length",
    "local_steps",
    "local_epochs",
    "batch_size",
    "dropout",
)
LINK_FIELDS = ("uplink_mbps", "downlink_mbps", "latency_ms", "link_spread")
DEFAULT_TARGET_FRACTION = 0.9  # default target: this share of the best final accuracy among the runs


# ---- reading ---------------------------------------------------------------------------------------
def find_results(paths: list[str | Path]) -> list[Path]:
    """results.json files from paths that are files, run directories or a compare directory."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            found.append(p)
        elif (p / "results.json").is_file():
            found.append(p / "results.json")
        elif p.is_dir() and sorted(p.glob("*/results.json")):
            found.extend(sorted(p.glob("*/results.json")))
        else:
            raise ConfigError(f"no results.json at {str(p)!r}")
    return found


def load_results(paths: list[str | Path]) -> list[dict[str, Any]]:
    """Read results.json files; each gains ``_path`` (where it came from)."""
    results = []
    for path in find_results(paths):
        try:
            res = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read {str(path)!r}: {exc}") from exc
        if not isinstance(res, dict) or not res.get("rounds") or "method" not in res:
            raise ConfigError(f"{str(path)!r} is not a fedsqueeze results.json with at least one round")
        res["_path"] = str(path)
        results.append(res)
    return results


def labels_for(results: list[dict[str, Any]]) -> list[str]:
    """A unique display name per run: the method, plus its directory when a method appears twice."""
    counts = Counter(r["method"] for r in results)
    labels = []
    for r in results:
        label = r["method"]
        if counts[label] > 1:
            label = f"{label} ({Path(r.get('_path', '')).parent.name or '?'})"
        while label in labels:
            label += "'"
        labels.append(label)
    return labels


def baseline_index(results: list[dict[str, Any]]) -> int | None:
    """The run ratios are taken against: plain fedavg (float32 both ways) if present."""
    plain = [
        i
        for i, r in enumerate(results)
        if r["method"] == "fedavg"
        and r.get("config", {}).get("options", {}).get("uplink_codec", "raw") == "raw"
        and r.get("config", {}).get("options", {}).get("downlink_codec", "raw") == "raw"
    ]
    anyf = [i for i, r in enumerate(results) if r["method"] == "fedavg"]
    found = plain or anyf
    return found[0] if found else None


def default_target(results: list[dict[str, Any]]) -> float:
    """90% of the best final accuracy among the runs."""
    return DEFAULT_TARGET_FRACTION * max(r["final"]["accuracy"] for r in results)


def time_to_target(res: dict[str, Any], target: float) -> dict[str, Any] | None:
    """The first round whose accuracy reaches ``target``, with the cumulative costs up to it."""
    up = down = 0
    wall = sim = 0.0
    has_sim = all("sim_time_s" in r for r in res["rounds"])
    for r in res["rounds"]:
        up += r["uplink_bytes"]
        down += r["downlink_bytes"]
        wall += r["wall_s"]
        sim += r.get("sim_time_s", 0.0)
        if r["accuracy"] >= target:
            return {"round": r["round"], "uplink_bytes": up, "downlink_bytes": down, "wall_s": wall, "sim_time_s": sim if has_sim else None}
    return None


def summarize_run(res: dict[str, Any]) -> dict[str, Any]:
    """The report's numbers for one run, all from its results.json."""
    rounds = res["rounds"]
    final = res["final"]
    n = len(rounds)
    return {
        "accuracy": final["accuracy"],
        "best_accuracy": max(r["accuracy"] for r in rounds),
        "rounds": n,
        "uplink_bytes": final["total_uplink_bytes"],
        "downlink_bytes": final["total_downlink_bytes"],
        "uplink_bytes_per_round": final["total_uplink_bytes"] / n,
        "downlink_bytes_per_round": final["total_downlink_bytes"] / n,
        "uplink_bpp": final["mean_uplink_bpp"],
        "downlink_bpp": final["mean_downlink_bpp"],
        "wall_s": sum(r["wall_s"] for r in rounds),
        "sim_time_s": sum(r["sim_time_s"] for r in rounds) if all("sim_time_s" in r for r in rounds) else None,
        "trainable_params": res.get("trainable_params"),
    }


# ---- writing ---------------------------------------------------------------------------------------
def _b(n: float) -> str:
    return f"{n:,.0f}"


def _ratio(base: float, value: float) -> str:
    return f"{base / value:,.1f}×" if value else "∞"


def _table(header: list[str], rows: list[list[str]], numeric: bool = True) -> str:
    """A markdown table; the first column is left-aligned, the others right-aligned if ``numeric``."""
    align = ["---"] + ["---:" if numeric else "---"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _task_notes(results: list[dict[str, Any]], labels: list[str]) -> list[str]:
    """Warnings for runs that differ in a task field (they are then not strictly comparable)."""
    notes = []
    for name in TASK_FIELDS + LINK_FIELDS:
        values = {lab: r.get("config", {}).get(name) for lab, r in zip(labels, results)}
        if len({json.dumps(v) for v in values.values()}) > 1:
            detail = ", ".join(f"{lab}: {v}" for lab, v in values.items())
            notes.append(f"- **{name} differs between runs** ({detail}): compare with care.")
    return notes


def _options_text(res: dict[str, Any]) -> str:
    """A run's method options (and a non-default lr), as ``key=value`` pairs."""
    cfg = res.get("config", {})
    pairs = [f"{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in sorted(cfg.get("options", {}).items())]
    if cfg.get("lr"):
        pairs.insert(0, f"lr={cfg['lr']}")
    return ", ".join(pairs) or "defaults"


def render_report(
    results: list[dict[str, Any]],
    target: float | None = None,
    command: str | None = None,
    failed: list[dict[str, str]] | None = None,
) -> str:
    """report.md's text; ``failed`` lists runs that raised (method, error), shown first."""
    labels = labels_for(results)
    target = default_target(results) if target is None else target
    sums = [summarize_run(r) for r in results]
    cfg0 = results[0].get("config", {})
    lines = ["# fedsqueeze comparison", ""]
    if command:
        lines += ["Produced by:", "", "```", command, "```", ""]
    task = ", ".join(f"{k}={cfg0.get(k)}" for k in TASK_FIELDS if k in cfg0)
    lines += [f"Task: {task}.", "", f"Model parameters (bpp denominator): {results[0].get('model_params', 0):,}.", ""]
    lines += _task_notes(results, labels)
    for f in failed or []:
        lines.append(f"- **{f['method']} failed** and is not in the tables: `{f['error']}`")
    lines += ["", "## Runs", ""]
    rows = [[lab, _options_text(r), f"`{r.get('_path', '?')}`"] for lab, r in zip(labels, results)]
    lines.append(_table(["method", "options", "results"], rows, numeric=False))
    lines += [
        "",
        "## Accuracy and bytes",
        "",
        "Bytes are the exact payload lengths summed over the round's clients; per round = total / rounds; "
        "bpp = bits per model parameter per client, averaged over rounds.",
        "",
    ]
    rows = [
        [
            lab,
            f"{s['accuracy']:.4f}",
            f"{s['best_accuracy']:.4f}",
            _b(s["uplink_bytes"]),
            _b(s["uplink_bytes_per_round"]),
            _b(s["downlink_bytes"]),
            _b(s["downlink_bytes_per_round"]),
            f"{s['uplink_bpp']:.4g}",
            f"{s['downlink_bpp']:.4g}",
            f"{s['trainable_params']:,}" if s["trainable_params"] is not None else "n/a",
            f"{s['wall_s']:.1f}",
            f"{s['sim_time_s']:.1f}" if s["sim_time_s"] is not None else "n/a",
        ]
        for lab, s in zip(labels, sums)
    ]
    lines.append(
        _table(
            [
                "method",
                "final acc",
                "best acc",
                "uplink B",
                "uplink B/round",
                "downlink B",
                "downlink B/round",
                "uplink bpp",
                "downlink bpp",
                "trainable",
                "wall s",
                "sim s",
            ],
            rows,
        )
    )
    base = baseline_index(results)
    if base is not None:
        b = sums[base]
        lines += [
            "",
            f"## Against {labels[base]}",
            "",
            f"How many times fewer bytes than {labels[base]} each run sent, and its accuracy difference.",
            "",
        ]
        rows = [
            [
                lab,
                _ratio(b["uplink_bytes"], s["uplink_bytes"]),
                _ratio(b["downlink_bytes"], s["downlink_bytes"]),
                _ratio(b["uplink_bytes"] + b["downlink_bytes"], s["uplink_bytes"] + s["downlink_bytes"]),
                f"{s['accuracy'] - b['accuracy']:+.4f}",
            ]
            for lab, s in zip(labels, sums)
        ]
        lines.append(_table(["method", "uplink ×", "downlink ×", "total ×", "Δ final acc"], rows))
    link = ", ".join(f"{k}={cfg0.get(k)}" for k in LINK_FIELDS if k in cfg0)
    lines += [
        "",
        f"## Time to accuracy {target:.4f}",
        "",
        "First round whose test accuracy reaches the target, and the costs summed up to it. "
        f"Simulated time (link model: {link or 'not recorded'}) = per round, the slowest client's "
        "compute + transfer of its downlink and uplink bytes + latency.",
        "",
    ]
    rows = []
    for lab, r in zip(labels, results):
        t = time_to_target(r, target)
        if t is None:
            rows.append([lab, "not reached", "", "", "", ""])
        else:
            sim = f"{t['sim_time_s']:.1f}" if t["sim_time_s"] is not None else "n/a"
            rows.append([lab, str(t["round"]), _b(t["uplink_bytes"]), _b(t["downlink_bytes"]), sim, f"{t['wall_s']:.1f}"])
    lines.append(_table(["method", "round", "uplink B", "downlink B", "sim s", "wall s"], rows))
    lines += [
        "",
        "## Plots",
        "",
        "![accuracy against cumulative uplink bytes](pareto.png)",
        "",
        "![accuracy per round](accuracy.png)",
        "",
        "![bits per parameter per round](bpp.png)",
        "",
        "## Per round",
        "",
    ]
    for lab, r in zip(labels, results):
        lines += [f"### {lab}", ""]
        rows = [
            [
                str(x["round"]),
                f"{x['accuracy']:.4f}",
                _b(x["uplink_bytes"]),
                _b(x["downlink_bytes"]),
                f"{x['uplink_bpp']:.4g}",
                f"{x['downlink_bpp']:.4g}",
                f"{x['wall_s']:.1f}",
                f"{x['sim_time_s']:.1f}" if "sim_time_s" in x else "n/a",
            ]
            for x in r["rounds"]
        ]
        lines += [_table(["round", "accuracy", "uplink B", "downlink B", "uplink bpp", "downlink bpp", "wall s", "sim s"], rows), ""]
    return "\n".join(lines)


def write_report(
    results: list[dict[str, Any]],
    out_dir: str | Path,
    target: float | None = None,
    command: str | None = None,
    failed: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    """Write report.md and the plots to ``out_dir``; return the paths, the target and the summaries."""
    from fedsqueeze.results import atomic_write_text

    if not results:
        raise ConfigError("nothing to report: no results")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = default_target(results) if target is None else target
    atomic_write_text(out / "report.md", render_report(results, target, command, failed))
    plots = write_plots(results, labels_for(results), out, target)
    return {
        "report": out / "report.md",
        "plots": plots,
        "target": target,
        "labels": labels_for(results),
        "failed": failed or [],
        "summaries": [summarize_run(r) for r in results],
        "results": results,
    }
