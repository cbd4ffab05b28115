"""Shared fixtures: a tiny task on the real bundled data, built once per session."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

# CI is reproducible: hypothesis draws the same examples every run ("derandomize"). For a wider,
# random search: HYPOTHESIS_PROFILE=explore pytest tests/test_codecs.py
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_config(**overrides):
    """A run config on --model tiny that trains in about a second per round."""
    from fedsqueeze.config import RunConfig

    values = dict(
        model="tiny",
        dataset="wordnet",
        clients=4,
        clients_per_round=2,
        rounds=2,
        train_size=200,
        test_size=100,
        local_steps=3,
        batch_size=8,
        seed=0,
    )
    values.update(overrides)
    return RunConfig(**values).validate()


@pytest.fixture
def tiny_cfg(tmp_path):
    """Configs of tiny runs; each call gets an output directory of its own (runs never share an OUT)."""
    made = iter(range(1, 10_000))

    def make(**kw):
        n = next(made)
        return tiny_config(out=str(tmp_path / ("run" if n == 1 else f"run{n}")), **kw)

    return make


def pytest_terminal_summary(terminalreporter):
    """Report how many malformed payloads the fuzz tests fed to the decoders (tests/fuzzing.py)."""
    import sys

    fuzzing = sys.modules.get("fuzzing")
    if fuzzing is None or not fuzzing.TRIED:
        return
    total, rejected = sum(fuzzing.TRIED.values()), sum(fuzzing.REJECTED.values())
    terminalreporter.write_line(
        f"fuzz: {total} malformed payloads over {len(fuzzing.TRIED)} decoders; {rejected} raised PayloadError, "
        f"{total - rejected} decoded to valid values, none raised anything else"
    )
    for name, n in sorted(fuzzing.TRIED.items()):
        peak = f", peak {fuzzing.PEAK[name] / 1024:.1f} KiB" if name in fuzzing.PEAK else ""
        terminalreporter.write_line(f"  {name}: {n} tried, {fuzzing.REJECTED[name]} rejected{peak}")
