"""Stochastic binary masks over a frozen pre-trained model (the shared core of FedPM and DeltaMask).

The masked weights are, by default, every ``nn.Linear`` weight of the backbone (optionally the
embedding tables too). All their mask scores live in one flat vector ``s`` of length ``n``; the
position of a weight in that vector is its *position* in every mask, filter and position code.

Forward pass: ``θ = sigmoid(s)``, ``m ~ Bernoulli(θ)``, and each masked weight ``W`` is replaced by
``W ⊙ m`` through :func:`torch.func.functional_call`, so the model itself is never modified and
no per-client copy of it exists: only the masked weight tensors of the current forward pass are
materialised. The gradient passes the sampling with a straight-through estimator
(``m_ste = m + θ − stop_grad(θ)``, so ``∂m/∂θ = 1``).

Sampling with common random numbers: a client's final mask is ``u < θ_client`` and its reference
mask is ``u < θ_global`` for the *same* uniforms ``u`` (drawn from the round's shared seed for that
client). Each mask is still an exact Bernoulli sample of its own probabilities, but the two masks
differ only where ``u`` falls between the two probabilities: ``P(flip) = |θ_client − θ_global|``
instead of ``θc(1−θg) + θg(1−θc)`` for independent draws (about 10% of all positions at θ≈0.95).

Stratified uniforms across the clients of a round (``stratify=true``; off by default): instead of
independent ``u`` per client, the server draws one ``v ~ U[0, 1)`` per position for the round and
client ``k`` of the round's ``K`` gets ``u_k = (v + k/K) mod 1``. Each ``u_k`` is still uniform,
so each mask is still an exact Bernoulli sample, but the K masks are a *systematic* sample: when
every client keeps its probability ``θ``, exactly ``⌊Kθ⌋`` or ``⌈Kθ⌉`` of them keep a position.
With independent draws the count is Binomial(K, θ), and the aggregate ``θ = Σm/K`` random-walks
(genetic drift): at K = 5 a position at θ = 0.8 falls to ≤ 0.4, and out of the evaluation mask,
with probability 5.8% per round whatever the clients learnt.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from fedsqueeze.training import Encoded, train_local


@dataclass
class MaskLayout:
    """Where each masked weight sits in the flat position space."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    offsets: list[int]
    total: int


def select_masked(model: nn.Module, include_embeddings: bool = False) -> MaskLayout:
    """Layout of the masked weights: every Linear weight of ``model.backbone`` (plus embeddings).

    A model may name other module types to mask in ``model.masked_kinds`` (a CNN's ``nn.Conv2d``).
    """
    kinds: tuple[type, ...] = tuple(getattr(model, "masked_kinds", (nn.Linear,)))
    if include_embeddings:
        kinds += (nn.Embedding,)
    names, shapes, offsets, total = [], [], [], 0
    backbone = model.backbone
    assert isinstance(backbone, nn.Module)
    for mod_name, mod in backbone.named_modules():
        weight = getattr(mod, "weight", None)
        if isinstance(mod, kinds) and isinstance(weight, nn.Parameter):
            names.append(f"backbone.{mod_name}.weight")
            shapes.append(tuple(weight.shape))
            offsets.append(total)
            total += weight.numel()
    if not names:
        raise ValueError(f"the backbone has no weights of {[k.__name__ for k in kinds]} to mask")
    return MaskLayout(names, shapes, offsets, total)


def clip_probs(theta: np.ndarray, eps: float) -> np.ndarray:
    """Keep probabilities in ``[eps, 1 − eps]`` so their logits stay finite and trainable."""
    return np.clip(theta, eps, 1.0 - eps).astype(np.float32)


def logit(theta: np.ndarray) -> np.ndarray:
    return (np.log(theta) - np.log1p(-theta)).astype(np.float32)


def shared_uniforms(rng: np.random.Generator, n: int) -> np.ndarray:
    """The uniforms ``u`` that both a client and the server draw from the round's shared seed."""
    return rng.random(n, dtype=np.float32)


def stratified_uniforms(rng: np.random.Generator, n: int, stratum: int, strata: int) -> np.ndarray:
    """Client ``stratum``'s uniforms: ``(v + stratum/strata) mod 1`` with ``v`` shared by the round's clients."""
    u = rng.random(n, dtype=np.float32) + np.float32(stratum / strata)
    u[u >= 1] -= 1
    return u


class MaskedModel:
    """Runs a frozen model with a flat mask applied to its masked weights (no copy of the model)."""

    def __init__(self, model: nn.Module, layout: MaskLayout) -> None:
        self.model = model
        self.layout = layout
        named = dict(model.named_parameters())
        self.frozen = [named[n] for n in layout.names]

    def masked_weights(self, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        lay = self.layout
        return {
            name: w * mask[off : off + w.numel()].view(shape)
            for name, w, off, shape in zip(lay.names, self.frozen, lay.offsets, lay.shapes)
        }

    def forward(self, mask: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of the model whose masked weights are multiplied by ``mask`` (flat, length n)."""
        return functional_call(self.model, self.masked_weights(mask), args=(), kwargs=inputs)


def ste_sample(scores: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A Bernoulli(sigmoid(scores)) sample whose gradient flows straight through to the probabilities."""
    theta = torch.sigmoid(scores)
    hard = (torch.rand(theta.shape, generator=generator) < theta.detach()).to(theta.dtype)
    return hard + theta - theta.detach()


def train_masked(
    masked: MaskedModel,
    scores: torch.Tensor,
    head_params: list[torch.Tensor],
    data: Encoded,
    *,
    steps: int,
    batch_size: int,
    score_lr: float,
    head_lr: float,
    generator: torch.Generator,
    mask_generator: torch.Generator,
    optimizer: str = "adam",
) -> dict[str, float]:
    """Train the mask scores and the head for ``steps`` minibatches of cross-entropy.

    A fresh straight-through mask is sampled for every step (one draw from ``mask_generator``).
    """
    groups = [{"params": [scores], "lr": score_lr}, {"params": head_params, "lr": head_lr}]
    return train_local(
        masked.model,
        groups,
        data,
        steps=steps,
        batch_size=batch_size,
        lr=score_lr,
        generator=generator,
        optimizer=optimizer,
        forward=lambda inputs: masked.forward(ste_sample(scores, mask_generator), inputs),
    )
