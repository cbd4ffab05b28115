"""The Flower app: a ServerApp and a ClientApp (Message API of flwr 1.41) around a fedsqueeze method.

The server plays exactly the rounds of the local runtime (same client sampling, fault injection,
order of aggregation, round records), but each sampled client is a Flower node: its message leaves
as a ``train`` Message and its update comes back in the reply. What crosses the wire:

- ``fsq.payload``  ArrayRecord with one 1-D ``uint8`` Array: the method's bytes, untouched. Flower
  never averages or reinterprets them, and the byte counts in results.json are ``len()`` of them.
- ``fsq.config``   ConfigRecord: the resolved run config (JSON), round, rounds, seed and client id.
- ``fsq.metrics``  MetricRecord in the reply: train_s, codec_s, train_loss.

Nothing is pickled: arrays travel through numpy's ``.npy`` format (``allow_pickle=False`` on both
ends), client state is kept in the ClientApp context with :func:`fedsqueeze.treeio.pack_tree`.

Each node holds one partition, given by its node config ``partition-id`` (the simulation engine
sets it for every virtual node; a real SuperNode gets it from ``--node-config``). The server asks
every node for it once (a ``query`` message) and sends client ``c``'s work to the node holding
partition ``c``.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedsqueeze.config import RunConfig
from fedsqueeze.errors import ConfigError, PayloadError

if TYPE_CHECKING:
    from fedsqueeze.methods import Method, RoundContext
    from fedsqueeze.task import Task

# torch, transformers and the methods are imported where they are used: Flower starts a fresh
# ClientApp process for every message, and a `query` message needs none of them.

log = logging.getLogger("fedsqueeze")

PAYLOAD = "fsq.payload"
CONFIG = "fsq.config"
METRICS = "fsq.metrics"
STATE = "fsq.client-state"
RUN_CONFIG_KEY = "fedsqueeze-config"  # key of the run config JSON in [tool.flwr.app.config]
WAIT_KEY = "fedsqueeze-wait-nodes-s"
TIMEOUT_KEY = "fedsqueeze-reply-timeout-s"
PARTITION_KEY = "partition-id"
POLL_S = 0.2  # how often the server asks the SuperLink for replies (Flower's own default is 3 s)


# ---- bytes <-> records --------------------------------------------------------------------------
def bytes_record(data: bytes) -> ArrayRecord:
    """Wrap payload bytes as a one-Array record of raw uint8 (no float conversion, no pickle)."""
    return ArrayRecord({"bytes": Array(np.frombuffer(data, dtype=np.uint8))})


def record_bytes(content: RecordDict) -> bytes:
    """The payload bytes of a message; PayloadError unless it is one 1-D uint8 Array."""
    if PAYLOAD not in content.array_records:
        raise PayloadError("message carries no payload record")
    record = content.array_records[PAYLOAD]
    if list(record.keys()) != ["bytes"]:
        raise PayloadError("payload record must hold exactly one array named 'bytes'")
    arr = record["bytes"]
    if arr.dtype != "uint8" or len(arr.shape) != 1:
        raise PayloadError(f"payload must be 1-D uint8, got {arr.dtype} {tuple(arr.shape)}")
    out = arr.numpy()  # np.load(allow_pickle=False)
    if out.dtype != np.uint8 or out.ndim != 1:
        raise PayloadError("payload array does not match its declared dtype/shape")
    return out.tobytes()


def config_to_json(cfg: RunConfig) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True)


def config_from_json(text: str) -> RunConfig:
    """Rebuild the run config sent by the server (plain JSON, validated like any other config)."""
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"run config is not valid JSON: {exc}") from exc
    if not isinstance(values, dict) or not isinstance(values.get("options", {}), dict):
        raise ConfigError("run config must be a JSON object")
    known = set(RunConfig.field_names()) | {"options"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"run config has unknown fields {unknown}")
    return RunConfig(**values).validate()


# ---- client --------------------------------------------------------------------------------------
@dataclass
class _Prepared:
    key: str = ""
    method: Method | None = None
    task: Task | None = None


_CLIENT = _Prepared()  # one prepared method per process, rebuilt only when the run config changes


def _prepared(cfg_json: str) -> tuple[Method, Task]:
    if _CLIENT.key != cfg_json:
        from fedsqueeze.methods import get_method
        from fedsqueeze.task import build_task

        cfg = config_from_json(cfg_json)
        method = get_method(cfg.method)(cfg)
        task = build_task(cfg)
        method.setup(task)
        _CLIENT.key, _CLIENT.method, _CLIENT.task = cfg_json, method, task
    return _CLIENT.method, _CLIENT.task


def _load_client_state(context: Context, method: Method, client: int) -> Any:
    from fedsqueeze.treeio import unpack_tree

    record = context.state.config_records.get(STATE)
    if record is None or record.get("client") != client:
        return method.init_client(client)
    return unpack_tree(record["tree"])


def _save_client_state(context: Context, client: int, state: Any) -> None:
    from fedsqueeze.treeio import pack_tree

    context.state.config_records[STATE] = ConfigRecord({"client": client, "tree": pack_tree(state)})


client_app = ClientApp()


@client_app.query()
def partition(msg: Message, context: Context) -> Message:
    """Tell the server which partition (client id) this node holds."""
    try:
        pid = int(context.node_config.get(PARTITION_KEY, -1))
    except (TypeError, ValueError):
        pid = -1  # the server reports the partitions nobody holds
    reply = ConfigRecord({PARTITION_KEY: pid})
    return Message(RecordDict({CONFIG: reply}), reply_to=msg)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Run the method's client function on the server's bytes; reply with the update bytes."""
    from fedsqueeze.methods import RoundContext

    conf = msg.content.config_records[CONFIG]
    client = int(conf["client"])
    try:
        method, _ = _prepared(str(conf["config"]))
        ctx = RoundContext(round=int(conf["round"]), rounds=int(conf["rounds"]), seed=int(conf["seed"]))
        message = record_bytes(msg.content)
        out = method.client_update(message, client, _load_client_state(context, method, client), ctx)
    except Exception as exc:  # reported to the server, which drops this client for the round
        log.warning("client %d failed: %s", client, traceback.format_exc())
        return Message(RecordDict({CONFIG: ConfigRecord({"error": f"{type(exc).__name__}: {exc}"})}), reply_to=msg)
    _save_client_state(context, client, out.state)
    metrics = MetricRecord({k: float(v) for k, v in out.metrics.items() if isinstance(v, (int, float))})
    return Message(RecordDict({PAYLOAD: bytes_record(out.payload), METRICS: metrics}), reply_to=msg)


