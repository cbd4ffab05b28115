"""What benchmarks/zo_top_ceiling.py and zo_top_central.py share: the centralised warm start of the head
and the top layer's test accuracy on cached hidden states."""

from __future__ import annotations

import copy

import torch
from torch.nn import functional as F


def warm_head(model, feats: torch.Tensor, labels: torch.Tensor, steps: int = 200, lr: float = 1e-2, batch: int = 64) -> dict:
    """Train ``model.head`` on cached features (AdamW, random minibatches of torch's global RNG); its state."""
    opt = torch.optim.AdamW(model.head.parameters(), lr=lr)
    for _ in range(steps):
        i = torch.randint(0, len(labels), (batch,))
        opt.zero_grad()
        F.cross_entropy(model.head(feats[i]), labels[i]).backward()
        opt.step()
    return copy.deepcopy(model.head.state_dict())


@torch.no_grad()
def top_accuracy(top, hidden: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, batch: int = 250) -> float:
    """Accuracy of ``top(hidden, mask)`` (the top layers plus head on cached hidden states), in batches."""
    correct = 0
    for s in range(0, len(labels), batch):
        i = torch.arange(s, min(s + batch, len(labels)))
        correct += int((top(hidden[i], mask[i]).argmax(1) == labels[i]).sum())
    return correct / len(labels)
