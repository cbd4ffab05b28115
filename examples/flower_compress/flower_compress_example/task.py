"""The app's model, data and training: nothing here knows about fedsqueeze.

Data: a synthetic 10-class problem (Gaussian classes around fixed centres in 32 dimensions), split
into partitions of their own draw; every draw is seeded, so two runs train exactly alike.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

FEATURES, CLASSES, HIDDEN = 32, 10, 256


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))


def load_data(partition: int, examples: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``examples`` labelled points of one partition (partition -1: the server's test set)."""
    centres = np.random.default_rng(1234).normal(0, 1.0, size=(CLASSES, FEATURES))
    rng = np.random.default_rng(10_000 + partition)
    y = rng.integers(0, CLASSES, size=examples)
    x = centres[y] + rng.normal(0, 1.0, size=(examples, FEATURES))
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.int64)


def train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 10, lr: float = 0.05, batch: int = 32) -> float:
    """Plain SGD over the partition in order (deterministic); the mean loss of the steps.

    The step is written out (``p -= lr * grad``): torch.optim's first use imports torch._dynamo,
    seconds of start-up for a model this small.
    """
    loss_fn = nn.CrossEntropyLoss()
    losses = []
    for step in range(steps):
        i = (step * batch) % len(x)
        net.zero_grad()
        loss = loss_fn(net(x[i : i + batch]), y[i : i + batch])
        loss.backward()
        with torch.no_grad():
            for p in net.parameters():
                p -= lr * p.grad
        losses.append(loss.item())
    return float(np.mean(losses))


@torch.no_grad()
def evaluate(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    logits = net(x)
    return float((logits.argmax(1) == y).float().mean()), float(nn.functional.cross_entropy(logits, y))