# ---- server --------------------------------------------------------------------------------------
@dataclass
class ServerSettings:
    """How the server talks to the nodes (not part of the run config: it does not change results)."""

    runtime: str = "flower"
    wait_nodes_s: float = 120.0  # how long to wait for every partition's node to connect
    reply_timeout_s: float = 3600.0  # a client whose reply takes longer is dropped for the round
    show_progress: bool = True  # under `flwr run`, stderr of the ServerApp reaches `flwr run --stream`
    extra_header: dict[str, Any] = field(default_factory=dict)


def _exchange(grid: Grid, messages: list[Message], timeout: float) -> list[Message | None]:
    """Push ``messages``, pull replies until all arrived or ``timeout``; the replies in message order."""
    ids = list(grid.push_messages(messages))
    pending = {i for i in ids if i}
    replies: dict[str, Message] = {}
    end = time.monotonic() + timeout
    while pending and time.monotonic() < end:
        for reply in grid.pull_messages(list(pending)):
            replies[reply.metadata.reply_to_message_id] = reply
            pending.discard(reply.metadata.reply_to_message_id)
        if pending:
            time.sleep(POLL_S)
    return [replies.get(mid) for mid in ids]


def discover_partitions(grid: Grid, clients: int, wait_s: float) -> dict[int, int]:
    """Map each client id (partition) to the node holding it; waits for all of them to connect."""
    end = time.monotonic() + wait_s
    found: dict[int, int] = {}
    asked: set[int] = set()
    while True:
        nodes = [n for n in grid.get_node_ids() if n not in asked]
        if nodes:
            msgs = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
            for reply in _exchange(grid, msgs, max(end - time.monotonic(), 5.0)):
                if reply is None or reply.has_error():
                    continue
                node, pid = reply.metadata.src_node_id, int(reply.content.config_records[CONFIG][PARTITION_KEY])
                asked.add(node)
                if 0 <= pid < clients:
                    if pid in found and found[pid] != node:
                        raise ConfigError(f"two nodes ({found[pid]}, {node}) both claim partition-id={pid}")
                    found[pid] = node
        if len(found) == clients:
            return found
        if time.monotonic() > end:
            missing = sorted(set(range(clients)) - set(found))
            raise ConfigError(
                f"no node holds partition-id {missing[:10]} after {wait_s:.0f}s; start one SuperNode per client "
                f"with --node-config 'partition-id=N num-partitions={clients}' (N = 0..{clients - 1})"
            )
        time.sleep(1.0)


