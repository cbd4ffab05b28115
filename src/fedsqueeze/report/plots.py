"""Plots drawn from results.json records: one colour and marker per method, shades of one colour per family.

``fedsqueeze compare`` / ``report`` (:func:`write_plots`):

- ``pareto.png``: accuracy against cumulative uplink bytes (log x), one point per round.
- ``accuracy.png``: accuracy per round.
- ``bpp.png``: uplink and downlink bits per parameter per round (log y).

``fedsqueeze bench`` (:func:`write_suite_figure`): one figure per task and setting, the mean over
seeds of accuracy against cumulative bytes (uplink, or uplink + downlink) and against simulated
time on the link model, the final round's 95% interval as an error bar.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PLOTS = ("pareto.png", "accuracy.png", "bpp.png")
MARKERS = "osD^v<>ph*"

# Families, each in shades of one hue and with markers of its own; a method keeps its style in every plot.
FAMILIES: dict[str, tuple[list[str], list[str]]] = {
    "full": (["fedavg"], ["#000000"]),
    "codec": (["fedsz", "qsgd", "signsgd", "eden", "topk"], ["#a63603", "#e6550d", "#fd8d3c", "#d94801", "#fdae6b"]),
    "peft": (
        ["lora", "adapter", "bitfit", "ia3", "prompt", "head", "ffa-lora", "fedsa-lora"],
        ["#08519c", "#3182bd", "#6baed6", "#006d2c", "#31a354", "#74c476", "#9ecae1", "#00441b"],
    ),
    "mask": (["deltamask", "deltamask-exact", "fedpm"], ["#3f007d", "#756bb1", "#9e9ac8"]),
    "zo": (["decomfl", "fedkseed", "feedsign"], ["#cb181d", "#ef3b2c", "#fc9272"]),
}
FAMILY_MARKERS = {"full": "o", "codec": "sD^v<", "peft": "osD^v<>p", "mask": "h*X", "zo": "PdH"}
OTHER_COLOURS = ["#525252", "#969696", "#252525"]  # methods no family lists: greys, one marker each


def family_of(method: str) -> str:
    """The family a method is plotted in ("other" if none lists it)."""
    return next((fam for fam, (names, _) in FAMILIES.items() if method in names), "other")


def method_style(method: str, others: list[str] | None = None) -> dict[str, str]:
    """Colour and marker of ``method``: a family shade and the method's place in its family.

    A method no family lists takes a grey and a marker by its place in ``others`` (the sorted
    unlisted methods of the plot), so those stay distinct from each other too.
    """
    fam = family_of(method)
    if fam != "other":
        names, colours = FAMILIES[fam]
        i = names.index(method)
        return {"color": colours[i], "marker": FAMILY_MARKERS[fam][i]}
    i = sorted(others or [method]).index(method) if method in (others or []) else 0
    return {"color": OTHER_COLOURS[i % len(OTHER_COLOURS)], "marker": MARKERS[(i // len(OTHER_COLOURS)) % len(MARKERS)]}


def plot_order(methods: list[str]) -> list[str]:
    """Methods grouped by family (in FAMILIES' order, then "other"), each family in its own order."""
    fams = [*FAMILIES, "other"]

    def rank(m: str) -> tuple[int, int, str]:
        fam = family_of(m)
        return (fams.index(fam), FAMILIES[fam][0].index(m) if fam in FAMILIES else 0, m)

    return sorted(methods, key=rank)


def run_styles(methods: list[str]) -> list[dict[str, str]]:
    """One style per run: its method's, unless a method appears twice (then one per run, by index)."""
    if len(set(methods)) == len(methods):
        others = [m for m in methods if family_of(m) == "other"]
        return [method_style(m, others) for m in methods]
    return [{"color": f"C{i % 10}", "marker": MARKERS[(i // 10) % len(MARKERS)]} for i in range(len(methods))]


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
    styles: list[dict[str, Any]] = list(run_styles([r["method"] for r in results]))

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


def _mean_curve(runs: list[dict[str, Any]], key: str) -> list[float]:
    """The per-round mean over seeds of the cumulative ``key`` (rounds all runs have)."""
    n = min(len(r["rounds"]) for r in runs)
    curves = [_cumulative([x[key] for x in r["rounds"][:n]]) for r in runs]
    return [sum(c[i] for c in curves) / len(curves) for i in range(n)]


def _mean_accuracy(runs: list[dict[str, Any]]) -> list[float]:
    n = min(len(r["rounds"]) for r in runs)
    return [sum(r["rounds"][i]["accuracy"] for r in runs) / len(runs) for i in range(n)]


def _total_bytes(runs: list[dict[str, Any]]) -> list[float]:
    up, down = _mean_curve(runs, "uplink_bytes"), _mean_curve(runs, "downlink_bytes")
    return [u + d for u, d in zip(up, down)]


def write_suite_figure(
    groups: dict[str, list[dict[str, Any]]],
    halves: dict[str, float | None],
    path: str | Path,
    title: str,
    bytes_axis: str = "total",
) -> Path:
    """One task's figure: accuracy (mean over seeds) against cumulative bytes and against simulated time.

    ``groups`` maps a method to its runs (one per seed), ``halves`` to its final accuracy's 95%
    half-width (drawn as an error bar on the last point; None: one seed). ``bytes_axis`` is
    ``"total"`` (uplink + downlink) or ``"uplink"``. Runs without link-model times (older runs)
    are left out of the time panel, and their legend entry says so.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if bytes_axis not in ("total", "uplink"):
        raise ValueError(f"bytes_axis must be 'total' or 'uplink', got {bytes_axis!r}")
    methods = plot_order(list(groups))
    others = [m for m in methods if family_of(m) == "other"]
    fig, (ax_b, ax_t) = plt.subplots(1, 2, figsize=(14.0, 4.8), sharey=True)
    for m in methods:
        runs, st = groups[m], method_style(m, others)
        acc = _mean_accuracy(runs)
        xs = _total_bytes(runs) if bytes_axis == "total" else _mean_curve(runs, "uplink_bytes")
        has_time = all("sim_time_s" in x for r in runs for x in r["rounds"])
        label = f"{m} ({len(runs)} seed{'s' * (len(runs) > 1)})" + ("" if has_time else ", no sim time")
        px, py = _positive(xs[: len(acc)], acc)
        ax_b.plot(px, py, label=label, lw=1.2, ms=4, **st)
        half = halves.get(m)
        if half is not None and px:
            ax_b.errorbar([px[-1]], [py[-1]], yerr=[half], color=st["color"], capsize=3, lw=1.0)
        if has_time:
            ts = _mean_curve(runs, "sim_time_s")
            ax_t.plot(ts[: len(acc)], acc, lw=1.2, ms=4, **st)
            if half is not None:
                ax_t.errorbar([ts[len(acc) - 1]], [acc[-1]], yerr=[half], color=st["color"], capsize=3, lw=1.0)
    ax_b.set_xscale("log")
    ax_b.set_xlabel("cumulative " + ("uplink + downlink" if bytes_axis == "total" else "uplink") + " bytes, all clients (log)")
    ax_b.set_ylabel("test accuracy (mean over seeds)")
    ax_t.set_xscale("log")
    ax_t.set_xlabel("cumulative simulated time on the link model, s (log)")
    for ax in (ax_b, ax_t):
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title + " — one point per round; bar: 95% interval of the final accuracy over seeds", fontsize=10)
    fig.legend(fontsize=8, loc="center left", bbox_to_anchor=(0.80, 0.5), borderaxespad=0.0)
    fig.tight_layout(rect=(0.0, 0.0, 0.79, 1.0))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
