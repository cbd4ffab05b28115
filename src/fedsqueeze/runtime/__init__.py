"""Runtimes: the local simulator (default) and Flower (``runtime.flower``, ``runtime.flower_app``).

The local runtime's names are resolved on first use, so that importing a submodule (the Flower
ClientApp, started afresh by Flower for every message) does not pay for torch and the models.
"""

from __future__ import annotations

from typing import Any

__all__ = ["prepare", "run_local", "run_round"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from fedsqueeze.runtime import local

        return getattr(local, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
