"""The round engine: the one round loop of every runtime.

The engine owns everything a round is made of: client sampling, dropout and the seeded faults,
stragglers and deadlines, decoding, the ``min_clients`` retry/skip policy, the round record,
results.json / rounds.csv and checkpoints. A runtime is only a :class:`Transport`: "deliver these
messages to these clients, collect their replies". The local simulator
(:class:`~fedsqueeze.runtime.local.LocalTransport`) and Flower
(:class:`~fedsqueeze.runtime.flower_app.FlowerTransport`, for the simulation engine and a
deployment alike) are two transports under the same loop, so one config gives the same round
records (bytes, drops with their reasons, accuracy) in every runtime.

A round, attempt by attempt:

1. sample ``clients_per_round`` clients (seeded by round and attempt);
2. encode each one's downlink (counted, even for a client that then drops out);
3. hand the messages of the clients that did not drop out to the transport; the client side runs
   the method behind :func:`~fedsqueeze.runtime.faults.with_injected_faults`;
4. for each reply, in client order, taken from the transport one at a time: damage it in transit
   (``fault_corrupt``/``fault_truncate``), count its bytes, drop it if it arrives after the
   ``deadline``, decode it; where the method's rule allows (FedAvg's weighted mean with its server
   optimizers, norm bounding, SCAFFOLD, DP-FedAvg: ``method.accumulator``), fold the update into
   the round's running sum at once and drop it, so the server holds one decoded update, not K;
5. with at least ``min_clients`` decoded updates, aggregate (finish the sum, or hand the method
   the list of updates), never adopting a non-finite model (runtime/integrity.py); otherwise retry
   with a fresh sample or keep the model (``min_clients_policy``). Then evaluate and write the record.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsqueeze.config import RunConfig, build_config, to_toml
from fedsqueeze.errors import ConfigError, PayloadError
from fedsqueeze.methods import Method, RoundContext, get_method
from fedsqueeze.results import ResultsWriter, atomic_write_text
from fedsqueeze.runtime.checkpoint import (
    CONFIG_FILE,
    Checkpoint,
    check_checkpoint,
    encode_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from fedsqueeze.runtime.common import round_record, run_header, sample_clients, simulated_round_time
from fedsqueeze.runtime.faults import check_attack, drops_out, inject_faults, straggler_delay
from fedsqueeze.runtime.integrity import StreamGuard, aggregate_finite, clip_examples
from fedsqueeze.runtime.progress import RunProgress
from fedsqueeze.seeding import SERVER
from fedsqueeze.task import Task, build_task

log = logging.getLogger("fedsqueeze")

StateVersion = tuple[int, int]  # (round, attempt) after which a client last updated its state


def prepare(cfg: RunConfig) -> tuple[Method, Task]:
    """Build the method (validating its options, cheaply), then the task, then set the method up.

    The one place a method and its task are built: the local runtime, the Flower ServerApp and
    the Flower ClientApp all call it.
    """
    method = get_method(cfg.method)(cfg)
    check_attack(cfg, method)
    task = build_task(cfg)
    method.setup(task)
    return method, task


@dataclass
class ClientCall:
    """One message the server sends one client this round attempt."""

    client: int
    message: bytes
    ctx: RoundContext  # round, attempt and the attempt's participants
    state_version: StateVersion | None  # the client state the server knows the client holds (None: initial)


@dataclass
class ClientReply:
    """What came back from one client: a payload, or the reason there is none."""

    payload: bytes | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None  # the drop reason when no usable reply came
    compute_s: float = 0.0  # the client's time to reply (measured, or reported and bounded)


class Transport(ABC):
    """Moves a round's messages to clients and their replies back. Knows nothing of the algorithm."""

    name: str = "transport"

    @abstractmethod
    def exchange(self, calls: list[ClientCall]) -> dict[int, ClientReply]:
        """Deliver every call and collect the replies (by client id); a missing client has no reply."""

    def replies(self, calls: list[ClientCall]) -> Iterator[tuple[ClientCall, ClientReply | None]]:
        """Each call with its reply (None: none came), in call order, the engine taking one at a time.

        The engine decodes and folds each reply in before it asks for the next, and keeps no
        reference to it: a transport that yields them as they are made or released (the local
        simulator runs each client only when asked) lets the server hold one payload at a time.
        By default: :meth:`exchange`, each reply let go once it was handed over.
        """
        got = self.exchange(calls)
        for call in calls:
            yield call, got.pop(call.client, None)

    def client_states(self) -> dict[int, Any]:
        """The client states a checkpoint must keep (a transport whose clients keep their own: none)."""
        return {}

    def restore(self, client_states: dict[int, Any]) -> None:
        """Take back the client states of a checkpoint."""


