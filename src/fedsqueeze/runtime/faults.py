"""Fault injection and timeouts: wrappers around a client call, in the spirit of Flower's client mods.

Every decision is drawn from a generator seeded by ``(run seed, round, client, purpose)`` (the
purpose carries the retry attempt), so the same client fails in the same way in every runtime:

- server side, by the round engine: ``dropout`` (the reply never comes), ``straggler`` (the reply
  is late by ``straggler_delay``), ``fault_corrupt`` / ``fault_truncate`` (the payload is damaged in
  transit);
- client side, by :func:`with_injected_faults` around the method's client function, in the local
  transport and in the Flower ClientApp alike: ``fault_raise``, ``fault_hang``, ``fault_garbage``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from fedsqueeze.config import RunConfig
from fedsqueeze.methods.base import ClientOutput, RoundContext

# A client function: (server message, client id, client state, round context, abandon) -> output.
# ``abandon`` is set when the server stops waiting (a cooperative client returns at once).
ClientFn = Callable[[bytes, int, Any, RoundContext, threading.Event], ClientOutput]

HANG_GRACE_S = 5.0  # a hung client gives up this long after the server stopped waiting for it


class ClientFault(RuntimeError):
    """A client failed in a way the runtime detected (timeout, injected crash)."""


def purpose(name: str, attempt: int = 0) -> str:
    """A seed purpose for a round's ``attempt``: a retried round draws afresh, attempt 0 as always."""
    return name if attempt == 0 else f"{name}/retry{attempt}"


def drops_out(cfg: RunConfig, ctx: RoundContext, client: int, attempt: int = 0) -> bool:
    """Whether a sampled client fails to return this round (``dropout`` probability, seeded)."""
    return cfg.dropout > 0 and ctx.rng(client, purpose("dropout", attempt)).random() < cfg.dropout


def client_fault(cfg: RunConfig, ctx: RoundContext, client: int, attempt: int = 0) -> str | None:
    """The injected client fault this round, if any: 'raise', 'hang' or 'garbage' (seeded)."""
    total = cfg.fault_raise + cfg.fault_hang + cfg.fault_garbage
    if total <= 0:
        return None
    u = ctx.rng(client, purpose("client-fault", attempt)).random()
    if u < cfg.fault_raise:
        return "raise"
    if u < cfg.fault_raise + cfg.fault_hang:
        return "hang"
    return "garbage" if u < total else None


def straggler_delay(cfg: RunConfig, ctx: RoundContext, client: int, attempt: int = 0) -> float:
    """Simulated extra seconds before this client's reply arrives (``straggler`` probability, seeded)."""
    if cfg.straggler > 0 and ctx.rng(client, purpose("straggler", attempt)).random() < cfg.straggler:
        return cfg.straggler_delay
    return 0.0


def garbage_payload(ctx: RoundContext, client: int, payload: bytes, attempt: int = 0) -> bytes:
    """What a broken client sends instead of ``payload``: noise, a cut frame, or a frame of NaNs."""
    rng = ctx.rng(client, purpose("garbage", attempt))
    kind = int(rng.integers(0, 3))
    if kind == 0:
        return rng.bytes(len(payload))
    if kind == 1:
        return payload[: len(payload) // 2]
    from fedsqueeze.codecs import encode_tensors, get_codec

    return encode_tensors(get_codec("raw"), {"w": np.full(4, np.nan, dtype=np.float32)}, n=1)


def inject_faults(cfg: RunConfig, ctx: RoundContext, client: int, payload: bytes, attempt: int = 0) -> tuple[bytes, str | None]:
    """Corrupt or truncate a payload in transit with the configured probabilities (seeded)."""
    rng = ctx.rng(client, purpose("faults", attempt))
    if cfg.fault_truncate > 0 and rng.random() < cfg.fault_truncate:
        return payload[: int(rng.integers(0, max(len(payload), 1)))], "truncated"
    if cfg.fault_corrupt > 0 and rng.random() < cfg.fault_corrupt:
        buf = bytearray(payload)
        if buf:
            pos = rng.integers(0, len(buf), size=min(8, len(buf)))
            for p in pos:
                buf[p] ^= 0xFF
        return bytes(buf), "corrupted"
    return payload, None


def with_injected_faults(cfg: RunConfig, client_fn: ClientFn) -> ClientFn:
    """``client_fn`` with the client-side faults of ``cfg``: crash, hang, or garbage instead of an update."""

    def faulty(message: bytes, client: int, cstate: Any, ctx: RoundContext, abandon: threading.Event) -> ClientOutput:
        fault = client_fault(cfg, ctx, client, ctx.attempt)
        if fault == "raise":
            raise ClientFault("injected fault: the client crashed")
        if fault == "hang":
            # hangs until the server gives up on it (client_timeout), then leaves without replying
            abandon.wait(cfg.client_timeout + HANG_GRACE_S)
            raise ClientFault("injected fault: the client hung")
        out = client_fn(message, client, cstate, ctx, abandon)
        if fault == "garbage" and isinstance(out, ClientOutput):
            out = ClientOutput(garbage_payload(ctx, client, out.payload, ctx.attempt), out.state, out.metrics)
        return out

    return faulty


def timeout_reason(timeout_s: float) -> str:
    """The drop reason of a client that did not reply in time (the same words in every runtime)."""
    return f"client error: ClientFault: timeout: no reply within client_timeout={timeout_s:g}s (client abandoned)"


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
