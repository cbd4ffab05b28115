"""Runtimes: the local simulator (default) and Flower."""

from fedsqueeze.runtime.local import prepare, resume_local, run_local, run_round

__all__ = ["prepare", "resume_local", "run_local", "run_round"]
