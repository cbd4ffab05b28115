"""Zeroth-order training of the top transformer layers on cached inputs (``params=top``).

Only the top ``n`` layers of a text encoder (LoRA on them) and the head train; the layers below
never change, so their output on a client's data is the same in every round. A client computes it
once, with the pre-trained model, and every zeroth-order loss evaluation then runs only the top
``n`` layers, the pooling and the head: a *partial* forward, ``n / layers`` of a full one. This is
what makes hundreds of zeroth-order steps per round affordable while the backbone still moves.

The cache holds the hidden states entering the first trainable layer, padded to the split's width,
with the attention mask beside them: an :class:`~fedsqueeze.training.Encoded` whose inputs are
``hidden`` and ``attention_mask``, so :func:`~fedsqueeze.training.batch_inputs` trims a batch to
its longest sequence exactly as for token ids. Supported: BERT-style encoders whose layers sit in
``backbone.encoder.layer`` and take ``(hidden_states, additive_mask)`` (MiniLM, the tiny model).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedsqueeze.errors import ConfigError
from fedsqueeze.methods.peft import added_parameters
from fedsqueeze.models import Classifier
from fedsqueeze.seeding import seeded_torch
from fedsqueeze.training import Encoded, batch_inputs


class _Stop(Exception):
    """Raised by the caching hook: the layers above the cached point need not run."""


def encoder_layers(model: Classifier) -> nn.ModuleList:
    """The transformer layers of a BERT-style text encoder; ConfigError for any other backbone."""
    layers = getattr(getattr(model.backbone, "encoder", None), "layer", None)
    if model.kind != "text" or not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ConfigError("params='top' needs a BERT-style text encoder (backbone.encoder.layer), e.g. minilm")
    return layers


class TopLayers:
    """The top ``n`` layers of ``model``'s encoder, run on cached inputs of the lowest of them."""

    def __init__(self, model: Classifier, n: int) -> None:
        layers = encoder_layers(model)
        if not 1 <= n <= len(layers):
            raise ConfigError(f"top_layers must be between 1 and the encoder's {len(layers)} layers; got {n}")
        self.model = model
        self.first = len(layers) - n
        self.layers = list(layers[self.first :])
        self.fraction = n / len(layers)  # a loss evaluation's share of a full forward's layers

    def inject_lora(self, rank: int, alpha: float, targets: list[str], seed: int) -> list[str]:
        """LoRA (B = 0, A from ``seed``) on ``targets`` of the top layers only; the new parameters' names."""
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=set(self.model.module_names(targets)))  # type: ignore[arg-type]

        def inject() -> None:
            for layer in self.layers:
                inject_adapter_in_model(config, layer)

        try:
            with seeded_torch(seed):
                names = added_parameters(self.model, inject)
        except ValueError as exc:  # peft: "Target modules ... not found"
            raise ConfigError(f"params='top': {exc}") from exc
        if not names:
            raise ConfigError(f"params='top': modules {targets} matched nothing in the top layers")
        return names

    @torch.no_grad()
    def cache(self, data: Encoded, batch_size: int) -> Encoded:
        """The hidden states entering the first trainable layer for every example of ``data``.

        Run with the pre-trained lower layers (which never change); the top layers are skipped.
        """
        got: list[torch.Tensor] = []

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            got.append(args[0].detach().clone())
            raise _Stop

        mask = data.inputs["attention_mask"]
        width = mask.shape[1]
        handle = self.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(data), batch_size):
                idx = torch.arange(start, min(start + batch_size, len(data)))
                inputs = batch_inputs(data, idx)
                try:
                    self.model.backbone(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
                except _Stop:
                    pass
                part = got.pop()
                padded = part.new_zeros((len(idx), width, part.shape[-1]))
                padded[:, : part.shape[1]] = part
                got.append(padded)
        finally:
            handle.remove()
            self.model.train(was_training)
        hidden = torch.cat(got) if got else torch.zeros((0, width, 0))
        return Encoded({"hidden": hidden, "attention_mask": mask}, data.labels)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits from cached ``hidden`` states: the top layers, mean pooling over the mask, the head."""
        hidden, mask = inputs["hidden"], inputs["attention_mask"]
        # the additive mask BERT's eager attention takes: 0 on tokens, the dtype's minimum on padding
        additive = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        for layer in self.layers:
            out: Any = layer(hidden, additive)
            hidden = out[0] if isinstance(out, tuple) else out
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return self.model.head((hidden * m).sum(1) / m.sum(1).clamp_min(1.0))
