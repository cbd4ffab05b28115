"""The in-process simulator (``--runtime local``): one model in memory, clients are data + state.

Each round: sample clients (seeded) → for each, the server encodes its message, the client decodes
it, trains and encodes its update, the server decodes it → aggregate the survivors → evaluate on
the held-out test split. A client that drops out, raises, or whose payload fails to decode is left
out of that round with the reason recorded; the run goes on.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from fedsqueeze.config import RunConfig
from fedsqueeze.errors import PayloadError
from fedsqueeze.methods import Method, RoundContext, get_method
from fedsqueeze.report import ResultsWriter
from fedsqueeze.runtime.common import drops_out, inject_faults, round_record, run_header, sample_clients, simulated_round_time
from fedsqueeze.runtime.progress import RunProgress
from fedsqueeze.task import Task, build_task

log = logging.getLogger("fedsqueeze")


def prepare(cfg: RunConfig) -> tuple[Method, Task]:
    """Validate the method and its options first (cheap), then build the task and set the method up."""
    method = get_method(cfg.method)(cfg)
    task = build_task(cfg)
    method.setup(task)
    return method, task


def run_round(
    method: Method, task: Task, cfg: RunConfig, state: Any, client_states: dict[int, Any], ctx: RoundContext,
    progress: RunProgress | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Play one round; return the new server state and the round's record."""
    t_round = time.perf_counter()
    uplink: list[int] = []
    downlink: list[int] = []
    updates: dict[int, Any] = {}
    dropped: list[dict[str, Any]] = []
    train_s = codec_s = 0.0
    losses: list[float] = []
    link_clients: dict[int, tuple[float, int, int]] = {}  # client -> (compute_s, down, up) for the link model
    for client in sample_clients(cfg, ctx):
        t0 = time.perf_counter()
        message = method.downlink(state, ctx, client)
        codec_s += time.perf_counter() - t0
        downlink.append(len(message))
        if drops_out(cfg, ctx, client):
            dropped.append({"client": client, "reason": "dropout: no reply"})
        else:
            t_client = time.perf_counter()
            try:
                out = method.client_update(message, client, client_states.get(client, method.init_client(client)), ctx)
            except Exception as exc:  # one failing client must not end the run
                log.warning("round %d: client %d raised %s: %s", ctx.round, client, type(exc).__name__, exc)
                dropped.append({"client": client, "reason": f"client error: {type(exc).__name__}: {exc}"})
                out = None
            if out is not None:
                client_states[client] = out.state
                train_s += out.metrics.get("train_s", 0.0)
                codec_s += out.metrics.get("codec_s", 0.0)
                if "train_loss" in out.metrics:
                    losses.append(out.metrics["train_loss"])
                payload, fault = inject_faults(cfg, ctx, client, out.payload)
                uplink.append(len(payload))
                link_clients[client] = (time.perf_counter() - t_client, len(message), len(payload))
                t1 = time.perf_counter()
                try:
                    updates[client] = method.decode_update(payload, state, ctx)
                except PayloadError as exc:
                    log.warning("round %d: dropped client %d: %s", ctx.round, client, exc)
                    dropped.append({"client": client, "reason": f"bad payload ({fault or 'as sent'}): {exc}"})
                codec_s += time.perf_counter() - t1
        if progress:
            progress.advance_client()
    state, agg_metrics = method.aggregate(state, updates, ctx)
    accuracy, loss = method.evaluate(state)
    extra = {"train_loss": sum(losses) / len(losses) if losses else None, **agg_metrics,
             **simulated_round_time(cfg, link_clients)}
    record = round_record(
        round_=ctx.round, accuracy=accuracy, loss=loss, uplink=uplink, downlink=downlink,
        model_params=task.model_params, aggregated=len(updates), dropped=dropped,
        wall_s=time.perf_counter() - t_round, train_s=train_s, codec_s=codec_s, extra=extra,
    )
    return state, record


def run_local(cfg: RunConfig, show_progress: bool = True) -> dict[str, Any]:
    """Run ``cfg`` in this process; write and return results.json's content."""
    method, task = prepare(cfg)
    state = method.init_server()
    client_states: dict[int, Any] = {}
    writer = ResultsWriter(cfg.out, run_header(cfg, task.model_params, method.trainable_params(), "local"))
    with RunProgress(cfg, task.model_params, method.trainable_params(), enabled=show_progress) as progress:
        for r in range(1, cfg.rounds + 1):
            ctx = RoundContext(round=r, rounds=cfg.rounds, seed=cfg.seed)
            state, record = run_round(method, task, cfg, state, client_states, ctx, progress)
            writer.add_round(record)
            progress.round_done(record)
    return writer.write_json()
