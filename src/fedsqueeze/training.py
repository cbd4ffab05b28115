"""Local training and evaluation loops shared by every method."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class Encoded:
    """A split ready for the model: input tensors and labels, all on CPU."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: torch.Tensor | list[int]) -> Encoded:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return Encoded({k: v[idx] for k, v in self.inputs.items()}, self.labels[idx])


def batch_inputs(data: Encoded, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inputs of one batch; text is trimmed to the longest sequence in the batch (dynamic padding)."""
    out = {k: v[idx] for k, v in data.inputs.items()}
    if "attention_mask" in out:
        width = int(out["attention_mask"].sum(1).max().clamp_min(1))
        out = {k: v[:, :width] for k, v in out.items()}
    return out


def num_local_steps(n_examples: int, batch_size: int, local_steps: int, local_epochs: float) -> int:
    """Steps for one client's round: ``local_epochs`` passes if set, else ``local_steps``."""
    if local_epochs > 0:
        return max(1, math.ceil(local_epochs * n_examples / batch_size))
    return local_steps


def iterate_batches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """``steps`` minibatches of indices: shuffled passes over ``range(n)``, seeded by ``generator``."""
    perm = torch.randperm(n, generator=generator)
    pos = 0
    for _ in range(steps):
        if pos >= n:
            perm, pos = torch.randperm(n, generator=generator), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        yield idx


ParamsOrGroups = list[torch.Tensor] | list[dict]


def make_optimizer(params: ParamsOrGroups, name: str, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW, Adam or SGD (momentum 0.9); ``params`` may be tensors or param groups with their own ``lr``."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose 'adamw', 'adam' or 'sgd'")


def train_local(
    model: nn.Module,
    params: ParamsOrGroups,
    data: Encoded,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    optimizer: str = "adamw",
    forward: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None,
    penalty: Callable[[], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Run ``steps`` optimizer steps of cross-entropy on ``params``; return mean loss and counts.

    ``forward`` maps a batch's inputs to logits; by default ``model(**inputs)``. ``penalty()``, if
    given, is added to every step's loss (e.g. FedProx's :func:`proximal_penalty`); the reported
    ``train_loss`` is the cross-entropy alone.
    """
    forward = forward or (lambda inputs: model(**inputs))
    opt = make_optimizer(params, optimizer, lr)
    model.train()
    total, examples = 0.0, 0
    for idx in iterate_batches(len(data), batch_size, steps, generator):
        logits = forward(batch_inputs(data, idx))
        loss = F.cross_entropy(logits, data.labels[idx])
        opt.zero_grad(set_to_none=True)
        (loss + penalty() if penalty is not None else loss).backward()
        opt.step()
        total += loss.item() * len(idx)
        examples += len(idx)
    model.eval()
    return {"train_loss": total / max(examples, 1), "steps": float(steps), "examples": float(examples)}


def proximal_penalty(params: list[torch.Tensor], mu: float) -> Callable[[], torch.Tensor]:
    """FedProx (Li et al. 2020): ``μ/2 · Σ‖w − w₀‖²`` over ``params``, w₀ their values now (the global model)."""
    anchors = [p.detach().clone() for p in params]

    def penalty() -> torch.Tensor:
        return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))  # type: ignore[return-value]

    return penalty


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Encoded,
    batch_size: int = 128,
    forward: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None,
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy over ``data``."""
    forward = forward or (lambda inputs: model(**inputs))
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        logits = forward(batch_inputs(data, idx))
        y = data.labels[idx]
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
    model.train(was_training)
    n = max(len(data), 1)
    return correct / n, loss_sum / n
