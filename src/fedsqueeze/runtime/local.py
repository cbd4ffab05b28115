"""The in-process simulator (``--runtime local``): one model in memory, clients are data + state.

Each round: sample clients (seeded) → for each, the server encodes its message, the client decodes
it, trains and encodes its update, the server decodes it → aggregate the survivors → evaluate on
the held-out test split → checkpoint. A client that drops out, raises, hangs past
``client_timeout``, replies after the ``deadline``, or whose payload fails to decode is left out of
that round with the reason recorded; the run goes on. A round with fewer than ``min_clients``
survivors is re-sampled or skipped (``min_clients_policy``). See docs/reliability.md.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from fedsqueeze.config import RunConfig, build_config, to_toml
from fedsqueeze.errors import ConfigError, PayloadError
from fedsqueeze.methods import ClientOutput, Method, RoundContext, get_method
from fedsqueeze.report import ResultsWriter
from fedsqueeze.report.results import atomic_write_text
from fedsqueeze.runtime.checkpoint import (
    CONFIG_FILE, Checkpoint, encode_checkpoint, load_checkpoint, save_checkpoint,
)
from fedsqueeze.runtime.common import (
    client_fault, drops_out, garbage_payload, inject_faults, round_record, run_header, sample_clients, simulated_round_time,
    straggler_delay,
)
from fedsqueeze.runtime.progress import RunProgress
from fedsqueeze.seeding import SERVER
from fedsqueeze.task import Task, build_task

log = logging.getLogger("fedsqueeze")


class ClientFault(RuntimeError):
    """A client failed in a way the runtime detected (timeout, injected crash)."""


def prepare(cfg: RunConfig) -> tuple[Method, Task]:
    """Validate the method and its options first (cheap), then build the task and set the method up."""
    method = get_method(cfg.method)(cfg)
    task = build_task(cfg)
    method.setup(task)
    return method, task


def call_with_timeout(fn: Callable[[threading.Event], ClientOutput], timeout_s: float, name: str) -> ClientOutput:
    """Run ``fn(abandon)`` in a worker thread; raise ClientFault if it has not returned in ``timeout_s``.

    Python cannot kill a thread, so a late one is abandoned: ``abandon`` is set (a cooperative client,
    such as the injected ``fault_hang``, returns at once) and the daemon thread is left to finish on
    its own. ``timeout_s <= 0`` calls ``fn`` directly in this thread.
    """
    abandon = threading.Event()
    if timeout_s <= 0:
        return fn(abandon)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["out"] = fn(abandon)
        except BaseException as exc:  # handed to the caller below
            box["exc"] = exc

    worker = threading.Thread(target=target, name=name, daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        abandon.set()
        raise ClientFault(f"timeout: no reply within client_timeout={timeout_s:g}s (client abandoned)")
    if "exc" in box:
        raise box["exc"]
    return box["out"]


@dataclass
class RoundTally:
    """What a round's attempts add up to: bytes sent, time spent, dropped clients, decoded updates."""

    uplink: list[int] = field(default_factory=list)
    downlink: list[int] = field(default_factory=list)
    updates: dict[int, Any] = field(default_factory=dict)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    link: dict[int, tuple[float, int, int]] = field(default_factory=dict)  # client: (compute s, bytes down, up)
    train_s: float = 0.0
    codec_s: float = 0.0

    def drop(self, client: int, reason: str, round_: int, attempt: int) -> None:
        log.warning("round %d: dropped client %d: %s", round_, client, reason)
        entry: dict[str, Any] = {"client": client, "reason": reason}
        if attempt:
            entry["attempt"] = attempt
        self.dropped.append(entry)


def run_client(
    method: Method, cfg: RunConfig, message: bytes, client: int, cstate: Any, ctx: RoundContext, attempt: int
) -> ClientOutput:
    """One client's update, with the injected faults of this round and the configured timeout."""
    fault = client_fault(cfg, ctx, client, attempt)

    def work(abandon: threading.Event) -> ClientOutput:
        if fault == "raise":
            raise ClientFault("injected fault: the client crashed")
        if fault == "hang":
            abandon.wait()  # hangs until the runtime gives up on it, then leaves without touching the model
            raise ClientFault("injected fault: the client hung")
        out = method.client_update(message, client, cstate, ctx)
        if fault == "garbage" and isinstance(out, ClientOutput):
            out = ClientOutput(garbage_payload(ctx, client, out.payload, attempt), out.state, out.metrics)
        return out

    return call_with_timeout(work, cfg.client_timeout, f"fedsqueeze-client-{client}")


