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
from collections import OrderedDict
from dataclasses import asdict
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
    from fedsqueeze.methods import ClientOutput, Method

# torch, transformers and the methods are imported where they are used: Flower starts a fresh
# ClientApp process for every message, and a `query` message needs none of them.

log = logging.getLogger("fedsqueeze")

WORKER_KEY = "worker-idle-s"  # node config: keep the prepared task in a node worker this long idle (0: off)


PREPARED_KEEP = 2  # prepared methods a process keeps: two runs may share a federation's nodes
_PREPARED: OrderedDict[str, Method] = OrderedDict()  # run config JSON -> its method, set up on its task


def _prepared(cfg_json: str) -> Method:
    """The method of this run config, set up on its task: built once per process (or node worker)."""
    method = _PREPARED.get(cfg_json)
    if method is None:
        from fedsqueeze.runtime.engine import prepare

        while len(_PREPARED) >= PREPARED_KEEP:
            _PREPARED.popitem(last=False)
        method, _ = prepare(config_from_json(cfg_json))
        _PREPARED[cfg_json] = method
    _PREPARED.move_to_end(cfg_json)
    return method


def _state_path(state_dir: str, req: TrainRequest, version: tuple[int, int]) -> Path:
    run = hashlib.sha256(req.config_json.encode()).hexdigest()[:16]
    return Path(state_dir) / run / f"client-{req.client}-r{version[0]:06d}-a{version[1]:03d}.tree"


def stored_client_state(context: Context, req: TrainRequest, state_dir: str | None) -> bytes | None:
    """The packed client state of the version the server expects; None if it expects none (initial)."""
    from fedsqueeze.runtime.faults import ClientFault

    if req.state_version is None:
        return None
    record = context.state.config_records.get(STATE)
    if record is not None and record.get("client") == req.client and record.get("version") == list(req.state_version):
        tree = record["tree"]
        if isinstance(tree, bytes):
            return tree
    if state_dir:
        path = _state_path(state_dir, req, req.state_version)
        if path.is_file():
            return path.read_bytes()
    raise ClientFault(
        f"client state lost: this node holds no state of client {req.client} from round "
        f"{req.state_version[0]} (attempt {req.state_version[1]}); give the node a {STATE_DIR_KEY}"
    )


def load_client_state(context: Context, method: Method, req: TrainRequest, state_dir: str | None) -> Any:
    """The client state of the version the server expects; initial if it expects none."""
    from fedsqueeze.treeio import unpack_tree

    data = stored_client_state(context, req, state_dir)
    return method.init_client(req.client) if data is None else unpack_tree(data)


def save_client_state(context: Context, req: TrainRequest, state: Any, state_dir: str | None) -> None:
    """Keep ``state`` as version (round, attempt) in the context and, with a state directory, on disk."""
    from fedsqueeze.treeio import pack_tree

    save_packed_state(context, req, pack_tree(state), state_dir)


def save_packed_state(context: Context, req: TrainRequest, data: bytes, state_dir: str | None) -> None:
    """:func:`save_client_state` for a state already packed (what the node worker returns)."""
    from fedsqueeze.results import atomic_write_bytes

    version = (req.round, req.attempt)
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


def client_work(req: TrainRequest, state: Any, initial: bool = False) -> ClientOutput:
    """The method's client update for ``req`` from client state ``state`` (its initial one if ``initial``),
    behind the engine's fault injection; the one place both the ClientApp and the node worker run it."""
    from fedsqueeze.methods import RoundContext
    from fedsqueeze.runtime.faults import with_injected_faults

    method = _prepared(req.config_json)
    if initial:
        state = method.init_client(req.client)
    ctx = RoundContext(round=req.round, rounds=req.rounds, seed=req.seed, attempt=req.attempt, participants=req.participants)
    client_fn = with_injected_faults(method.cfg, lambda m, c, s, x, _: method.client_update(m, c, s, x), method)
    # nobody can abandon a Flower client: a hung one gives up on its own, after the server has
    out = client_fn(req.message, req.client, state, ctx, threading.Event())
    if not isinstance(out.payload, (bytes, bytearray)):
        raise TypeError(f"client returned {type(out.payload).__name__}, not bytes")
    return out


def request_header(req: TrainRequest) -> dict[str, Any]:
    """``req`` without its message, JSON-safe (what the node worker receives besides the bytes)."""
    return {k: v for k, v in asdict(req).items() if k != "message"}


def request_from_header(header: dict[str, Any], message: bytes) -> TrainRequest:
    """Invert :func:`request_header` (in the node worker, from the node's own ClientApp)."""
    version = header["state_version"]
    return TrainRequest(
        config_json=str(header["config_json"]),
        round=int(header["round"]),
        rounds=int(header["rounds"]),
        seed=int(header["seed"]),
        client=int(header["client"]),
        attempt=int(header["attempt"]),
        participants=tuple(int(p) for p in header["participants"]),
        state_version=None if version is None else (int(version[0]), int(version[1])),
        state_dir=header["state_dir"],
        message=message,
    )


def worker_idle_s(context: Context) -> float:
    """Node config ``worker-idle-s``: > 0 runs the work in a node worker that lives that long idle."""
    try:
        return max(float(context.node_config.get(WORKER_KEY, 0.0)), 0.0)
    except (TypeError, ValueError):
        return 0.0


def _train_in_worker(context: Context, req: TrainRequest, state_dir: str, idle_s: float) -> tuple[bytes, dict[str, float]]:
    from fedsqueeze.runtime import node_worker

    state = stored_client_state(context, req, state_dir)
    header, blobs = node_worker.call(node_worker.socket_path(state_dir), idle_s, request_header(req), [req.message, state or b""])
    if not header.get("ok"):
        raise node_worker.WorkerError(str(header.get("error", "the node worker failed")))
    if len(blobs) != 2 or not isinstance(header.get("metrics"), dict):
        raise node_worker.WorkerError("the node worker's reply is malformed")
    save_packed_state(context, req, blobs[1], state_dir)
    return blobs[0], {str(k): float(v) for k, v in header["metrics"].items()}


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Run the method's client function on the server's bytes; reply with the update bytes.

    With node config ``worker-idle-s`` (and a state directory) the work runs in the node's
    long-lived worker (:mod:`fedsqueeze.runtime.node_worker`), which keeps the prepared task.
    """
    try:
        req = read_train(msg)
        state_dir = _node_state_dir(context, req)
        idle_s = worker_idle_s(context)
        if idle_s > 0 and state_dir:
            payload, metrics = _train_in_worker(context, req, state_dir, idle_s)
        else:
            method = _prepared(req.config_json)
            out = client_work(req, load_client_state(context, method, req, state_dir))
            save_client_state(context, req, out.state, state_dir)
            payload, metrics = bytes(out.payload), out.metrics
    except Exception as exc:  # reported to the server, which drops this client for the round
        log.warning("client failed: %s", traceback.format_exc())
        return reply_error(msg, f"{type(exc).__name__}: {exc}")
    return reply_update(msg, payload, metrics)
