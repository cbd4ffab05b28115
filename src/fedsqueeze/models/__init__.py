"""Backbones, classification heads and trainable-parameter selection."""

from fedsqueeze.models.backbone import Classifier, LoadedModel, bundled_minilm_path, load_model

__all__ = ["Classifier", "LoadedModel", "bundled_minilm_path", "load_model"]
