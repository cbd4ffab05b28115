"""Head: linear probing. The backbone stays pre-trained; only the classification head trains and travels.

Because the backbone never changes, its pooled features are computed once per run and cached
(:meth:`Task.frozen_features`), so local training and evaluation cost a matrix product.
"""

from __future__ import annotations

import torch

from fedsqueeze.methods.base import register_method
from fedsqueeze.methods.tensor import TensorMethod
from fedsqueeze.training import Encoded, evaluate, train_local


def head_names(model) -> list[str]:
    """The classification head's parameter names (trained by every method that trains a head)."""
    return [n for n, _ in model.named_parameters() if n.startswith("head.")]


@register_method
class Head(TensorMethod):
    name = "head"
    summary = "linear probing: only the head trains and travels (backbone features cached)"
    default_lr = 1e-2

    def select_trainable(self, model) -> list[str]:
        return head_names(model)

    def local_train(self, client: int, data: Encoded, steps: int, generator: torch.Generator) -> dict[str, float]:
        feats = self.task.frozen_features("train")[torch.from_numpy(self.task.client_indices[client])]
        head = self.task.model.head
        return train_local(
            head, self.params, Encoded({"x": feats}, data.labels), steps=steps,
            batch_size=self.cfg.batch_size, lr=self.lr, generator=generator,
            optimizer=self.opts.optimizer, forward=lambda inputs: head(inputs["x"]),
        )

    def evaluate(self, state) -> tuple[float, float]:
        self.load_weights(state["weights"])
        head = self.task.model.head
        test = Encoded({"x": self.task.frozen_features("test")}, self.task.test.labels)
        return evaluate(head, test, self.cfg.eval_batch_size, forward=lambda inputs: head(inputs["x"]))
