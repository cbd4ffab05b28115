"""Fault injection and timeouts: wrappers around a client call, in the spirit of Flower's client mods.

Every decision is drawn from a generator seeded by ``(run seed, round, client, purpose)`` (the
purpose carries the retry attempt), so the same client fails in the same way in every runtime:

- server side, by the round engine: ``dropout`` (the reply never comes), ``straggler`` (the reply
  is late by ``straggler_delay``), ``fault_corrupt`` / ``fault_truncate`` (the payload is damaged in
  transit);
- client side, by :func:`with_injected_faults` around the method's client function, in the local
  transport and in the Flower ClientApp alike: ``fault_raise``, ``fault_hang``, ``fault_garbage``,
  and the model-poisoning ``attack`` of the run's attackers (:mod:`fedsqueeze.attacks`), which
  rewrites an attacker's honest upload (:func:`attack_payload`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from fedsqueeze.attacks import attackers
from fedsqueeze.config import RunConfig
from fedsqueeze.errors import ConfigError
from fedsqueeze.methods.base import ClientOutput, Method, RoundContext

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


def with_injected_faults(cfg: RunConfig, client_fn: ClientFn, method: Method | None = None) -> ClientFn:
    """``client_fn`` with the client-side faults of ``cfg``: crash, hang, or garbage instead of an
    update; and, for the run's attackers (given ``method``, whose payloads they rewrite), the attack."""
    attacking = attackers(cfg) if method is not None else frozenset()

    def faulty(message: bytes, client: int, cstate: Any, ctx: RoundContext, abandon: threading.Event) -> ClientOutput:
        fault = client_fault(cfg, ctx, client, ctx.attempt)
        if fault == "raise":
            raise ClientFault("injected fault: the client crashed")
        if fault == "hang":
            # hangs until the server gives up on it (client_timeout), then leaves without replying
            abandon.wait(cfg.client_timeout + HANG_GRACE_S)
            raise ClientFault("injected fault: the client hung")
        out = client_fn(message, client, cstate, ctx, abandon)
        if client in attacking and method is not None and isinstance(out, ClientOutput) and isinstance(out.payload, bytes):
            out = ClientOutput(attack_payload(cfg, method, message, out.payload, client, ctx, cstate), out.state, out.metrics)
        if fault == "garbage" and isinstance(out, ClientOutput):
            out = ClientOutput(garbage_payload(ctx, client, out.payload, ctx.attempt), out.state, out.metrics)
        return out

    return faulty


# ---- attacks: an attacker's honest upload, rewritten (see fedsqueeze.attacks) -----------------------

INFLATION = 1000  # inflate_count: the attacker claims this many times its true example count
ZO_HUGE = 1000.0  # zo_huge: every scalar is ±attack_scale × this


def attack_family(method: Method) -> str:
    """'tensor', 'mask' or 'zo': which payload rewrite applies to ``method``'s uploads."""
    from fedsqueeze.methods.decomfl import DeComFL
    from fedsqueeze.methods.mask_method import MaskMethod
    from fedsqueeze.methods.tensor import TensorMethod

    if isinstance(method, TensorMethod):
        return "tensor"
    if isinstance(method, MaskMethod):
        return "mask"
    if isinstance(method, DeComFL):
        return "zo"
    return "none"


# family -> the attacks that apply to it (label_flip poisons data, so it applies to all)
FAMILY_ATTACKS = {
    "tensor": {"sign_flip", "scale", "gaussian", "label_flip", "inflate_count"},
    "mask": {"mask_all", "label_flip", "inflate_count"},
    "zo": {"sign_flip", "scale", "gaussian", "zo_huge", "label_flip"},  # no example count on DeComFL's wire
    "none": {"label_flip"},
}


def check_attack(cfg: RunConfig, method: Method) -> None:
    """ConfigError unless ``cfg.attack`` applies to ``method``'s family."""
    if cfg.attack == "none":
        return
    family = attack_family(method)
    if cfg.attack not in FAMILY_ATTACKS[family]:
        fits = ", ".join(sorted(FAMILY_ATTACKS[family]))
        raise ConfigError(f"attack={cfg.attack!r} does not apply to method {method.name!r} ({family} updates); choose one of: {fits}")


def perturb(values: np.ndarray, attack: str, scale: float, rms: float, rng: np.random.Generator) -> np.ndarray:
    """One tensor (or scalar block) of an attacker's update under ``attack``, float32."""
    if attack == "sign_flip":
        return (-values).astype(np.float32)
    if attack == "scale":
        return (values * np.float32(scale)).astype(np.float32)
    if attack == "gaussian":
        return rng.normal(0.0, scale * rms, size=values.shape).astype(np.float32)
    return values