@dataclass
class RoundTally:
    """What a round's attempts add up to: bytes sent, time spent, dropped clients, decoded updates."""

    uplink: list[int] = field(default_factory=list)
    downlink: list[int] = field(default_factory=list)
    decoded: list[int] = field(default_factory=list)  # the clients whose update was decoded this attempt
    updates: dict[int, Any] = field(default_factory=dict)  # their updates (list path; a streamed round folds them in)
    stream: StreamGuard | None = None  # this attempt's streamed aggregation (None: the method takes the list)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    personal: list[float] = field(default_factory=list)  # personalised-model accuracies the clients report (fedsa-lora)
    link: dict[int, tuple[float, int, int]] = field(default_factory=dict)  # client: (compute s, bytes down, up)
    clipped: list[dict[str, int]] = field(default_factory=list)  # example counts over max_client_examples
    train_s: float = 0.0
    codec_s: float = 0.0

    def drop(self, client: int, reason: str, round_: int, attempt: int) -> None:
        log.warning("round %d: dropped client %d: %s", round_, client, reason)
        entry: dict[str, Any] = {"client": client, "reason": reason}
        if attempt:
            entry["attempt"] = attempt
        self.dropped.append(entry)


def _metric(metrics: dict[str, Any], key: str) -> float:
    """A non-negative finite metric of a client's reply, or 0 (replies are hostile)."""
    value = metrics.get(key, 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= float(value) < float("inf")):
        return 0.0
    return float(value)


def stream_guard(method: Method, state: Any, ctx: RoundContext, min_clients: int) -> StreamGuard | None:
    """The streamed, guarded aggregation of one round attempt, if the method's rule allows it.

    A method offers one with ``accumulator(state, ctx)`` (:class:`~fedsqueeze.methods.updates.Accumulator`);
    one without, or whose rule needs every update at once, gets None and the list path.
    """
    make = getattr(method, "accumulator", None)
    acc = make(state, ctx) if callable(make) else None
    return StreamGuard(acc, ctx, min_clients) if acc is not None else None


