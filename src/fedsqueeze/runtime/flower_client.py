"""The Flower ClientApp: the method's client function on one node, behind the engine's fault wrapper.

Each node holds one partition, given by its node config ``partition-id`` (the simulation engine
sets it for every virtual node; a real SuperNode gets it from ``--node-config``).

Client state (error-feedback memory, a zeroth-order client's synced model...) never leaves the
node. It is kept in the node's Flower context and, when the node has a state directory (node
config ``state-dir``, or the one the server names in a simulation), on disk after every update,
stamped with its (round, attempt). The server says which version it knows the client holds, so a
run resumed from a checkpoint continues every client from exactly the state it had then; a node
that lost it replies with an error and is dropped for the round, never silently reset.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedsqueeze.runtime.flower_wire import (
    CONFIG,
    PARTITION_KEY,
    STATE,
    STATE_DIR_KEY,
    TrainRequest,
    config_from_json,
    read_train,
    reply_error,
    reply_update,
)

if TYPE_CHECKING:
    from fedsqueeze.methods import Method

# torch, transformers and the methods are imported where they are used: Flower starts a fresh
# ClientApp process for every message, and a `query` message needs none of them.

log = logging.getLogger("fedsqueeze")


@dataclass
class _Prepared:
    key: str = ""
    method: Method | None = None


_CLIENT = _Prepared()  # one prepared method per process, rebuilt only when the run config changes


def _prepared(cfg_json: str) -> Method:
    if _CLIENT.key != cfg_json or _CLIENT.method is None:
        from fedsqueeze.runtime.engine import prepare

        method, _ = prepare(config_from_json(cfg_json))
        _CLIENT.key, _CLIENT.method = cfg_json, method
    return _CLIENT.method


def _state_path(state_dir: str, req: TrainRequest, version: tuple[int, int]) -> Path:
    run = hashlib.sha256(req.config_json.encode()).hexdigest()[:16]
    return Path(state_dir) / run / f"client-{req.client}-r{version[0]:06d}-a{version[1]:03d}.tree"


def load_client_state(context: Context, method: Method, req: TrainRequest, state_dir: str | None) -> Any:
    """The client state of the version the server expects; initial if it expects none."""
    from fedsqueeze.runtime.faults import ClientFault
    from fedsqueeze.treeio import unpack_tree

    if req.state_version is None:
        return method.init_client(req.client)
    record = context.state.config_records.get(STATE)
    if record is not None and record.get("client") == req.client and record.get("version") == list(req.state_version):
        tree = record["tree"]
        if isinstance(tree, bytes):
            return unpack_tree(tree)
    if state_dir:
        path = _state_path(state_dir, req, req.state_version)
        if path.is_file():
            return unpack_tree(path.read_bytes())
    raise ClientFault(
        f"client state lost: this node holds no state of client {req.client} from round "
        f"{req.state_version[0]} (attempt {req.state_version[1]}); give the node a {STATE_DIR_KEY}"
    )


def save_client_state(context: Context, req: TrainRequest, state: Any, state_dir: str | None) -> None:
    """Keep ``state`` as version (round, attempt) in the context and, with a state directory, on disk."""
    from fedsqueeze.results import atomic_write_bytes
    from fedsqueeze.treeio import pack_tree

    version = (req.round, req.attempt)
    data = pack_tree(state)
    context.state.config_records[STATE] = ConfigRecord({"client": req.client, "version": list(version), "tree": data})
    if not state_dir:
        return
    path = _state_path(state_dir, req, version)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    # versions older than the one the server knows of are never asked for again
    if req.state_version is not None:
        for old in path.parent.glob(f"client-{req.client}-r*.tree"):
            if old.name < _state_path(state_dir, req, req.state_version).name:
                old.unlink(missing_ok=True)


def _node_state_dir(context: Context, req: TrainRequest) -> str | None:
    node_dir = context.node_config.get(STATE_DIR_KEY)
    return str(node_dir) if isinstance(node_dir, str) and node_dir else req.state_dir


client_app = ClientApp()


@client_app.query()
def partition(msg: Message, context: Context) -> Message:
    """Tell the server which partition (client id) this node holds; build the task first if asked to.

    A simulation's nodes live in long-lived processes, so the server asks them to build the method
    and task while it waits for every partition: round 1 then costs what every other round costs,
    and ``client_timeout`` measures the client's work, not its start-up.
    """
    try:
        pid = int(context.node_config.get(PARTITION_KEY, -1))
    except (TypeError, ValueError):
        pid = -1  # the server reports the partitions nobody holds
    values: dict[str, Any] = {PARTITION_KEY: pid}
    conf = msg.content.config_records.get(CONFIG)
    if conf is not None and isinstance(conf.get("config"), str):
        try:
            _prepared(str(conf["config"]))
        except Exception as exc:  # reported, never fatal: the train messages will fail and say why
            values["error"] = f"{type(exc).__name__}: {exc}"
    reply = ConfigRecord(values)
    return Message(RecordDict({CONFIG: reply}), reply_to=msg)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Run the method's client function on the server's bytes; reply with the update bytes."""
    from fedsqueeze.methods import RoundContext
    from fedsqueeze.runtime.faults import with_injected_faults

    try:
        req = read_train(msg)
        method = _prepared(req.config_json)
        state_dir = _node_state_dir(context, req)
        ctx = RoundContext(round=req.round, rounds=req.rounds, seed=req.seed, attempt=req.attempt, participants=req.participants)
        client_fn = with_injected_faults(method.cfg, lambda m, c, s, x, _: method.client_update(m, c, s, x))
        # nobody can abandon a Flower client: a hung one gives up on its own, after the server has
        out = client_fn(req.message, req.client, load_client_state(context, method, req, state_dir), ctx, threading.Event())
        if not isinstance(out.payload, (bytes, bytearray)):
            raise TypeError(f"client returned {type(out.payload).__name__}, not bytes")
        save_client_state(context, req, out.state, state_dir)
    except Exception as exc:  # reported to the server, which drops this client for the round
        log.warning("client failed: %s", traceback.format_exc())
        return reply_error(msg, f"{type(exc).__name__}: {exc}")
    return reply_update(msg, bytes(out.payload), out.metrics)
