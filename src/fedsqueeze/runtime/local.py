"""The in-process simulator (``--runtime local``): one model in memory, clients are data + state.

:class:`LocalTransport` runs each client's update in this process, one after the other, behind the
same client-side fault wrapper as the Flower ClientApp, and with the configured ``client_timeout``.
The round loop itself is the engine's (:mod:`fedsqueeze.runtime.engine`); see docs/reliability.md.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

from fedsqueeze.config import RunConfig
from fedsqueeze.methods import ClientOutput, Method, RoundContext
from fedsqueeze.runtime.checkpoint import Checkpoint
from fedsqueeze.runtime.engine import ClientCall, ClientReply, Engine, Transport, prepare
from fedsqueeze.runtime.faults import ClientFault, call_with_timeout, with_injected_faults
from fedsqueeze.runtime.progress import RunProgress
from fedsqueeze.task import Task

__all__ = ["ClientFault", "LocalTransport", "call_with_timeout", "prepare", "run_local", "run_round"]


def reply_of(out: Any, compute_s: float) -> ClientReply:
    """A transport reply from what a client function returned; anything but bytes is garbage."""
    if not (isinstance(out, ClientOutput) and isinstance(out.payload, (bytes, bytearray)) and isinstance(out.metrics, dict)):
        return ClientReply(error=f"garbage: client returned {type(getattr(out, 'payload', out)).__name__}, not bytes")
    return ClientReply(payload=bytes(out.payload), metrics=dict(out.metrics), compute_s=compute_s)


class LocalTransport(Transport):
    """Clients are calls in this process; their states live here (and in the checkpoint)."""

    name = "local"

    def __init__(self, method: Method, cfg: RunConfig, client_states: dict[int, Any] | None = None) -> None:
        self.method, self.cfg = method, cfg
        self.states: dict[int, Any] = {} if client_states is None else client_states
        self.client_fn = with_injected_faults(cfg, self._update, method)

    def _update(self, message: bytes, client: int, cstate: Any, ctx: RoundContext, abandon: threading.Event) -> ClientOutput:
        return self.method.client_update(message, client, cstate, ctx)

    def exchange(self, calls: list[ClientCall]) -> dict[int, ClientReply]:
        return {call.client: self._call(call) for call in calls}

    def replies(self, calls: list[ClientCall]) -> Iterator[tuple[ClientCall, ClientReply | None]]:
        """Each client runs when the engine asks for its reply: the server holds one payload at a time."""
        for call in calls:
            yield call, self._call(call)

    def _call(self, call: ClientCall) -> ClientReply:
        client = call.client
        cstate = self.states[client] if client in self.states else self.method.init_client(client)
        t0 = time.perf_counter()
        try:
            out = call_with_timeout(
                lambda abandon: self.client_fn(call.message, client, cstate, call.ctx, abandon),
                self.cfg.client_timeout,
                f"fedsqueeze-client-{client}",
            )
        except Exception as exc:  # one failing client must not end the run
            return ClientReply(error=f"client error: {type(exc).__name__}: {exc}")
        reply = reply_of(out, time.perf_counter() - t0)
        if reply.error is None:
            self.states[client] = out.state
        return reply

    def client_states(self) -> dict[int, Any]:
        return self.states

    def restore(self, client_states: dict[int, Any]) -> None:
        self.states.clear()
        self.states.update(client_states)


def run_round(
    method: Method,
    task: Task,
    cfg: RunConfig,
    state: Any,
    client_states: dict[int, Any],
    ctx: RoundContext,
    progress: RunProgress | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Play one round in this process (for scripts and tests); ``client_states`` is updated in place."""
    engine = Engine(cfg, method, task, LocalTransport(method, cfg, client_states), runtime="local", show_progress=False)
    return engine.play_round(state, ctx, progress)


def run_local(cfg: RunConfig, show_progress: bool = True, resume: Checkpoint | None = None) -> dict[str, Any]:
    """Run ``cfg`` in this process (from ``resume`` if given); write and return results.json's content."""
    method, task = prepare(cfg)
    engine = Engine(cfg, method, task, LocalTransport(method, cfg), runtime="local", show_progress=show_progress)
    return engine.run(resume)
