"""fedsqueeze: federated fine-tuning of pre-trained models at a tiny communication cost.

The public Python API lives in :mod:`fedsqueeze.api` and is re-exported here, loaded on first use
(``fedsqueeze.codec("sz3")``, ``fedsqueeze.run(...)``): a bare ``import fedsqueeze`` imports
neither torch nor the codecs, which Flower's per-message ClientApp processes rely on.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.2.0"  # the one place the version is written: pyproject.toml reads it from here


def __getattr__(name: str) -> Any:
    """``fedsqueeze.<name>`` for the names of :data:`fedsqueeze.api.__all__`, imported on first use."""
    if not name.startswith("_"):  # dunder probes (copy, pickle, pytest) never import the API
        import importlib

        api = importlib.import_module("fedsqueeze.api")  # not `from fedsqueeze import api`: that asks this hook again
        if name in api.__all__:
            return getattr(api, name)
    raise AttributeError(f"module 'fedsqueeze' has no attribute {name!r}")
