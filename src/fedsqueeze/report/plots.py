"""The comparison plots, drawn from results.json records: a distinct colour and marker per run.

- ``pareto.png``: accuracy against cumulative uplink bytes (log x), one point per round.
- ``accuracy.png``: accuracy per round.
- ``bpp.png``: uplink and downlink bits per parameter per round (log y).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PLOTS = ("pareto.png", "accuracy.png", "bpp.png")


def _cumulative(values: list[float]) -> list[float]:
    out, total = [], 0.0
    for v in values:
        total += v
        out.append(total)
    return out


def _positive(xs: list[float], ys: list[float]) -> tuple[list[float], list[float]]:
    """Drop points a log axis cannot show (zero bytes or bpp)."""
    kept = [(x, y) for x, y in zip(xs, ys) if x > 0 and y > 0]
    return [x for x, _ in kept], [y for _, y in kept]


def _legend_outside(ax: Any) -> None:
    """The legend to the right of the axes, where it never hides a curve."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def write_plots(results: list[dict[str, Any]], labels: list[str], out_dir: str | Path, target: float) -> list[Path]:
    """pareto.png, accuracy.png and bpp.png in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    markers = "osD^v<>ph*"
    styles: list[dict[str, Any]] = [dict(marker=markers[i % len(markers)], color=f"C{i % 10}") for i in range(len(results))]

    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    for lab, r, st in zip(labels, results, styles):
        acc = [x["accuracy"] for x in r["rounds"]]
        xs, ys = _positive(_cumulative([x["uplink_bytes"] for x in r["rounds"]]), acc)
        ax.plot(xs, ys, label=lab, **st)
    ax.axhline(target, ls="--", lw=0.8, color="grey", label=f"target {target:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("cumulative uplink bytes (all clients)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Accuracy against uplink bytes (one point per round)")
    ax.grid(True, which="both", alpha=0.3)
    _legend_outside(ax)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    for lab, r, st in zip(labels, results, styles):
        ax.plot([x["round"] for x in r["rounds"]], [x["accuracy"] for x in r["rounds"]], label=lab, **st)
    ax.axhline(target, ls="--", lw=0.8, color="grey", label=f"target {target:.3f}")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_title("Accuracy per round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    _legend_outside(ax)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.5), sharey=True)
    for ax, key, title in zip(axes, ("uplink_bpp", "downlink_bpp"), ("uplink", "downlink")):
        for lab, r, st in zip(labels, results, styles):
            xs, ys = _positive([x["round"] for x in r["rounds"]], [x[key] for x in r["rounds"]])
            ax.plot(xs, ys, label=lab, **st)
        ax.set_yscale("log")
        ax.set_xlabel("round")
        ax.set_title(f"{title} bits per parameter per client")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("bpp (log)")
    _legend_outside(axes[1])
    fig.tight_layout()
    fig.savefig(out / "bpp.png", dpi=120)
    plt.close(fig)
    return [out / name for name in PLOTS]
