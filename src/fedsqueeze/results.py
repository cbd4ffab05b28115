"""results.json and rounds.csv (the run record every runtime writes and report/ reads), as DESIGN.md fixes them.

- ``uplink_bytes`` / ``downlink_bytes``: the summed lengths of the payloads that crossed the wire
  in the round (headers included; a payload later rejected as corrupt still counts: it was sent).
- ``uplink_bpp`` = uplink_bytes · 8 / (uploading clients · model_params); ``downlink_bpp`` likewise
  over the clients the server sent to. ``model_params`` counts backbone and head.

rounds.csv gains its row as each round ends; results.json is rewritten atomically (write, rename).
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

CSV_FIELDS = [
    "round",
    "accuracy",
    "loss",
    "uplink_bytes",
    "downlink_bytes",
    "uplink_bpp",
    "downlink_bpp",
    "clients",
    "clients_uploaded",
    "clients_aggregated",
    "wall_s",
    "train_s",
    "codec_s",
    "sim_time_s",
]


def bpp(nbytes: int, clients: int, model_params: int) -> float:
    """Bits per model parameter per client."""
    return nbytes * 8 / (clients * model_params) if clients else 0.0


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader (or a kill) never sees a half-written file:
    a temporary file, flushed to disk, then renamed over the old one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode())


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``final`` block from the per-round records."""
    if not rounds:
        return {"accuracy": None, "total_uplink_bytes": 0, "total_downlink_bytes": 0, "mean_uplink_bpp": 0.0, "mean_downlink_bpp": 0.0}
    n = len(rounds)
    return {
        "accuracy": rounds[-1]["accuracy"],
        "loss": rounds[-1]["loss"],
        "best_accuracy": max(r["accuracy"] for r in rounds),
        "total_uplink_bytes": sum(r["uplink_bytes"] for r in rounds),
        "total_downlink_bytes": sum(r["downlink_bytes"] for r in rounds),
        "mean_uplink_bpp": sum(r["uplink_bpp"] for r in rounds) / n,
        "mean_downlink_bpp": sum(r["downlink_bpp"] for r in rounds) / n,
        "wall_s": sum(r["wall_s"] for r in rounds),
        "sim_time_s": sum(r.get("sim_time_s", 0.0) for r in rounds),
        "dropped_clients": sum(len(r.get("dropped", [])) for r in rounds),
        # privacy spent by the whole run (DP-FedAvg): the last round's running (ε, δ)
        **{k: v for k, v in rounds[-1].items() if k in ("dp_epsilon", "dp_delta")},
    }


class ResultsWriter:
    """Accumulates round records; keeps rounds.csv and results.json current in ``out_dir``."""

    def __init__(self, out_dir: str | Path, header: dict[str, Any], rounds: list[dict[str, Any]] | None = None) -> None:
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.header = header
        self.rounds: list[dict[str, Any]] = list(rounds or [])
        self.csv_path = self.out / "rounds.csv"
        self.json_path = self.out / "results.json"
        # (re)write the CSV from the rounds already done, so a resumed run's CSV matches its checkpoint
        # even if the run was killed between checkpointing a round and appending its row
        buf = io.StringIO(newline="")
        writer = csv.DictWriter(buf, CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rounds)
        atomic_write_text(self.csv_path, buf.getvalue())

    def add_round(self, record: dict[str, Any]) -> None:
        self.rounds.append(record)
        with self.csv_path.open("a", newline="") as f:
            csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore").writerow(record)
        self.write_json()

    def results(self) -> dict[str, Any]:
        return {**self.header, "rounds": self.rounds, "final": summarize(self.rounds)}

    def write_json(self) -> dict[str, Any]:
        res = self.results()
        atomic_write_text(self.json_path, json.dumps(res, indent=2))
        return res
