"""The results store: one small JSON record per benchmark run, kept in the repository.

``STORE/<key>.json`` holds a run's results.json with what it is (suite, task, setting, method,
seed), the results epoch and code version that made it, and where it came from. The suite types
(:class:`Suite`, :class:`Entry`) and the match of an entry to its record (:class:`Found`) live here
too, so report/ reads them without importing the runners (``fedsqueeze.bench`` fills the store).
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsqueeze.config import RunConfig
from fedsqueeze.errors import ConfigError

RESULTS_EPOCH = 1  # bump when a code change moves results: every stored run then becomes stale
PRE_PIPELINE = "pre-pipeline"  # the epoch of runs imported from before this pipeline (code version unknown)
RECORD_FORMAT = 1


@dataclass(frozen=True)
class Entry:
    """One run of a suite: its labels and its resolved config."""

    task: str
    setting: str
    method: str
    seed: int
    config: RunConfig

    @property
    def id(self) -> str:
        return f"{self.task}/{self.setting}/{self.method}/s{self.seed}"

    def labels(self) -> dict[str, Any]:
        return {"task": self.task, "setting": self.setting, "method": self.method, "seed": self.seed}


@dataclass
class Suite:
    """A parsed suite file (see :func:`load_suite`)."""

    name: str
    path: Path
    description: str = ""
    reference: str = "fedavg"
    store: Path = Path("results")
    report: Path = Path("runs/report")
    readme: Path | None = None
    readme_table: tuple[str, str] | None = None  # (task, setting) the README table shows
    entries: list[Entry] = field(default_factory=list)


def make_record(
    results: dict[str, Any], labels: dict[str, Any], suite: str, key: str, epoch: int | str, code: dict[str, Any], source: str
) -> dict[str, Any]:
    """A store record: one run's results.json with what it is, which code made it, and where from."""
    return {
        "format": RECORD_FORMAT,
        "suite": suite,
        "key": key,
        "entry": labels,
        "epoch": epoch,
        "code": code,
        "source": source,
        "stored": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "results": {k: v for k, v in results.items() if not k.startswith("_")},
    }


def write_record(store: Path, record: dict[str, Any]) -> Path:
    """Write ``record`` to ``store/<key>.json`` (atomically)."""
    from fedsqueeze.results import atomic_write_text

    store.mkdir(parents=True, exist_ok=True)
    path = store / f"{record['key']}.json"
    atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True) + "\n")
    return path


def read_store(store: Path) -> list[dict[str, Any]]:
    """Every record in ``store`` (each gains ``_file``: its path); a malformed file is an error."""
    records = []
    for path in sorted(store.glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read store record {str(path)!r}: {exc}") from exc
        if not isinstance(rec, dict) or rec.get("format") != RECORD_FORMAT or not rec.get("results", {}).get("rounds"):
            raise ConfigError(f"{str(path)!r} is not a fedsqueeze store record (format {RECORD_FORMAT}) with rounds")
        rec["_file"] = str(path)
        records.append(rec)
    return records


@dataclass
class Found:
    """The stored run an entry reads: ``current`` (its key matches) or ``stale`` (same labels, other key)."""

    entry: Entry
    record: dict[str, Any] | None
    status: str  # "current", "stale" or "missing"
