"""How close a sampled mask at keep probability θ0 leaves MiniLM to its pre-trained self.

For θ0 in a grid, draws one mask m ~ Bernoulli(θ0) over every masked weight (the Linear weights
of the backbone) and compares the pooled features of 256 test sentences with the unmasked ones:
mean cosine similarity and relative L2 change. Also the accuracy of a linear probe trained on the
pre-trained features and evaluated on the masked features (how much a start at θ0 costs).
Writes benchmarks/results/mask_init.json. Run (heavy: loads MiniLM) under the shared lock:
PYTHONPATH=src HF_HUB_OFFLINE=1 python benchmarks/mask_init.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch.nn import functional as F

from fedsqueeze.config import RunConfig
from fedsqueeze.masking import MaskedModel, select_masked
from fedsqueeze.task import build_task
from fedsqueeze.training import batch_inputs

THETAS = [0.8, 0.9, 0.95, 0.98, 0.99, 1.0]


@torch.no_grad()
def features(masked: MaskedModel, mask: torch.Tensor, data, n: int) -> torch.Tensor:
    out = []
    for start in range(0, n, 64):
        idx = torch.arange(start, min(start + 64, n))
        inputs = batch_inputs(data, idx)
        weights = masked.masked_weights(mask)
        out.append(_pooled(masked, weights, inputs))
    return torch.cat(out)


def _pooled(masked: MaskedModel, weights, inputs) -> torch.Tensor:
    class _Features(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, **kw):
            return self.model.features(**kw)

    wrapper = _Features(masked.model)
    return torch.func.functional_call(wrapper, {f"model.{k}": v for k, v in weights.items()}, args=(), kwargs=inputs)


def main() -> None:
    cfg = RunConfig(model=os.environ.get("MASK_INIT_MODEL", "minilm"), train_size=1000, test_size=256).validate()
    task = build_task(cfg)
    layout = select_masked(task.model)
    masked = MaskedModel(task.model, layout)
    task.model.eval()
    n_test = len(task.test)
    base_test = features(masked, torch.ones(layout.total), task.test, n_test)
    base_train = features(masked, torch.ones(layout.total), task.train, len(task.train))
    head = torch.nn.Linear(base_train.shape[1], task.num_classes)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(300):
        loss = F.cross_entropy(head(base_train), task.train.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    rows = []
    gen = torch.Generator().manual_seed(0)
    for theta in THETAS:
        mask = (torch.rand(layout.total, generator=gen) < theta).float()
        feats = features(masked, mask, task.test, n_test)
        with torch.no_grad():
            acc = float((head(feats).argmax(-1) == task.test.labels).float().mean())
        rows.append(
            {
                "theta0": theta,
                "cosine": float(F.cosine_similarity(feats, base_test).mean()),
                "rel_l2": float((feats - base_test).norm() / base_test.norm()),
                "probe_accuracy": acc,
            }
        )
        print(rows[-1])
    path = Path(__file__).parent / "results" / "mask_init.json"
    path.write_text(json.dumps({"masked_weights": layout.total, "test_examples": n_test, "rows": rows}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
