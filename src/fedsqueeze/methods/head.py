"""Head: linear probing. The backbone stays pre-trained; only the classification head trains and travels.

Because the backbone never changes, its pooled features are computed once per run and cached
(:meth:`Task.frozen_features`), so local training and evaluation cost a matrix product. The probe's
training and evaluation (:func:`train_probe`, :func:`evaluate_probe`) are shared with DeComFL's
warm start and its ``params=head``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from fedsqueeze.methods.base import register_method
from fedsqueeze.methods.tensor import TensorMethod
from fedsqueeze.methods.weights import load_weights
from fedsqueeze.training import Encoded, evaluate, train_local

if TYPE_CHECKING:
    from fedsqueeze.models import Classifier
    from fedsqueeze.task import Task


def head_names(model: torch.nn.Module) -> list[str]:
    """The classification head's parameter names (trained by every method that trains a head)."""
    return [n for n, _ in model.named_parameters() if n.startswith("head.")]


def probe_forward(head: torch.nn.Module) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """Logits of the head on a batch of cached features ``{"x": features}``."""
    return lambda inputs: head(inputs["x"])


def train_probe(
    task: Task,
    client: int,
    params: Sequence[torch.Tensor],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    optimizer: str = "adamw",
    penalty: Callable[[], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Train the head's ``params`` on ``client``'s cached backbone features; the training metrics."""
    idx = torch.from_numpy(task.client_indices[client])
    head = task.model.head
    return train_local(
        head,
        list(params),
        Encoded({"x": task.frozen_features("train")[idx]}, task.train.labels[idx]),
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        generator=generator,
        optimizer=optimizer,
        forward=probe_forward(head),
        penalty=penalty,
    )


def evaluate_probe(task: Task, batch_size: int) -> tuple[float, float]:
    """Test accuracy and loss of the model's current head on the cached test features."""
    head = task.model.head
    test = Encoded({"x": task.frozen_features("test")}, task.test.labels)
    return evaluate(head, test, batch_size, forward=probe_forward(head))


@register_method
class Head(TensorMethod):
    name = "head"
    summary = "linear probing: only the head trains and travels (backbone features cached)"
    default_lr = 1e-2

    def select_trainable(self, model: Classifier) -> list[str]:
        return head_names(model)

    def local_train(self, client: int, data: Encoded, steps: int, generator: torch.Generator) -> dict[str, float]:
        return train_probe(
            self.task,
            client,
            self.params,
            steps=steps,
            batch_size=self.cfg.batch_size,
            lr=self.lr,
            generator=generator,
            optimizer=self.opts.optimizer,
            penalty=self.prox_penalty(),
        )

    def evaluate(self, state) -> tuple[float, float]:
        load_weights(self.named, state["weights"])
        return evaluate_probe(self.task, self.cfg.eval_batch_size)
