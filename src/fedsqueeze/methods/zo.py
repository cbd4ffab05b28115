"""Zeroth-order primitives shared by the seed-and-scalar methods (decomfl, fedkseed, feedsign): the estimator and the replay.

A perturbation ``z ~ N(0, I)`` over the trainable tensors is never stored: it is a pure function of
``(step seed, perturbation index)`` and regenerated, tensor by tensor and chunk by chunk, each time
it is needed (MeZO's trick). So perturbing, restoring and updating a model costs no memory beyond
one small chunk buffer, and two parties holding the same weights and the same (seed, scalar)
records compute bit-identical models: the same float32 operations run in the same order.

With ``momentum`` β > 0 a step keeps an exponential moving average of the estimated gradients,
``m ← β·m + (1 − β)·(1/P)·Σ_i g_i z_i`` and ``w ← w − lr·m`` (:class:`Momentum`). ``m`` is a
deterministic function of the same (seed, scalar) records, so replay stays bit-identical as long
as both parties hold the same ``m`` before it: one more buffer of the trainable tensors' size.
With ``beta2`` > 0 it is Adam-style (a second moment ``v`` and a step count; three buffers).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

CHUNK = 1 << 20  # elements of z generated at a time: bounds the temporary buffer to 4 MiB


class Perturber:
    """Regenerates z for a fixed list of parameters and adds multiples of it in place."""

    def __init__(self, params: Sequence[torch.Tensor], chunk: int = CHUNK) -> None:
        self.params = list(params)
        for p in self.params:
            if not p.is_contiguous():
                raise ValueError("zeroth-order perturbation needs contiguous parameters")
        self.chunk = chunk
        self._buffer = torch.empty(min(chunk, max(p.numel() for p in self.params)), dtype=torch.float32)
        self._gen = torch.Generator()

    def tensor_seeds(self, seed: int, index: int) -> np.ndarray:
        """One 63-bit seed per parameter tensor for perturbation ``index`` of step ``seed``."""
        ss = np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32, index])
        words = ss.generate_state(2 * len(self.params), dtype=np.uint32).astype(np.uint64)
        return ((words[0::2] << np.uint64(32)) | words[1::2]) & np.uint64((1 << 63) - 1)

    @torch.no_grad()
    def add(self, seed: int, index: int, alpha: float) -> None:
        """``w += alpha · z(seed, index)`` for every parameter, in place."""
        for p, tseed in zip(self.params, self.tensor_seeds(seed, index)):
            self._gen.manual_seed(int(tseed))
            flat = p.data.view(-1)
            for start in range(0, flat.numel(), self.chunk):
                part = flat[start : start + self.chunk]
                z = self._buffer[: part.numel()]
                z.normal_(generator=self._gen)
                part.add_(z, alpha=alpha)

    def apply_record(self, seeds: np.ndarray, scalars: np.ndarray, lr: float, momentum: Momentum | None = None) -> None:
        """Replay one round: ``w ← w − lr/P · Σ_i g[k, i] · z(seed_k, i)`` for each step k in order.

        With ``momentum`` each step goes through :meth:`Momentum.step` instead.
        """
        perts = scalars.shape[1]
        for k, seed in enumerate(seeds):
            if momentum is not None:
                momentum.step(int(seed), scalars[k], lr)
                continue
            for i in range(perts):
                g = float(scalars[k, i])
                if g != 0.0:
                    self.add(int(seed), i, -lr * g / perts)


class Momentum:
    """The moments of a zeroth-order method's steps, over the same tensors as a :class:`Perturber`.

    One step with the P scalars g of step seed s, ``ĝ = (1/P) · Σ_i g_i · z(s, i)``:

    - ``beta2 = 0`` (momentum): ``m ← β·m + (1 − β)·ĝ``, then ``w ← w − lr·m``. The (1 − β)
      factor keeps the step's scale that of plain ZO-SGD at the same lr (a constant gradient gives
      m → ĝ), so β only trades variance for lag.
    - ``beta2 > 0`` (Adam-style, as ZO-AdaMM): also ``v ← β2·v + (1 − β2)·ĝ²`` and ``t ← t + 1``,
      then ``w ← w − lr · m̂ / (√v̂ + ε)`` with ``m̂ = m / (1 − β^t)``, ``v̂ = v / (1 − β2^t)``.

    ``m`` (and ``v``, ``t``) are functions of the same (seed, scalar) records, so two parties that
    hold the same moments and replay the same records stay bit-identical.
    """

    def __init__(self, perturber: Perturber, beta: float, beta2: float = 0.0, eps: float = 1e-8) -> None:
        self.perturber = perturber
        self.beta, self.beta2, self.eps = beta, beta2, eps
        self.buffers = [torch.zeros_like(p) for p in perturber.params]  # m
        self.second = [torch.zeros_like(p) for p in perturber.params] if beta2 > 0 else []  # v
        self.steps = 0  # t: the steps folded in so far (the bias correction needs it)
        self._grad = [torch.zeros_like(p) for p in perturber.params] if beta2 > 0 else []  # ĝ of one step
        self._into = Perturber(self.buffers, perturber.chunk)  # the same z, added into m
        self._into_grad = Perturber(self._grad, perturber.chunk) if beta2 > 0 else None

    @torch.no_grad()
    def step(self, seed: int, scalars: np.ndarray, lr: float) -> None:
        """Fold one step's P scalars into the moments and move the weights."""
        perts = len(scalars)
        self.steps += 1
        if self._into_grad is None:
            for b in self.buffers:
                b.mul_(self.beta)
            for i in range(perts):
                g = float(scalars[i])
                if g != 0.0:
                    self._into.add(seed, i, (1.0 - self.beta) * g / perts)
            for p, b in zip(self.perturber.params, self.buffers):
                p.data.add_(b, alpha=-lr)
            return
        for d in self._grad:
            d.zero_()
        for i in range(perts):
            g = float(scalars[i])
            if g != 0.0:
                self._into_grad.add(seed, i, g / perts)
        fix1, fix2 = 1.0 - self.beta**self.steps, 1.0 - self.beta2**self.steps
        for p, m, v, d in zip(self.perturber.params, self.buffers, self.second, self._grad):
            m.mul_(self.beta).add_(d, alpha=1.0 - self.beta)
            v.mul_(self.beta2).addcmul_(d, d, value=1.0 - self.beta2)
            denom = (v / fix2).sqrt_().add_(self.eps)
            p.data.addcdiv_(m, denom, value=-lr / fix1)