def _train_message(cfg_json: str, cfg: RunConfig, ctx: RoundContext, client: int, node: int, data: bytes) -> Message:
    conf = ConfigRecord({"config": cfg_json, "round": ctx.round, "rounds": ctx.rounds, "seed": ctx.seed, "client": client})
    return Message(RecordDict({PAYLOAD: bytes_record(data), CONFIG: conf}), dst_node_id=node,
                   message_type=MessageType.TRAIN, group_id=str(ctx.round))


def play_round(
    grid: Grid, method: Method, task: Task, cfg: RunConfig, cfg_json: str, nodes: dict[int, int], state: Any,
    ctx: RoundContext, settings: ServerSettings,
) -> tuple[Any, dict[str, Any]]:
    """One round over Flower; mirrors :func:`fedsqueeze.runtime.local.run_round` record for record."""
    from fedsqueeze.runtime.common import drops_out, inject_faults, round_record, sample_clients, simulated_round_time
    t_round = time.perf_counter()
    downlink: dict[int, int] = {}
    dropped: list[dict[str, Any]] = []
    outgoing: list[tuple[int, Message]] = []
    codec_s = 0.0
    for client in sample_clients(cfg, ctx):
        t0 = time.perf_counter()
        data = method.downlink(state, ctx, client)
        codec_s += time.perf_counter() - t0
        downlink[client] = len(data)
        if drops_out(cfg, ctx, client):  # simulated failure: as in the local runtime, the reply never comes
            dropped.append({"client": client, "reason": "dropout: no reply"})
            continue
        outgoing.append((client, _train_message(cfg_json, cfg, ctx, client, nodes[client], data)))
    replies = _exchange(grid, [m for _, m in outgoing], settings.reply_timeout_s) if outgoing else []
    by_client = dict(zip([c for c, _ in outgoing], replies))

    uplink: list[int] = []
    updates: dict[int, Any] = {}
    link_clients: dict[int, tuple[float, int, int]] = {}  # client compute s (as it reports), bytes down, up
    train_s = 0.0
    losses: list[float] = []
    for client in sorted(by_client):  # the local runtime's order, so aggregation sums in the same order
        reply = by_client[client]
        if reply is None:
            dropped.append({"client": client, "reason": f"no reply within {settings.reply_timeout_s:.0f}s"})
            continue
        if reply.has_error():
            dropped.append({"client": client, "reason": f"flower error {reply.error.code}: {reply.error.reason}"})
            continue
        conf = reply.content.config_records.get(CONFIG)
        if conf is not None and "error" in conf:
            log.warning("round %d: client %d raised %s", ctx.round, client, conf["error"])
            dropped.append({"client": client, "reason": f"client error: {conf['error']}"})
            continue
        metrics = reply.content.metric_records.get(METRICS, MetricRecord())
        train_s += float(metrics.get("train_s", 0.0))
        codec_s += float(metrics.get("codec_s", 0.0))
        if "train_loss" in metrics:
            losses.append(float(metrics["train_loss"]))
        try:
            payload = record_bytes(reply.content)
        except PayloadError as exc:
            dropped.append({"client": client, "reason": f"bad reply: {exc}"})
            continue
        payload, fault = inject_faults(cfg, ctx, client, payload)
        uplink.append(len(payload))
        compute_s = float(metrics.get("train_s", 0.0)) + float(metrics.get("codec_s", 0.0))
        link_clients[client] = (compute_s, downlink[client], len(payload))
        t1 = time.perf_counter()
        try:
            updates[client] = method.decode_update(payload, state, ctx)
        except PayloadError as exc:
            log.warning("round %d: dropped client %d: %s", ctx.round, client, exc)
            dropped.append({"client": client, "reason": f"bad payload ({fault or 'as sent'}): {exc}"})
        codec_s += time.perf_counter() - t1
    # as the local runtime: too few survivors and the round is skipped (Flower runs have no retry)
    skipped = len(updates) < cfg.min_clients
    state, agg_metrics = (state, {}) if skipped else method.aggregate(state, updates, ctx)
    accuracy, loss = method.evaluate(state)
    dropped.sort(key=lambda d: d["client"])
    extra = {"train_loss": sum(losses) / len(losses) if losses else None, "attempts": 1, "skipped": skipped,
             **agg_metrics, **simulated_round_time(cfg, link_clients)}
    record = round_record(
        round_=ctx.round, accuracy=accuracy, loss=loss, uplink=uplink, downlink=list(downlink.values()),
        model_params=task.model_params, aggregated=0 if skipped else len(updates), dropped=dropped,
        wall_s=time.perf_counter() - t_round, train_s=train_s, codec_s=codec_s, extra=extra,
    )
    return state, record