class Engine:
    """Plays the rounds of one run over one transport and writes its results and checkpoints."""

    def __init__(
        self,
        cfg: RunConfig,
        method: Method,
        task: Task,
        transport: Transport,
        *,
        runtime: str,
        show_progress: bool = True,
        extra_header: dict[str, Any] | None = None,
    ) -> None:
        self.cfg, self.method, self.task, self.transport = cfg, method, task, transport
        self.runtime = runtime
        self.show_progress = show_progress
        self.extra_header = extra_header or {}
        self.state_versions: dict[int, StateVersion] = {}

    # ---- one round --------------------------------------------------------------------------------
    def play_round(self, state: Any, ctx: RoundContext, progress: RunProgress | None = None) -> tuple[Any, dict[str, Any]]:
        """Play round ``ctx.round`` (re-sampling it if too few clients survive); the new state and its record."""
        cfg, method = self.cfg, self.method
        t_round = time.perf_counter()
        torch.manual_seed(ctx.seed_for(SERVER, "torch-global"))  # any draw from torch's global RNG replays on resume
        tally = RoundTally()
        attempts = 1 + (cfg.max_retries if cfg.min_clients_policy == "retry" else 0)
        attempt = 0
        for attempt in range(attempts):
            clients = sample_clients(cfg, ctx, attempt)
            actx = replace(ctx, attempt=attempt, participants=tuple(clients))
            # a failed attempt's updates are discarded; the clients keep their own state, as real clients
            # would (they never learn that the server threw their update away)
            tally.decoded, tally.updates, tally.link, tally.clipped = [], {}, {}, []
            tally.stream = stream_guard(method, state, replace(ctx, attempt=attempt), cfg.min_clients)
            calls = self._send(state, actx, clients, tally)
            for call, reply in self.transport.replies(calls) if calls else ():
                self._receive(call, reply, state, tally)
                del reply  # a streamed round holds no reply once it is folded in
            if progress:
                for _ in clients:
                    progress.advance_client()
            if len(tally.decoded) >= cfg.min_clients:
                break
            log.warning("round %d: %d of %d clients survived, min_clients=%d", ctx.round, len(tally.decoded), len(clients), cfg.min_clients)
        skipped = len(tally.decoded) < cfg.min_clients
        agg_metrics: dict[str, Any] = {}
        aggregated = 0
        if not skipped:
            # never adopt a non-finite model: drop the clients that would make it so (runtime/integrity.py)
            if tally.stream is not None:
                agg = tally.stream.finish(state)
            else:
                agg = aggregate_finite(method, state, tally.updates, replace(ctx, attempt=attempt), cfg.min_clients)
            tally.stream = None
            for client, reason in agg.dropped.items():
                tally.drop(client, reason, ctx.round, attempt)
            state, agg_metrics, aggregated = agg.state, agg.metrics, agg.aggregated
            if agg.rejected is not None:
                skipped, agg_metrics = True, {"aggregate_rejected": agg.rejected}
        accuracy, loss = method.evaluate(state)
        extra = {
            "train_loss": sum(tally.losses) / len(tally.losses) if tally.losses else None,
            "attempts": attempt + 1,
            "skipped": skipped,
            **({"personal_accuracy": sum(tally.personal) / len(tally.personal)} if tally.personal else {}),
            **agg_metrics,
            **({"clipped_examples": tally.clipped} if tally.clipped else {}),
            **simulated_round_time(cfg, tally.link),
        }
        record = round_record(
            round_=ctx.round,
            accuracy=accuracy,
            loss=loss,
            uplink=tally.uplink,
            downlink=tally.downlink,
            model_params=self.task.model_params,
            aggregated=aggregated,
            dropped=tally.dropped,
            wall_s=time.perf_counter() - t_round,
            train_s=tally.train_s,
            codec_s=tally.codec_s,
            extra=extra,
        )
        return state, record

    def _send(self, state: Any, ctx: RoundContext, clients: list[int], tally: RoundTally) -> list[ClientCall]:
        """Encode each sampled client's message (counted); the calls of those that do not drop out."""
        calls = []
        for client in clients:
            t0 = time.perf_counter()
            message = self.method.downlink_for(state, ctx, client, self.state_versions.get(client))
            tally.codec_s += time.perf_counter() - t0
            tally.downlink.append(len(message))
            if drops_out(self.cfg, ctx, client, ctx.attempt):
                tally.drop(client, "dropout: no reply", ctx.round, ctx.attempt)
                continue
            calls.append(ClientCall(client, message, ctx, self.state_versions.get(client)))
        return calls

    def _receive(self, call: ClientCall, reply: ClientReply | None, state: Any, tally: RoundTally) -> None:
        """Account for one client's reply and decode it into ``tally`` (or drop the client, saying why)."""
        cfg, ctx, client = self.cfg, call.ctx, call.client
        if reply is None:
            reply = ClientReply(error="no reply")
        if reply.error is not None or reply.payload is None:
            tally.drop(client, reply.error or "no payload", ctx.round, ctx.attempt)
            return
        self.state_versions[client] = (ctx.round, ctx.attempt)  # it replied, so it updated its state
        tally.train_s += _metric(reply.metrics, "train_s")
        tally.codec_s += _metric(reply.metrics, "codec_s")
        if "train_loss" in reply.metrics:
            tally.losses.append(float(reply.metrics["train_loss"]))
        if "personal_accuracy" in reply.metrics:
            tally.personal.append(min(_metric(reply.metrics, "personal_accuracy"), 1.0))
        payload, fault = inject_faults(cfg, ctx, client, reply.payload, ctx.attempt)
        reply.payload = None  # the engine's from here: held only as long as its decoded update needs it
        tally.uplink.append(len(payload))  # sent, so counted, even if it arrives late or is rejected
        delay_s = straggler_delay(cfg, ctx, client, ctx.attempt)
        arrival_s = reply.compute_s + delay_s
        if cfg.deadline > 0 and arrival_s > cfg.deadline:
            # the reason names only seeded quantities, so it reads the same in every runtime and run
            late = f"straggler: reply {delay_s:g}s late" if delay_s > 0 else "slow client: reply"
            tally.drop(client, f"{late}, past the {cfg.deadline:g}s deadline", ctx.round, ctx.attempt)
            return
        tally.link[client] = (arrival_s, len(call.message), len(payload))
        t1 = time.perf_counter()
        try:
            update, reported = clip_examples(self.method.decode_update(payload, client, state, ctx), cfg.max_client_examples)
        except PayloadError as exc:
            tally.drop(client, f"bad payload ({fault or 'as sent'}): {exc}", ctx.round, ctx.attempt)
            tally.codec_s += time.perf_counter() - t1
            return
        del payload  # the update may be views into it; nothing else holds it
        tally.decoded.append(client)
        if tally.stream is not None:
            tally.stream.add(client, update)  # folded in, then dropped: the server holds one decoded update
        else:
            tally.updates[client] = update
        if reported is not None:
            tally.clipped.append({"client": client, "reported": reported, "used": cfg.max_client_examples})
        tally.codec_s += time.perf_counter() - t1

    # ---- the run ----------------------------------------------------------------------------------
    def run(self, resume: Checkpoint | None = None) -> dict[str, Any]:
        """Play every round (from ``resume`` if given); write and return results.json's content."""
        cfg, method = self.cfg, self.method
        state = method.init_server()
        done: list[dict[str, Any]] = []
        if resume is not None:
            check_resume(resume, cfg, method, state)
            state, done = resume.server_state, list(resume.rounds)
            self.transport.restore(dict(resume.client_states))
            self.state_versions = {int(c): (int(v[0]), int(v[1])) for c, v in resume.state_versions.items()}
        else:
            check_out_free(cfg)
            Path(cfg.out).mkdir(parents=True, exist_ok=True)
            atomic_write_text(Path(cfg.out) / CONFIG_FILE, to_toml(cfg))
        header = {**run_header(cfg, self.task.model_params, method.trainable_params(), self.runtime), **self.extra_header}
        if self.task.zero_shot is not None:  # a prompted causal LM: its accuracy before any training
            header["round0"] = {"round": 0, "accuracy": self.task.zero_shot[0], "loss": self.task.zero_shot[1]}
        writer = ResultsWriter(cfg.out, header, done)
        with RunProgress(cfg, self.task.model_params, method.trainable_params(), enabled=self.show_progress) as progress:
            if done and self.show_progress:
                progress.console.print(f"resuming {cfg.out} after round {len(done)} of {cfg.rounds}")
            for r in range(len(done) + 1, cfg.rounds + 1):
                ctx = RoundContext(round=r, rounds=cfg.rounds, seed=cfg.seed)
                state, record = self.play_round(state, ctx, progress)
                if cfg.checkpoint:  # before rounds.csv: a resumed run rewrites the CSV from the checkpoint
                    save_checkpoint(
                        cfg.out,
                        encode_checkpoint(
                            config=cfg.to_dict(),
                            round_=r,
                            server_state=state,
                            client_states=self.transport.client_states(),
                            rounds=[*writer.rounds, record],
                            state_versions=self.state_versions,
                        ),
                    )
                writer.add_round(record)
                progress.round_done(record)
        return writer.write_json()


