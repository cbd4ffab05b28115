"""FedAvg: full fine-tuning, every parameter travels as float32 both ways (the 32-bpp reference)."""

from __future__ import annotations

from fedsqueeze.methods.base import register_method
from fedsqueeze.methods.tensor import TensorMethod
from fedsqueeze.models import Classifier


@register_method
class FedAvg(TensorMethod):
    name = "fedavg"
    summary = "full fine-tuning; all weights down, all deltas up (float32 by default: 32 bpp)"
    default_lr = 5e-5

    def select_trainable(self, model: Classifier) -> list[str]:
        return [n for n, _ in model.named_parameters()]