def serve(grid: Grid, cfg: RunConfig, settings: ServerSettings) -> dict[str, Any]:
    """The whole run on the server side: discover nodes, play the rounds, write results."""
    from fedsqueeze.methods import RoundContext, get_method
    from fedsqueeze.report import ResultsWriter
    from fedsqueeze.runtime.common import run_header
    from fedsqueeze.runtime.progress import RunProgress
    from fedsqueeze.task import build_task

    cfg_json = config_to_json(cfg)
    method = get_method(cfg.method)(cfg)
    task = build_task(cfg)
    method.setup(task)
    nodes = discover_partitions(grid, cfg.clients, settings.wait_nodes_s)
    log.info("flower: %d nodes hold partitions 0..%d", len(nodes), cfg.clients - 1)
    header = run_header(cfg, task.model_params, method.trainable_params(), settings.runtime)
    writer = ResultsWriter(cfg.out, {**header, **settings.extra_header})
    state = method.init_server()
    with RunProgress(cfg, task.model_params, method.trainable_params(), enabled=settings.show_progress) as progress:
        for r in range(1, cfg.rounds + 1):
            ctx = RoundContext(round=r, rounds=cfg.rounds, seed=cfg.seed)
            state, record = play_round(grid, method, task, cfg, cfg_json, nodes, state, ctx, settings)
            writer.add_round(record)
            for _ in range(record["clients"]):
                progress.advance_client()
            progress.round_done(record)
    return writer.write_json()


def make_server_app(cfg: RunConfig | None = None, settings: ServerSettings | None = None) -> ServerApp:
    """A ServerApp for ``cfg``; without one, it reads the config from the run config (``flwr run``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg
        if run_cfg is None:
            text = context.run_config.get(RUN_CONFIG_KEY)
            if not isinstance(text, str):
                raise ConfigError(f"run config has no {RUN_CONFIG_KEY!r} entry")
            run_cfg = config_from_json(text)
        serve(grid, run_cfg, settings or ServerSettings(
            wait_nodes_s=float(context.run_config.get(WAIT_KEY, 120.0)),
            reply_timeout_s=float(context.run_config.get(TIMEOUT_KEY, 3600.0)),
        ))

    return app


server_app = make_server_app()  # the component `flwr run` loads (see runtime/flower.py)
