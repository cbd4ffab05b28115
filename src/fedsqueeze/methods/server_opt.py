"""Server optimizers: how the server turns a round's combined client update into new global weights.

The combined update Δ (the example-weighted mean of the client deltas, or a robust rule's
estimate, see :mod:`fedsqueeze.methods.robust`) is a pseudo-gradient pointing downhill. The rules,
found by name (option ``server_opt`` of every tensor method), with η = ``server_lr``:

- ``none``    — FedAvg: ``x += η·Δ``.
- ``avgm``    — FedAvgM (Hsu et al. 2019): ``m = μ·m + Δ``; ``x += η·m`` (μ = ``server_momentum``).
- ``adagrad`` — FedAdagrad: ``m = β1·m + (1−β1)·Δ``; ``v = v + Δ²``; ``x += η·m / (√v + τ)``.
- ``adam``    — FedAdam: as adagrad with ``v = β2·v + (1−β2)·Δ²``.
- ``yogi``    — FedYogi: as adagrad with ``v = v − (1−β2)·Δ²·sign(v − Δ²)``.

``server_lr_schedule`` scales η round by round (t = 1..T the round, T = ``rounds``), the same for
every rule: ``constant`` (η), ``cosine`` (η·½(1 + cos(π·(t−1)/T)): η in round 1, down towards 0),
``exp`` (η·γ^(t−1), γ = ``server_lr_decay``). A decaying step damps the round-to-round swing that
sampling a few skewed clients a round causes, at the price of smaller late steps.

The three adaptive rules are Algorithm 2 of Reddi et al., "Adaptive Federated Optimization"
(ICLR 2021), as published: no bias correction, ``m`` starts at 0 and ``v`` at τ² (the paper asks
``v₋₁ ≥ τ²``). Their state lives in the server state under ``"server_opt"`` as float32 arrays
named like the weights, so it is checkpointed and resumed with them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Tensors = dict[str, np.ndarray]

# rule -> its default server_lr (used when server_lr = 0): the adaptive rules move each coordinate
# by about η per round, so η = 1 (right for a plain mean) would wreck the model
DEFAULT_LR = {"none": 1.0, "avgm": 1.0, "adagrad": 1e-2, "adam": 1e-2, "yogi": 1e-2}
SERVER_OPTIMIZERS = tuple(DEFAULT_LR)
SCHEDULES = ("constant", "cosine", "exp")
# rule -> what it does (listed by `fedsqueeze methods`)
DESCRIPTIONS = {
    "none": "FedAvg: x += η·Δ",
    "avgm": "FedAvgM: m = μ·m + Δ; x += η·m (server_momentum μ)",
    "adagrad": "FedAdagrad: v += Δ²; x += η·m/(√v+τ) (beta1, tau)",
    "adam": "FedAdam: v = β2·v + (1−β2)·Δ²; x += η·m/(√v+τ) (beta1, beta2, tau)",
    "yogi": "FedYogi: v −= (1−β2)·Δ²·sign(v−Δ²); x += η·m/(√v+τ) (beta1, beta2, tau)",
}


@dataclass(frozen=True)
class ServerOpt:
    """One server optimizer's rule and hyper-parameters."""

    rule: str = "none"
    lr: float = 0.0  # 0: DEFAULT_LR[rule]
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    schedule: str = "constant"  # η round by round: constant, cosine or exp
    decay: float = 0.9  # schedule=exp: γ
    rounds: int = 1  # T, the run's rounds (schedule=cosine)

    @property
    def eta(self) -> float:
        """The server learning rate η in use (round 1's under any schedule)."""
        return self.lr if self.lr > 0 else DEFAULT_LR[self.rule]

    def eta_at(self, round_: int) -> float:
        """η of round ``round_`` (1-based) under the schedule."""
        t = round_ - 1
        if self.schedule == "cosine":
            return self.eta * 0.5 * (1.0 + math.cos(math.pi * t / max(1, self.rounds)))
        if self.schedule == "exp":
            return self.eta * self.decay**t
        return self.eta

    def init_state(self, weights: Tensors) -> dict[str, Tensors]:
        """The optimizer's state before round 1 (empty for ``none``)."""
        if self.rule == "none":
            return {}
        state = {"m": {n: np.zeros_like(a, dtype=np.float32) for n, a in weights.items()}}
        if self.rule != "avgm":
            state["v"] = {n: np.full(a.shape, self.tau**2, dtype=np.float32) for n, a in weights.items()}
        return state

    def step(self, weights: Tensors, delta: Tensors, state: dict[str, Tensors], round_: int = 1) -> None:
        """Move ``weights`` (in place) by the combined update ``delta`` of round ``round_``; update ``state`` in place."""
        step = STEPS[self.rule]
        eta = np.float32(self.eta_at(round_))
        for name, d in delta.items():
            d32 = np.asarray(d, dtype=np.float32)
            weights[name] = (weights[name] + step(self, d32, state, name, eta)).astype(np.float32)


def _plain(o: ServerOpt, d: np.ndarray, s: dict[str, Tensors], name: str, eta: np.float32) -> np.ndarray:
    return eta * d


def _avgm(o: ServerOpt, d: np.ndarray, s: dict[str, Tensors], name: str, eta: np.float32) -> np.ndarray:
    s["m"][name] = (np.float32(o.momentum) * s["m"][name] + d).astype(np.float32)
    return eta * s["m"][name]


def _adaptive(second_moment: Callable[[ServerOpt, np.ndarray, np.ndarray], np.ndarray]):
    """An adaptive rule of Reddi et al. from its second-moment update ``v_new = f(opt, v, Δ²)``."""

    def step(o: ServerOpt, d: np.ndarray, s: dict[str, Tensors], name: str, eta: np.float32) -> np.ndarray:
        b1 = np.float32(o.beta1)
        s["m"][name] = (b1 * s["m"][name] + (np.float32(1) - b1) * d).astype(np.float32)
        s["v"][name] = second_moment(o, s["v"][name], d * d).astype(np.float32)
        return eta * s["m"][name] / (np.sqrt(s["v"][name]) + np.float32(o.tau))

    return step


def _v_adagrad(o: ServerOpt, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
    return v + d2


def _v_adam(o: ServerOpt, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
    b2 = np.float32(o.beta2)
    return b2 * v + (np.float32(1) - b2) * d2


def _v_yogi(o: ServerOpt, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
    return v - (np.float32(1) - np.float32(o.beta2)) * d2 * np.sign(v - d2)


STEPS: dict[str, Callable[[ServerOpt, np.ndarray, dict[str, Tensors], str, np.float32], np.ndarray]] = {
    "none": _plain,
    "avgm": _avgm,
    "adagrad": _adaptive(_v_adagrad),
    "adam": _adaptive(_v_adam),
    "yogi": _adaptive(_v_yogi),
}