RUN_FILES = ("results.json", "checkpoint")  # what a run leaves once a round has ended


def check_out_free(cfg: RunConfig) -> None:
    """Refuse to start a fresh run in an OUT that holds an earlier run's results, unless ``overwrite`` is set.

    A run killed before its first round ended left no results, so starting it again there is fine.
    """
    held = [name for name in RUN_FILES if (Path(cfg.out) / name).exists()]
    if held and not cfg.overwrite:
        raise ConfigError(
            f"{cfg.out} already holds a run ({', '.join(held)}); pass another --out, continue it with "
            f"--resume {cfg.out}, or replace it with --overwrite"
        )


def load_resume(out_dir: str | Path) -> tuple[RunConfig, Checkpoint | None]:
    """The saved config of the run in ``out_dir`` and its checkpoint (None if killed before round 1 ended)."""
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
        try:  # early, before the model is built; the server state is checked once the method exists (check_resume)
            check_checkpoint(ckpt, cfg.rounds, cfg.clients)
        except PayloadError as exc:
            raise _bad_checkpoint(cfg, exc) from exc
    return cfg, ckpt


def _bad_checkpoint(cfg: RunConfig, exc: Exception) -> ConfigError:
    return ConfigError(f"the checkpoint in {cfg.out!r} does not fit its run ({exc}); start the run again without --resume")