def _rms(tensors: dict[str, np.ndarray]) -> float:
    count = sum(a.size for a in tensors.values())
    total = sum(float(np.einsum("i,i->", a.reshape(-1), a.reshape(-1), dtype=np.float64)) for a in tensors.values())
    return float(np.sqrt(total / max(count, 1)))


def attack_payload(
    cfg: RunConfig, method: Any, message: bytes, payload: bytes, client: int, ctx: RoundContext, cstate: Any = None
) -> bytes:
    """The attacker's upload: its honest ``payload`` rewritten by ``cfg.attack`` (seeded by round and client);
    ``cstate`` is the client state it held when the message came (a mask delta downlink decodes against it)."""
    attack = cfg.attack
    if attack in ("none", "label_flip"):  # label_flip poisoned the data: the update is honest training on it
        return payload
    rng = ctx.rng(client, purpose("attack", ctx.attempt))
    family = attack_family(method)
    if family == "tensor":
        return _attack_tensors(cfg, method, message, payload, client, ctx, rng)
    if family == "mask":
        return _attack_mask(cfg, method, message, payload, client, ctx, cstate)
    if family == "zo":
        return _attack_zo(cfg, method, payload, ctx, rng)
    return payload


def _attack_tensors(cfg: RunConfig, m: Any, message: bytes, payload: bytes, client: int, ctx: RoundContext, rng) -> bytes:
    from fedsqueeze.codecs import CodecContext, decode_tensors, encode_tensors
    from fedsqueeze.seeding import SERVER

    limits = CodecContext(max_elements=m.max_elements, expect=m.expect)
    tensors, extra = decode_tensors(payload, limits, codec=m.up_codec)
    n = int(extra.get("n", 1))
    if cfg.attack == "inflate_count":
        n *= INFLATION
    else:
        base: dict[str, np.ndarray] = {}
        if m.uplink_sends_weights:  # the upload is weights: attack the change they make to the global ones
            base, _ = decode_tensors(
                message,
                CodecContext(seed=ctx.seed_for(SERVER, "downlink"), max_elements=m.max_elements, expect=m.expect),
                codec=m.down_codec,
            )
            tensors = {k: tensors[k] - base[k] for k in tensors}
        rms = _rms(tensors)
        tensors = {k: perturb(v, cfg.attack, cfg.attack_scale, rms, rng) for k, v in tensors.items()}
        if base:
            tensors = {k: (tensors[k] + base[k]).astype(np.float32) for k in tensors}
    # a fresh codec state: the attacker's error feedback (if any) stays the honest one it keeps
    return encode_tensors(m.up_codec, tensors, CodecContext(seed=ctx.seed_for(client, "uplink")), n=n)


def _attack_mask(cfg: RunConfig, m: Any, message: bytes, payload: bytes, client: int, ctx: RoundContext, cstate: Any) -> bytes:
    from fedsqueeze.codecs import frame, unframe

    kind, meta, body = unframe(payload, expect_kind=m.uplink_kind)
    if cfg.attack == "inflate_count":
        return frame(kind, {**meta, "n": int(meta["n"]) * INFLATION}, bytes(body))
    # mask_all: the reference mask flipped at every position, coded by the method's own client coder
    # (so the payload is valid: deltamask keeps as many flips as its κ·n cap, the most a server accepts)
    sym, levels, _, stratum, _ = m.receive_downlink(message, cstate, ctx.round)
    theta_start = m.start_theta(m.theta_of(sym, levels))
    u = m.uniforms(ctx, client, stratum)
    flipped = ~(u < theta_start)
    mask_meta, mask_body, _ = m.encode_mask(u, flipped.astype(np.float32), theta_start, sym, levels, ctx)
    head_body = bytes(body[int(meta["sections"][0]) :])  # the honest head delta, as sent
    new_meta = {**meta, "mask": mask_meta, "sections": [len(mask_body), len(head_body)]}
    return frame(kind, new_meta, bytes(mask_body) + head_body)


def _attack_zo(cfg: RunConfig, m: Any, payload: bytes, ctx: RoundContext, rng) -> bytes:
    from fedsqueeze.methods.decomfl_wire import decode_uplink, encode_uplink

    if m.is_warm(ctx.round):  # a warm-start round's head delta: attacked only in the zeroth-order rounds
        return payload
    scalars = decode_uplink(payload, m.wire, ctx.round)
    if cfg.attack == "zo_huge":
        scalars = (np.where(rng.random(scalars.shape) < 0.5, -1.0, 1.0) * cfg.attack_scale * ZO_HUGE).astype(np.float32)
    else:
        scalars = perturb(scalars, cfg.attack, cfg.attack_scale, float(np.sqrt(np.mean(scalars.astype(np.float64) ** 2))), rng)
    return encode_uplink(m.wire, ctx.round, scalars)


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
