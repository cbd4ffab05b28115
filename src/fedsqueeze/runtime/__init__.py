"""Runtimes: the local simulator (default) and Flower."""

from fedsqueeze.runtime.local import prepare, run_local, run_round

__all__ = ["prepare", "run_local", "run_round"]
