"""Progress bar while a run trains, one printed line per round, and a closing table."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from fedsqueeze.config import RunConfig


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def rounds_table(rounds: list[dict[str, Any]], title: str = "") -> Table:
    """A rich table of per-round results."""
    table = Table(title=title or None)
    for col in ("round", "accuracy", "loss", "uplink", "downlink", "up bpp", "down bpp", "clients", "wall s", "train s", "codec s"):
        table.add_column(col, justify="right")
    for r in rounds:
        table.add_row(
            str(r["round"]),
            f"{r['accuracy']:.4f}",
            f"{r['loss']:.4f}",
            _fmt_bytes(r["uplink_bytes"]),
            _fmt_bytes(r["downlink_bytes"]),
            f"{r['uplink_bpp']:.4g}",
            f"{r['downlink_bpp']:.4g}",
            f"{r['clients_aggregated']}/{r['clients']}",
            f"{r['wall_s']:.1f}",
            f"{r['train_s']:.1f}",
            f"{r['codec_s']:.2f}",
        )
    return table


class RunProgress:
    """Context manager: a bar over client updates, a line per finished round, a table at the end."""

    def __init__(self, cfg: RunConfig, model_params: int, trainable: int, enabled: bool = True) -> None:
        self.cfg = cfg
        self.enabled = enabled
        self.console = Console(stderr=True, width=None if Console(stderr=True).is_terminal else 140)
        self.rounds: list[dict[str, Any]] = []
        self.header = (
            f"fedsqueeze: method={cfg.method} model={cfg.model} dataset={cfg.dataset} clients={cfg.clients} "
            f"per-round={cfg.clients_per_round} rounds={cfg.rounds} seed={cfg.seed} "
            f"params={model_params:,} trainable={trainable:,}"
        )
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not enabled,
        )

    def __enter__(self) -> RunProgress:
        if self.enabled:
            self.console.print(self.header)
        self.progress.__enter__()
        self.task_id = self.progress.add_task("round 1", total=self.cfg.rounds * self.cfg.clients_per_round)
        return self

    def advance_client(self) -> None:
        self.progress.advance(self.task_id)

    def round_done(self, r: dict[str, Any]) -> None:
        self.rounds.append(r)
        self.progress.update(self.task_id, description=f"round {min(r['round'] + 1, self.cfg.rounds)}")
        if self.enabled:
            self.progress.console.print(
                f"round {r['round']:>3}  acc {r['accuracy']:.4f}  loss {r['loss']:.4f}  "
                f"up {_fmt_bytes(r['uplink_bytes'])} ({r['uplink_bpp']:.4g} bpp)  "
                f"down {_fmt_bytes(r['downlink_bytes'])} ({r['downlink_bpp']:.4g} bpp)  "
                f"clients {r['clients_aggregated']}/{r['clients']}  {r['wall_s']:.1f}s"
            )

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)
        if self.enabled and self.rounds and exc[0] is None:
            self.console.print(rounds_table(self.rounds, f"{self.cfg.method} on {self.cfg.dataset}"))
