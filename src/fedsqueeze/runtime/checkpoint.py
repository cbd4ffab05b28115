"""Checkpoints: after every round, everything needed to continue the run, written atomically.

``OUT/checkpoint`` holds the resolved config, the number of finished rounds, the server state, every
client's state and the round records so far, as a :func:`~fedsqueeze.treeio.pack_tree` frame (no
pickle). It is written to a temporary file, flushed, then renamed over the old one, so a kill at any
moment leaves either the previous checkpoint or the new one, never half of one.

No RNG state is stored because none is carried between rounds: every draw comes from a generator
seeded by ``(seed, round, client, purpose)``, and the runtime re-seeds torch's global RNG at the
start of each round. ``OUT/config.toml`` (written when the run starts) is what ``--resume`` reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedsqueeze.errors import ConfigError, FedsqueezeError, PayloadError
from fedsqueeze.results import atomic_write_bytes
from fedsqueeze.treeio import pack_tree, unpack_tree

CHECKPOINT_FILE = "checkpoint"
CONFIG_FILE = "config.toml"
FORMAT = "fedsqueeze-checkpoint"
VERSION = 1


@dataclass
class Checkpoint:
    """A run's state after ``round`` finished rounds."""

    config: dict[str, Any]
    round: int
    server_state: Any
    client_states: dict[int, Any]
    rounds: list[dict[str, Any]]
    state_versions: dict[int, tuple[int, int]] = field(default_factory=dict)  # client: (round, attempt) of its state


def encode_checkpoint(
    *,
    config: dict[str, Any],
    round_: int,
    server_state: Any,
    client_states: dict[int, Any],
    rounds: list[dict[str, Any]],
    state_versions: dict[int, tuple[int, int]] | None = None,
) -> bytes:
    """Serialize a checkpoint. Round records travel as JSON text in the body (they grow with the run,
    and a frame's JSON header is capped at 1 MiB)."""
    records = np.frombuffer(json.dumps(rounds).encode(), dtype=np.uint8)
    tree = {
        "format": FORMAT,
        "version": VERSION,
        "config": config,
        "round": round_,
        "server_state": server_state,
        "client_states": dict(client_states),
        "rounds_json": records,
        "state_versions": {int(c): [int(v[0]), int(v[1])] for c, v in (state_versions or {}).items()},
    }
    try:
        return pack_tree(tree)
    except TypeError as exc:
        raise FedsqueezeError(
            f"cannot checkpoint the run: {exc}. Server and client states must be trees of dicts, lists, "
            "numbers, strings and numpy arrays (or run with --set checkpoint=false)"
        ) from exc


def decode_checkpoint(data: bytes | bytearray | memoryview) -> Checkpoint:
    """Parse and validate checkpoint bytes; PayloadError on anything malformed or of another version."""
    tree = unpack_tree(data)
    if not isinstance(tree, dict) or tree.get("format") != FORMAT:
        raise PayloadError("not a fedsqueeze checkpoint")
    if tree.get("version") != VERSION:
        raise PayloadError(f"checkpoint format version {tree.get('version')!r} is not {VERSION} (written by another version)")
    missing = [k for k in ("config", "round", "server_state", "client_states", "rounds_json") if k not in tree]
    if missing:
        raise PayloadError(f"checkpoint lacks {', '.join(missing)}")
    round_, config, clients = tree.get("round"), tree.get("config"), tree.get("client_states")
    records = tree.get("rounds_json")
    if type(round_) is not int or round_ < 0:
        raise PayloadError(f"checkpoint round {round_!r} is not a count")
    if not isinstance(config, dict) or not isinstance(clients, dict) or not all(type(k) is int for k in clients):
        raise PayloadError("checkpoint config or client states are malformed")
    if not (isinstance(records, np.ndarray) and records.dtype == np.uint8 and records.ndim == 1):
        raise PayloadError("checkpoint round records are malformed")
    try:
        rounds = json.loads(records.tobytes())
    except (ValueError, RecursionError) as exc:
        raise PayloadError(f"checkpoint round records are not JSON: {type(exc).__name__}") from None
    if not (isinstance(rounds, list) and len(rounds) == round_ and all(isinstance(r, dict) for r in rounds)):
        raise PayloadError(f"checkpoint holds {len(rounds) if isinstance(rounds, list) else '?'} round records for round {round_}")
    versions = tree.get("state_versions", {})
    if not (
        isinstance(versions, dict)
        and all(type(c) is int and isinstance(v, list) and len(v) == 2 and all(type(x) is int for x in v) for c, v in versions.items())
    ):
        raise PayloadError("checkpoint client state versions are malformed")
    return Checkpoint(config, round_, tree.get("server_state"), clients, rounds, {c: (v[0], v[1]) for c, v in versions.items()})


def check_checkpoint(ckpt: Checkpoint, rounds: int, clients: int) -> None:
    """PayloadError unless ``ckpt`` fits a run of ``rounds`` rounds over ``clients`` clients.

    decode_checkpoint checks a checkpoint on its own; this checks it against the run's config (a
    checkpoint whose frame is sound can still be of another run, or edited). The server state is
    checked against the method, in :func:`fedsqueeze.runtime.engine.check_resume`.
    """
    if ckpt.round > rounds:
        raise PayloadError(f"it is at round {ckpt.round}, beyond the run's rounds={rounds}")
    numbers = [r.get("round") for r in ckpt.rounds]
    if numbers != list(range(1, ckpt.round + 1)):
        raise PayloadError(f"its round records are numbered {numbers[:5]}, not 1 to {ckpt.round}")
    strays = sorted(c for c in {*ckpt.client_states, *ckpt.state_versions} if not 0 <= c < clients)
    if strays:
        raise PayloadError(f"it holds states of clients {strays[:3]}, outside the run's clients 0 to {clients - 1}")
    late = sorted(c for c, (r, a) in ckpt.state_versions.items() if not (0 <= r <= ckpt.round and a >= 0))
    if late:
        raise PayloadError(f"client {late[0]}'s state version {ckpt.state_versions[late[0]]} is not of a finished round")


def save_checkpoint(out_dir: str | Path, data: bytes) -> Path:
    """Write checkpoint bytes to ``out_dir/checkpoint`` atomically (temporary file, fsync, rename)."""
    path = Path(out_dir) / CHECKPOINT_FILE
    atomic_write_bytes(path, data)
    return path


def load_checkpoint(out_dir: str | Path) -> Checkpoint | None:
    """The checkpoint in ``out_dir``, or None when the run was killed before its first round ended."""
    path = Path(out_dir) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        return decode_checkpoint(path.read_bytes())
    except PayloadError as exc:
        raise ConfigError(f"the checkpoint {str(path)!r} is unreadable ({exc}); start the run again without --resume") from exc
