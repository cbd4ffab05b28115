"""Moving named weights between numpy trees (states, messages) and the one shared torch model.

Every method holds its trainable parameters as ``{name: tensor}`` of the task's model; states and
payloads hold ``{name: np.ndarray}``. These helpers are the only place the two meet.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from fedsqueeze.task import Task

Tensors = dict[str, np.ndarray]
Params = Mapping[str, torch.Tensor]


def named_params(model: torch.nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """``{name: parameter}`` of ``model`` for ``names``, in that order."""
    named = dict(model.named_parameters())
    return {n: named[n] for n in names}


def read_weights(params: Params, names: Iterable[str] | None = None) -> Tensors:
    """A copy of the parameters (all, or those in ``names``) as float numpy arrays."""
    return {n: params[n].detach().cpu().numpy().copy() for n in (params if names is None else names)}


@torch.no_grad()
def load_weights(params: Params, weights: Mapping[str, np.ndarray]) -> None:
    """Copy every array of ``weights`` into the parameter of the same name (cast to its dtype)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only arrays are copied from, never written
        for n, a in weights.items():
            p = params[n]
            p.copy_(torch.from_numpy(np.asarray(a)).view(p.shape))


def evaluate_weights(
    task: Task,
    params: Params,
    weights: Mapping[str, np.ndarray],
    forward: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None,
) -> tuple[float, float]:
    """Load ``weights`` into the model, then its test accuracy and loss (through ``forward`` if given)."""
    load_weights(params, weights)
    return task.evaluate(forward)
