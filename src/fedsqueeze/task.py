"""The task every method is measured on: model, encoded data, client partition, evaluation.

Built once per run (tokenization happens here, never per round). The simulator keeps exactly one
model in memory; clients are index arrays into the training split plus small method state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fedsqueeze.attacks import poison_labels
from fedsqueeze.config import RunConfig
from fedsqueeze.data import RawDataset, RawSplit, load_dataset, partition
from fedsqueeze.errors import ConfigError
from fedsqueeze.models import Classifier, load_model
from fedsqueeze.models.effnet import PIXEL_MEAN, PIXEL_STD
from fedsqueeze.models.prompting import encode_prompts, label_words_for, template_for
from fedsqueeze.seeding import SERVER, np_rng
from fedsqueeze.training import Encoded, evaluate


def encode_split(split: RawSplit, tokenizer, max_length: int, template: str | None = None) -> Encoded:
    """Tokenize texts (padded to ``max_length``; batches trim later), as prompts given a ``template``, or scale images."""
    labels = torch.from_numpy(split.labels.astype(np.int64))
    if split.texts is not None and template is not None:
        return Encoded(encode_prompts(tokenizer, split.texts, template, max_length), labels)
    if split.texts is not None:
        enc = tokenizer(split.texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        return Encoded({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, labels)
    if split.images is None:
        raise ValueError("a split holds either texts or images")
    pixels = torch.from_numpy(split.images.astype(np.float32) / 255.0)
    pixels = ((pixels - PIXEL_MEAN) / PIXEL_STD).unsqueeze(1)
    return Encoded({"pixel_values": pixels}, labels)


@dataclass
class Task:
    cfg: RunConfig
    model: Classifier
    train: Encoded
    test: Encoded
    client_indices: list[np.ndarray]
    label_names: list[str]
    model_params: int
    dataset_kind: str
    prompted: bool = False  # a causal LM classifying through a prompt and label words
    zero_shot: tuple[float, float] | None = None  # prompted: test accuracy and loss of the untrained LM
    _features: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def client_data(self, client: int) -> Encoded:
        """The training examples held by ``client``."""
        return self.train.subset(torch.from_numpy(self.client_indices[client]))

    def client_sizes(self) -> list[int]:
        return [len(ix) for ix in self.client_indices]

    @torch.no_grad()
    def frozen_features(self, split: str) -> torch.Tensor:
        """Pooled features of the *pre-trained* backbone for 'train' or 'test', computed once.

        Valid only while the backbone is unchanged: methods that train the backbone never call it.
        """
        if split not in self._features:
            data = self.train if split == "train" else self.test
            self.model.eval()
            chunks = []
            bs = self.cfg.eval_batch_size
            from fedsqueeze.training import batch_inputs

            for start in range(0, len(data), bs):
                idx = torch.arange(start, min(start + bs, len(data)))
                chunks.append(self.model.features(**batch_inputs(data, idx)))
            self._features[split] = torch.cat(chunks)
        return self._features[split]

    def evaluate(self, forward=None) -> tuple[float, float]:
        """Accuracy and loss of the current model (or ``forward``) on the held-out test split."""
        return evaluate(self.model, self.test, self.cfg.eval_batch_size, forward)


def build_task(cfg: RunConfig, raw: RawDataset | None = None) -> Task:
    """Load data and model for ``cfg`` and partition the training split over the clients."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    raw = raw or load_dataset(cfg.dataset, cfg.train_size, cfg.test_size, cfg.text_column, cfg.label_column)
    words = label_words_for(raw.label_names, cfg.label_words) if raw.kind == "text" else None
    loaded = load_model(cfg.model, raw.kind, raw.num_classes, cfg.seed, label_words=words, image_size=cfg.image_size)
    template = template_for(cfg.dataset, cfg.prompt_template) if loaded.prompted else None
    if not loaded.prompted and (cfg.prompt_template or cfg.label_words):
        raise ConfigError(f"prompt_template and label_words apply to causal LMs (smollm2, tiny-lm); model {cfg.model!r} is not one")
    train = encode_split(raw.train, loaded.tokenizer, cfg.max_length, template)
    test = encode_split(raw.test, loaded.tokenizer, cfg.max_length, template)
    parts = partition(raw.train.labels, cfg.clients, cfg.partition, cfg.alpha, np_rng(cfg.seed, 0, SERVER, "partition"))
    train = poison_labels(cfg, train, parts, raw.num_classes)  # the label_flip attack's data hook (else unchanged)
    model_params = sum(p.numel() for p in loaded.model.parameters())
    loaded.model.eval()
    task = Task(cfg, loaded.model, train, test, parts, raw.label_names, model_params, raw.kind, loaded.prompted)
    if loaded.prompted:  # before any method changes the model: the LM's own (zero-shot) accuracy, "round 0"
        task.zero_shot = task.evaluate()
    return task
