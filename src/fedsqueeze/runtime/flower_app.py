"""The Flower ServerApp: the round engine over a Flower Grid (simulation engine or deployment).

:class:`FlowerTransport` is the engine's transport on Flower: each sampled client is a node, its
message leaves as a ``train`` Message (see :mod:`fedsqueeze.runtime.flower_wire`) and its update
comes back in the reply. Sampling, faults, deadlines, decoding, retries, records, results and
checkpoints are the engine's, exactly as in the local runtime. The ClientApp is in
:mod:`fedsqueeze.runtime.flower_client` (``client_app`` is re-exported here).

The server asks every node once for the partition it holds (a ``query`` message) and sends
client ``c``'s work to the node holding partition ``c``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedsqueeze.config import RunConfig
from fedsqueeze.errors import ConfigError, PayloadError
from fedsqueeze.runtime.engine import ClientCall, ClientReply, Engine, Transport, prepare
from fedsqueeze.runtime.faults import timeout_reason
from fedsqueeze.runtime.flower_client import client_app
from fedsqueeze.runtime.flower_wire import (
    CONFIG,
    PARTITION_KEY,
    TrainRequest,
    config_from_json,
    config_to_json,
    read_reply,
    train_message,
)

if TYPE_CHECKING:
    from fedsqueeze.runtime.checkpoint import Checkpoint

__all__ = ["FlowerTransport", "ServerSettings", "client_app", "discover_partitions", "make_server_app", "server_app"]

log = logging.getLogger("fedsqueeze")

RUN_CONFIG_KEY = "fedsqueeze-config"  # key of the run config JSON in [tool.flwr.app.config]
WAIT_KEY = "fedsqueeze-wait-nodes-s"
TIMEOUT_KEY = "fedsqueeze-reply-timeout-s"
RESUME_KEY = "fedsqueeze-resume"  # continue the run from the checkpoint in its `out`
POLL_S = 0.2  # how often the server asks the SuperLink for replies (Flower's own default is 3 s)


@dataclass
class ServerSettings:
    """How the server talks to the nodes (not part of the run config: it does not change results)."""

    runtime: str = "flower"
    wait_nodes_s: float = 120.0  # how long to wait for every partition's node to connect
    reply_timeout_s: float = 3600.0  # without client_timeout: a client whose reply takes longer is dropped
    show_progress: bool = True  # under `flwr run`, stderr of the ServerApp reaches `flwr run --stream`
    state_dir: str | None = None  # simulation: where the (virtual, same-machine) nodes keep client state
    prepare_nodes: bool = False  # simulation: nodes build their task before round 1 (their processes live on)
    resume: Checkpoint | None = None  # continue from this checkpoint
    resume_from_out: bool = False  # continue from the checkpoint in cfg.out (deployment: `flwr run`)
    extra_header: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] | None = None  # set when the run ends


def _exchange(grid: Grid, messages: list[Message], timeout: float) -> list[Message | None]:
    """Push ``messages``, pull replies until all arrived or ``timeout``; the replies in message order."""
    ids = list(grid.push_messages(messages))
    pending = {i for i in ids if i}
    replies: dict[str, Message] = {}
    end = time.monotonic() + timeout
    while pending and time.monotonic() < end:
        for reply in grid.pull_messages(list(pending)):
            mid = reply.metadata.reply_to_message_id
            if mid in pending:
                replies[mid] = reply
                pending.discard(mid)
        if pending:
            time.sleep(POLL_S)
    return [replies.get(mid) for mid in ids]


def _partition_of(reply: Message | None) -> int | None:
    """The partition a node's query reply claims, or None for a reply that says nothing usable."""
    if reply is None or reply.has_error():
        return None
    conf = reply.content.config_records.get(CONFIG)
    pid = conf.get(PARTITION_KEY) if conf is not None else None
    return pid if type(pid) is int else None


