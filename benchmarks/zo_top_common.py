"""What benchmarks/zo_top_ceiling.py and zo_top_central.py share: the centralised warm start of the head."""

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
