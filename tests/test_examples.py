"""Every example config loads, names a real run command, and (once its method exists) has valid options."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedsqueeze.config import build_config
from fedsqueeze.methods import METHODS

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.toml"))


def test_the_paper_examples_are_there():
    assert {"default", "deltamask", "fedpeft", "decomfl", "fedsz"} <= {p.stem for p in EXAMPLES}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_loads(path):
    cfg = build_config(path)
    assert cfg.model and cfg.dataset and cfg.rounds >= 1
    if path.stem != "default":  # each paper example says how to run it
        assert f"fedsqueeze run --config examples/{path.name}" in path.read_text()
        assert re.search(rf"fedsqueeze compare --config examples/{path.name} --methods \S*{cfg.method}", path.read_text())
    assert cfg.method in METHODS, f"{path.name} names method {cfg.method!r}, which is not registered"
    METHODS[cfg.method](cfg)  # its constructor checks every option (method and codec ones)