def check_resume(ckpt: Checkpoint, cfg: RunConfig, method: Method, fresh: Any) -> None:
    """ConfigError unless ``ckpt`` can continue this run: it fits the config, and its server state has
    the structure, dtypes and shapes of ``fresh`` (the method's ``init_server()``)."""
    try:
        check_checkpoint(ckpt, cfg.rounds, cfg.clients)
        check_state_like(ckpt.server_state, fresh, "server state")
    except PayloadError as exc:
        raise _bad_checkpoint(cfg, exc) from exc


def _brief(value: Any) -> str:
    """A short one-line description of a value for an error message."""
    text = repr(value) if isinstance(value, (bool, int, float, str, bytes, np.generic)) else ""
    return f"{text} ({type(value).__name__})" if text and len(text) <= 40 and "\n" not in text else type(value).__name__


def check_state_like(saved: Any, fresh: Any, where: str = "state") -> None:
    """PayloadError unless the tree ``saved`` is shaped like ``fresh``, a state the method built itself.

    Arrays must match in dtype and shape; dicts in keys and lists in length, each entry alike in
    turn. A state's parts that grow as the run goes are free: an empty dict or list in ``fresh``
    takes any dict or list, and None (not set yet) anything. Scalars must be of the same kind.
    """
    if fresh is None:
        return
    if isinstance(fresh, np.ndarray):
        if not isinstance(saved, np.ndarray):
            raise PayloadError(f"{where} is {type(saved).__name__}, not an array")
        if saved.dtype != fresh.dtype or saved.shape != fresh.shape:
            raise PayloadError(f"{where} is {saved.dtype}{list(saved.shape)}, expected {fresh.dtype}{list(fresh.shape)}")
    elif isinstance(fresh, dict):
        if not isinstance(saved, dict):
            raise PayloadError(f"{where} is {type(saved).__name__}, not a dict")
        if fresh and set(saved) != set(fresh):
            missing, extra = sorted(map(str, set(fresh) - set(saved))), sorted(map(str, set(saved) - set(fresh)))
            raise PayloadError(f"{where} has the wrong keys (missing {missing[:3]}, unexpected {extra[:3]})")
        for key, value in fresh.items():
            check_state_like(saved[key], value, f"{where}[{key!r}]")
    elif isinstance(fresh, (list, tuple)):
        if not isinstance(saved, (list, tuple)):
            raise PayloadError(f"{where} is {type(saved).__name__}, not a list")
        if fresh and len(saved) != len(fresh):
            raise PayloadError(f"{where} has {len(saved)} entries, expected {len(fresh)}")
        for i, value in enumerate(fresh):
            check_state_like(saved[i], value, f"{where}[{i}]")
    else:
        kinds = (bool, (int, np.integer), (float, np.floating), str, bytes)
        for kind in kinds:
            if isinstance(fresh, kind):
                if not isinstance(saved, kind) or (kind is not bool and isinstance(saved, bool)):
                    raise PayloadError(f"{where} is {_brief(saved)}, expected {type(fresh).__name__}")
                return
