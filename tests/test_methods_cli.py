"""`fedsqueeze methods [NAME]`: every method, codec and run option, or just one of them."""

from __future__ import annotations

from typer.testing import CliRunner

from fedsqueeze.cli import app
from fedsqueeze.codecs import CODECS
from fedsqueeze.errors import FedsqueezeError
from fedsqueeze.methods import METHODS


def _run(*args):
    return CliRunner().invoke(app, ["methods", *args], terminal_width=200)


def test_methods_lists_every_method_codec_and_run_option():
    out = _run().output
    for name in METHODS:
        assert name in out and METHODS[name].summary[:40] in out
    for cid in CODECS:
        assert cid in out
    for run_opt in ("uplink_mbps", "downlink_mbps", "latency_ms", "link_spread", "clients_per_round"):
        assert run_opt in out


def test_methods_name_shows_only_that_one():
    out = _run("head").output
    assert "linear probing" in out and "server_lr" in out
    assert "full fine-tuning" not in out and "run options" not in out
    assert "link_spread" in _run("run").output and "server_lr" not in _run("run").output


def test_methods_unknown_name_suggests():
    result = _run("hed")
    assert isinstance(result.exception, FedsqueezeError) and "'head'" in str(result.exception)


def _flat(*args) -> str:
    """The output with the table's column rules and line wraps removed (a wrapped help cell reads on)."""
    return " ".join(_run(*args).output.replace("│", " ").split())


def test_methods_shows_each_options_allowed_values():
    out = _flat("fedpm")
    assert "one of: expected, threshold, sample" in out and "in (0, 0.5)" in out
    out = _flat("decomfl")
    assert "aggregate" in out and "one of: mean, median" in out and "lora_r" not in out
    assert "one of: local, flower-sim, flower" in _flat("run")