def discover_partitions(grid: Grid, clients: int, wait_s: float, prepare_config: str | None = None) -> dict[int, int]:
    """Map each client id (partition) to the node holding it; waits for all of them to connect.

    With ``prepare_config`` (a run config's JSON) every node also builds its method and task now.

    A node that claims a partition another node already holds is ignored (and logged): it can
    neither take the partition over nor end the run.
    """
    end = time.monotonic() + wait_s
    found: dict[int, int] = {}
    asked: set[int] = set()
    while True:
        nodes = [n for n in grid.get_node_ids() if n not in asked]
        if nodes:
            content: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = (
                {CONFIG: ConfigRecord({"config": prepare_config})} if prepare_config else {}
            )
            msgs = [Message(RecordDict(content), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
            for node, reply in zip(nodes, _exchange(grid, msgs, max(end - time.monotonic(), 5.0))):
                pid = _partition_of(reply)
                if reply is not None:
                    asked.add(node)
                if pid is None or not 0 <= pid < clients:
                    continue
                if pid in found and found[pid] != node:
                    log.warning("flower: node %d claims partition-id=%d, already held by node %d: ignored", node, pid, found[pid])
                    continue
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


class FlowerTransport(Transport):
    """The engine's transport over a Flower Grid: one ``train`` message per client, replies pulled back."""

    name = "flower"

    def __init__(self, grid: Grid, nodes: dict[int, int], cfg: RunConfig, settings: ServerSettings) -> None:
        self.grid, self.nodes, self.cfg, self.settings = grid, nodes, cfg, settings
        self.cfg_json = config_to_json(cfg)

    def _request(self, call: ClientCall) -> TrainRequest:
        ctx = call.ctx
        return TrainRequest(
            config_json=self.cfg_json,
            round=ctx.round,
            rounds=ctx.rounds,
            seed=ctx.seed,
            client=call.client,
            attempt=ctx.attempt,
            participants=ctx.participants,
            state_version=call.state_version,
            state_dir=self.settings.state_dir,
            message=call.message,
        )

    def exchange(self, calls: list[ClientCall]) -> dict[int, ClientReply]:
        return {call.client: reply for call, reply in self.replies(calls) if reply is not None}

    def replies(self, calls: list[ClientCall]) -> Iterator[tuple[ClientCall, ClientReply | None]]:
        """Push every call, pull the replies, then hand them to the engine one at a time, each
        Flower message let go as soon as its payload is read (the engine folds it in before the next)."""
        timeout = self.cfg.client_timeout if self.cfg.client_timeout > 0 else self.settings.reply_timeout_s
        missing = timeout_reason(timeout) if self.cfg.client_timeout > 0 else f"no reply within {timeout:.0f}s"
        t0 = time.monotonic()
        messages = _exchange(self.grid, [train_message(self._request(c), self.nodes[c.client]) for c in calls], timeout)
        waited = time.monotonic() - t0
        for i, call in enumerate(calls):
            message, messages[i] = messages[i], None
            yield call, self._reply(message, missing, waited)

    @staticmethod
    def _reply(reply: Message | None, missing: str, waited: float) -> ClientReply:
        """The engine's reply from one Flower message (``missing``: the reason when none came)."""
        if reply is None:
            return ClientReply(error=missing)
        if reply.has_error():
            return ClientReply(error=f"flower error {reply.error.code}: {reply.error.reason}")
        try:
            payload, metrics, error = read_reply(reply)
        except PayloadError as exc:
            return ClientReply(error=f"bad reply: {exc}")
        if error is not None:
            return ClientReply(error=f"client error: {error}")
        # the client's own account of its time, bounded by what the server saw
        for key in ("train_s", "codec_s"):
            if key in metrics:
                metrics[key] = min(max(metrics[key], 0.0), waited)
        compute_s = min(metrics.get("train_s", 0.0) + metrics.get("codec_s", 0.0), waited)
        return ClientReply(payload=payload, metrics=metrics, compute_s=compute_s)

    def client_states(self) -> dict[int, Any]:
        return {}  # they stay on the nodes

    def restore(self, client_states: dict[int, Any]) -> None:
        if client_states:
            raise ConfigError("this checkpoint holds client states of a local run; resume it with --runtime local")


def _resume_checkpoint(cfg: RunConfig, settings: ServerSettings) -> Checkpoint | None:
    from fedsqueeze.runtime.checkpoint import load_checkpoint

    if settings.resume is not None or not settings.resume_from_out:
        return settings.resume
    ckpt = load_checkpoint(cfg.out)
    if ckpt is not None and {**ckpt.config, "out": cfg.out} != cfg.to_dict():
        raise ConfigError(f"the checkpoint in {cfg.out} is of another config; resume it with its own config.toml")
    return ckpt


def serve(grid: Grid, cfg: RunConfig, settings: ServerSettings) -> dict[str, Any]:
    """The whole run on the server side: discover nodes, then the engine plays the rounds."""
    method, task = prepare(cfg)
    resume = _resume_checkpoint(cfg, settings)
    nodes = discover_partitions(grid, cfg.clients, settings.wait_nodes_s, config_to_json(cfg) if settings.prepare_nodes else None)
    log.info("flower: %d nodes hold partitions 0..%d", len(nodes), cfg.clients - 1)
    engine = Engine(
        cfg,
        method,
        task,
        FlowerTransport(grid, nodes, cfg, settings),
        runtime=settings.runtime,
        show_progress=settings.show_progress,
        extra_header=settings.extra_header,
    )
    settings.results = engine.run(resume)
    return settings.results


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
        serve(
            grid,
            run_cfg,
            settings
            or ServerSettings(
                wait_nodes_s=float(context.run_config.get(WAIT_KEY, 120.0)),
                reply_timeout_s=float(context.run_config.get(TIMEOUT_KEY, 3600.0)),
                resume_from_out=bool(context.run_config.get(RESUME_KEY, False)),
            ),
        )

    return app


server_app = make_server_app()  # the component `flwr run` loads (see runtime/flower.py)