def estimate_step(
    perturber: Perturber,
    loss: Callable[[], float],
    seed: int,
    perturbations: int,
    mu: float,
    difference: str,
    lr: float,
    step: Callable[[np.ndarray], np.ndarray] | None = None,
    momentum: Momentum | None = None,
) -> np.ndarray:
    """One local zeroth-order step at the current weights; update them and return the P scalars.

    The update is ``w ← w − lr/P · Σ_i step(g)_i · z_i``: ``step`` maps the estimated scalars to
    what the update uses (default: themselves; feedsign: their signs).

    ``central``: g = (f(w+μz) − f(w−μz)) / 2μ (two forwards per perturbation);
    ``forward``: g = (f(w+μz) − f(w)) / μ (one forward per perturbation plus one per step).
    Every perturbation is estimated at the same w; the update uses them all, and the last
    perturbation's restore and update are fused into one pass over the weights. With ``momentum``
    every perturbation is restored first and the update is :meth:`Momentum.step`.
    """
    grads = np.zeros(perturbations, dtype=np.float32)
    applied = grads
    base = loss() if difference == "forward" else 0.0
    for i in range(perturbations):
        perturber.add(seed, i, mu)
        plus = loss()
        if difference == "central":
            perturber.add(seed, i, -2.0 * mu)
            minus = loss()
            grads[i] = (plus - minus) / (2.0 * mu)
            back = mu
        else:
            grads[i] = (plus - base) / mu
            back = -mu
        if momentum is not None:
            perturber.add(seed, i, back)
            continue
        last = i == perturbations - 1
        if last:
            applied = step(grads) if step is not None else grads
        perturber.add(seed, i, back - (lr * float(applied[i]) / perturbations if last else 0.0))
    if momentum is not None:
        momentum.step(seed, step(grads) if step is not None else grads, lr)
        return grads
    for i in range(perturbations - 1):
        perturber.add(seed, i, -lr * float(applied[i]) / perturbations)
    return grads


@torch.no_grad()
def local_zo(
    perturber: Perturber,
    loss_of: Callable[[torch.Tensor], float],
    batches: Iterable[torch.Tensor],
    seeds: np.ndarray,
    perturbations: int,
    mu: float,
    difference: str,
    lr: float,
    step: Callable[[np.ndarray], np.ndarray] | None = None,
    momentum: Momentum | None = None,
) -> tuple[np.ndarray, float]:
    """A client's local zeroth-order steps, one per seed, on ``batches`` (example indices).

    Returns the K×P scalars to upload and the mean of every loss evaluated on the way.
    """
    scalars = np.zeros((len(seeds), perturbations), dtype=np.float32)
    losses = []
    for k, idx in enumerate(batches):
        calls: list[float] = []

        def loss(idx: torch.Tensor = idx, calls: list[float] = calls) -> float:  # this step's batch and log
            calls.append(loss_of(idx))
            return calls[-1]

        scalars[k] = estimate_step(perturber, loss, int(seeds[k]), perturbations, mu, difference, lr, step, momentum)
        losses.append(sum(calls) / len(calls))
    return scalars, float(np.mean(losses))