def play_client(
    method: Method, cfg: RunConfig, state: Any, client_states: dict[int, Any], ctx: RoundContext,
    client: int, attempt: int, tally: RoundTally,
) -> None:
    """Send ``client`` the server's message, run its update, decode what comes back into ``tally``."""
    t0 = time.perf_counter()
    message = method.downlink(state, ctx, client)
    tally.codec_s += time.perf_counter() - t0
    tally.downlink.append(len(message))
    if drops_out(cfg, ctx, client, attempt):
        tally.drop(client, "dropout: no reply", ctx.round, attempt)
        return
    t_client = time.perf_counter()
    try:
        out = run_client(method, cfg, message, client, client_states.get(client, method.init_client(client)), ctx, attempt)
    except Exception as exc:  # one failing client must not end the run
        tally.drop(client, f"client error: {type(exc).__name__}: {exc}", ctx.round, attempt)
        return
    client_s = time.perf_counter() - t_client
    if not (isinstance(out, ClientOutput) and isinstance(out.payload, (bytes, bytearray)) and isinstance(out.metrics, dict)):
        tally.drop(client, f"garbage: client returned {type(getattr(out, 'payload', out)).__name__}, not bytes", ctx.round, attempt)
        return
    client_states[client] = out.state
    tally.train_s += out.metrics.get("train_s", 0.0)
    tally.codec_s += out.metrics.get("codec_s", 0.0)
    if "train_loss" in out.metrics:
        tally.losses.append(out.metrics["train_loss"])
    payload, fault = inject_faults(cfg, ctx, client, bytes(out.payload), attempt)
    tally.uplink.append(len(payload))  # sent, so counted, even if it arrives late or is rejected
    arrival_s = client_s + straggler_delay(cfg, ctx, client, attempt)
    if cfg.deadline > 0 and arrival_s > cfg.deadline:
        tally.drop(client, f"straggler: reply after {arrival_s:.1f}s, past the {cfg.deadline:g}s deadline", ctx.round, attempt)
        return
    tally.link[client] = (arrival_s, len(message), len(payload))
    t1 = time.perf_counter()
    try:
        tally.updates[client] = method.decode_update(payload, state, ctx)
    except PayloadError as exc:
        tally.drop(client, f"bad payload ({fault or 'as sent'}): {exc}", ctx.round, attempt)
    tally.codec_s += time.perf_counter() - t1


def run_round(
    method: Method, task: Task, cfg: RunConfig, state: Any, client_states: dict[int, Any], ctx: RoundContext,
    progress: RunProgress | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Play one round (re-sampling it if too few clients survive); return the new server state and its record."""
    t_round = time.perf_counter()
    torch.manual_seed(ctx.seed_for(SERVER, "torch-global"))  # any draw from torch's global RNG replays on resume
    tally = RoundTally()
    attempts = 1 + (cfg.max_retries if cfg.min_clients_policy == "retry" else 0)
    for attempt in range(attempts):
        clients = sample_clients(cfg, ctx, attempt)
        # a failed attempt's updates are discarded; the clients keep their own state, as real clients
        # would (they never learn that the server threw their update away)
        tally.updates, tally.link = {}, {}
        for client in clients:
            play_client(method, cfg, state, client_states, ctx, client, attempt, tally)
            if progress:
                progress.advance_client()
        if len(tally.updates) >= cfg.min_clients:
            break
        log.warning("round %d: %d of %d clients survived, min_clients=%d", ctx.round, len(tally.updates), len(clients), cfg.min_clients)
    skipped = len(tally.updates) < cfg.min_clients
    if skipped:
        state, agg_metrics = state, {}
    else:
        state, agg_metrics = method.aggregate(state, tally.updates, ctx)
    accuracy, loss = method.evaluate(state)
    extra = {
        "train_loss": sum(tally.losses) / len(tally.losses) if tally.losses else None,
        "attempts": attempt + 1, "skipped": skipped, **agg_metrics,
        **simulated_round_time(cfg, tally.link),
    }
    record = round_record(
        round_=ctx.round, accuracy=accuracy, loss=loss, uplink=tally.uplink, downlink=tally.downlink,
        model_params=task.model_params, aggregated=0 if skipped else len(tally.updates), dropped=tally.dropped,
        wall_s=time.perf_counter() - t_round, train_s=tally.train_s, codec_s=tally.codec_s, extra=extra,
    )
    return state, record


def run_local(cfg: RunConfig, show_progress: bool = True, resume: Checkpoint | None = None) -> dict[str, Any]:
    """Run ``cfg`` in this process (from ``resume`` if given); write and return results.json's content."""
    method, task = prepare(cfg)
    state = method.init_server()
    client_states: dict[int, Any] = {}
    done: list[dict[str, Any]] = []
    if resume is not None:
        state, client_states, done = resume.server_state, dict(resume.client_states), list(resume.rounds)
    else:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(cfg.out) / CONFIG_FILE, to_toml(cfg))
    writer = ResultsWriter(cfg.out, run_header(cfg, task.model_params, method.trainable_params(), "local"), done)
    with RunProgress(cfg, task.model_params, method.trainable_params(), enabled=show_progress) as progress:
        if done and show_progress:
            progress.console.print(f"resuming {cfg.out} after round {len(done)} of {cfg.rounds}")
        for r in range(len(done) + 1, cfg.rounds + 1):
            ctx = RoundContext(round=r, rounds=cfg.rounds, seed=cfg.seed)
            state, record = run_round(method, task, cfg, state, client_states, ctx, progress)
            if cfg.checkpoint:  # before rounds.csv: a resumed run rewrites the CSV from the checkpoint
                data = encode_checkpoint(config=cfg.to_dict(), round_=r, server_state=state,
                                         client_states=client_states, rounds=[*writer.rounds, record])
                save_checkpoint(cfg.out, data)
            writer.add_round(record)
            progress.round_done(record)
    return writer.write_json()


def resume_local(out_dir: str | Path, show_progress: bool = True) -> dict[str, Any]:
    """Continue the run saved in ``out_dir`` (its config.toml and checkpoint) to its last round."""
    out = Path(out_dir)
    config_file = out / CONFIG_FILE
    if not config_file.is_file():
        raise ConfigError(f"{str(out)!r} holds no {CONFIG_FILE}: not a fedsqueeze run directory (pass the run's --out)")
    cfg = build_config(config_file, {"out": str(out)})
    ckpt = load_checkpoint(out)
    if ckpt is not None:
        saved = {**ckpt.config, "out": str(out)}
        if saved != cfg.to_dict():
            changed = sorted(k for k in saved if saved.get(k) != cfg.to_dict().get(k))
            raise ConfigError(f"{config_file} no longer matches the checkpoint (differs in {changed}); restore it to resume")
    return run_local(cfg, show_progress, resume=ckpt)
