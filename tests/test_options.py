"""The one option system: coercion, checks, renames, and a bad value of EVERY option through the CLI.

Each CLI case runs ``fedsqueeze.cli.main`` in-process with the data and model loaders replaced by
a function that fails the test, so "exit 2 and one line" also proves nothing was loaded first.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest
import typer

import fedsqueeze.task
from fedsqueeze import cli
from fedsqueeze.codecs import CODECS
from fedsqueeze.config import RunConfig, build_config
from fedsqueeze.errors import ConfigError
from fedsqueeze.methods import METHODS, get_method
from fedsqueeze.options import (
    above,
    at_least,
    between,
    choices_of,
    coerce,
    describe_options,
    kind_of,
    option,
    option_fields,
    parse_options,
)

# a wrong type for each kind of option: TOML parses "[1, 2]" as a list, which no scalar option takes
WRONG_TYPE = {bool: "notabool", int: "notanumber", float: "notanumber", str: "[1, 2]"}


def bad_values(f) -> list[tuple[str, str, list[str]]]:
    """``(what, --set value, words the error must contain)`` for option ``f``, from its metadata."""
    kind = kind_of(f)
    cases = [("type", WRONG_TYPE[kind], [])]
    if kind is int:
        cases.append(("fraction", "1.5", []))
    choices = choices_of(f)
    if choices is not None:
        cases.append(("choice", "not-a-choice", [str(c) for c in choices]))
    check = f.metadata.get("check")
    if check is not None:
        cases.append(("range", str(check.bad), [check.text]))
    return cases


METHOD_CASES = [
    pytest.param(m, f.name, value, words, id=f"{m}-{f.name}-{what}")
    for m in sorted(METHODS)
    for f in option_fields(METHODS[m].Options)
    for what, value, words in bad_values(f)
]
CODEC_CASES = [
    pytest.param(cid, f.name, value, words, id=f"codec-{cid}-{f.name}-{what}")
    for cid in sorted(CODECS)
    for f in option_fields(CODECS[cid].Options)
    for what, value, words in bad_values(f)
]
RUN_CASES = [
    pytest.param(f.name, value, words, id=f"run-{f.name}-{what}")
    for f in option_fields(RunConfig)
    for what, value, words in bad_values(f)
    if f.name != "method"  # its values are checked by get_method (test_unknown_method_... below)
]


@pytest.fixture
def no_loading(monkeypatch):
    """Data or model loading fails the test: every check must come before it."""

    def loaded(*args, **kwargs):
        raise AssertionError("data or a model was loaded before the options were checked")

    monkeypatch.setattr(fedsqueeze.task, "load_dataset", loaded)
    monkeypatch.setattr(fedsqueeze.task, "load_model", loaded)


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """``fedsqueeze ARGV`` in this process: its exit code and its stderr."""
    capsys.readouterr()
    old = sys.argv
    sys.argv = ["fedsqueeze", *argv]
    try:
        with pytest.raises(SystemExit) as exc:
            cli.main()
    finally:
        sys.argv = old
    return exc.value.code, capsys.readouterr().err


def assert_one_line_error(code: int, stderr: str, words: list[str]) -> None:
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize(("method", "name", "value", "words"), METHOD_CASES)
def test_every_method_option_rejects_a_bad_value_through_the_cli(method, name, value, words, capsys, no_loading, tmp_path):
    code, stderr = run_cli(["run", "--method", method, "--out", str(tmp_path), "--set", f"{name}={value}"], capsys)
    assert_one_line_error(code, stderr, [f"'{name}'", f"method '{method}'", *words])


@pytest.mark.parametrize(("cid", "name", "value", "words"), CODEC_CASES)
def test_every_codec_option_rejects_a_bad_value_through_the_cli(cid, name, value, words, capsys, no_loading, tmp_path):
    argv = ["run", "--out", str(tmp_path), "--set", f"uplink_codec={cid}", "--set", f"{cid}_{name}={value}"]
    assert_one_line_error(*run_cli(argv, capsys), [f"'{name}'", f"codec '{cid}'", *words])


@pytest.mark.parametrize(("name", "value", "words"), RUN_CASES)
def test_every_run_option_rejects_a_bad_value_through_the_cli(name, value, words, capsys, no_loading, tmp_path):
    sets = [] if name == "out" else ["--out", str(tmp_path)]
    code, stderr = run_cli(["run", *sets, "--set", f"{name}={value}"], capsys)
    assert_one_line_error(code, stderr, [f"'{name}'", *words])


@pytest.mark.parametrize(
    ("method", "sets", "words"),
    [
        ("fedpm", ["aggregate=delta", "carry_priors=true"], ["carry_priors", "aggregate=beta"]),
        ("deltamask", ["kappa_schedule=geometric", "kappa_end=0"], ["geometric", "kappa_end > 0"]),
        ("fedavg", ["dp_noise=1.0"], ["dp_noise", "dp_clip"]),
        ("ia3", ["feedforward_modules=query"], ["feedforward_modules", "query"]),
        ("decomfl", ["local_steps=0"], ["decomfl", "local_steps >= 1"]),
        ("decomfl", ["aggregation=median"], ["'aggregation'", "renamed to 'aggregate'"]),
        ("decomfl", ["lora_r=4"], ["'lora_r'", "renamed to 'rank'"]),
        ("prompt", ["dataset=fashion-mnist"], ["prompt", "text"]),
    ],
)
def test_rules_across_options_and_renames_are_one_line_errors(method, sets, words, capsys, no_loading, tmp_path):
    argv = ["run", "--method", method, "--out", str(tmp_path)] + [a for s in sets for a in ("--set", s)]
    assert_one_line_error(*run_cli(argv, capsys), words)


def test_the_issue_examples_exit_2(capsys, no_loading, tmp_path):
    code, stderr = run_cli(["run", "--method", "fedpm", "--out", str(tmp_path), "--set", "eval_mask=foo"], capsys)
    assert_one_line_error(code, stderr, ["option 'eval_mask' of method 'fedpm' must be one of: expected, threshold, sample; got 'foo'"])
    code, stderr = run_cli(["run", "--out", str(tmp_path), "--set", "optimizer=sgdd"], capsys)
    assert_one_line_error(code, stderr, ["'optimizer'", "adamw, adam, sgd", "'sgdd'"])


def test_unknown_method_is_one_line(capsys, no_loading):
    assert_one_line_error(*run_cli(["run", "--method", "fedpn"], capsys), ["'fedpn'", "did you mean 'fedpm'", "fedavg"])


def test_good_values_pass_the_same_checks():
    cfg = build_config(None, {"method": "deltamask"}, {"eval_mask": "threshold", "kappa_start": "0.5", "stratify": "yes"})
    method = get_method("deltamask")(cfg)
    assert (method.opts.eval_mask, method.opts.kappa_start, method.opts.stratify) == ("threshold", 0.5, True)
    cfg = build_config(None, {"method": "decomfl"}, {"aggregate": "median", "rank": 4})
    assert (get_method("decomfl")(cfg).opts.aggregate, get_method("decomfl")(cfg).opts.rank) == ("median", 4)


# ---- the helpers themselves ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "kind", "expected"),
    [
        ("yes", bool, True),
        (0, bool, False),
        ("FALSE", bool, False),
        ("3", int, 3),
        (3.0, int, 3),
        ("1e3", int, 1000),
        ("12345678901234567890", int, 12345678901234567890),
        (2, float, 2.0),
        ("2.5", float, 2.5),
        (7, str, "7"),
    ],
)
def test_coerce_accepts(value, kind, expected):
    out = coerce(value, kind, "x", "the test")
    assert out == expected and type(out) is kind


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (True, int),
        (False, float),
        (2, bool),
        ("maybe", bool),
        (1.5, int),
        ("inf", int),
        ([1], str),
        (None, float),
        ({}, int),
    ],
)
def test_coerce_rejects_with_one_line_naming_the_option(value, kind):
    with pytest.raises(ConfigError, match=r"^option 'x' of the test must be .*; got ") as exc:
        coerce(value, kind, "x", "the test")
    assert "\n" not in str(exc.value)


def test_checks_describe_themselves_and_reject_their_bad_example():
    for check, text in [
        (between(0.0, 1.0, hi_open=True), "in [0, 1)"),
        (at_least(1), ">= 1"),
        (above(0.0), "> 0"),
        (between(0.0, 0.5, lo_open=True, hi_open=True), "in (0, 0.5)"),
    ]:
        assert check.text == text and not check.test(check.bad)
    assert between(0.0, 1.0, hi_open=True).test(0.0) and not between(0.0, 1.0, lo_open=True).test(0.0)


@dataclass
class _Demo:
    renamed = {"old": "level"}  # a plain class attribute, not a field
    level: int = option(3, "a level", check=between(1, 9))
    mode: str = option("a", "a mode", choices=lambda: ["a", "b"])

    def validate(self) -> None:
        if self.mode == "b" and self.level > 5:
            raise ConfigError("mode b needs level <= 5")


def test_parse_options_unknown_renamed_choices_and_validate():
    assert parse_options(_Demo, {"level": "4", "mode": "b"}, "demo") == _Demo(level=4, mode="b")
    with pytest.raises(ConfigError, match=r"unknown option 'levl' for demo \(did you mean 'level'\?\); its options are: level, mode"):
        parse_options(_Demo, {"levl": 1}, "demo")
    with pytest.raises(ConfigError, match="option 'old' of demo was renamed to 'level'"):
        parse_options(_Demo, {"old": 1}, "demo")
    with pytest.raises(ConfigError, match=r"option 'mode' of demo must be one of: a, b; got 'c'"):
        parse_options(_Demo, {"mode": "c"}, "demo")
    with pytest.raises(ConfigError, match=r"option 'level' of demo must be in \[1, 9\]; got 10"):
        parse_options(_Demo, {"level": 10}, "demo")
    with pytest.raises(ConfigError, match="mode b needs level <= 5"):
        parse_options(_Demo, {"mode": "b", "level": 6}, "demo")
    assert describe_options(_Demo) == [("level", 3, "a level (in [1, 9])"), ("mode", "a", "a mode (one of: a, b)")]


def test_run_and_compare_flags_are_generated_from_run_config():
    group = typer.main.get_command(cli.app)
    run_flags = {p.name for p in group.commands["run"].params}
    compare_flags = {p.name for p in group.commands["compare"].params}
    fields = set(RunConfig.field_names())
    assert fields <= run_flags and fields - {"method"} <= compare_flags and "method" not in compare_flags
    assert {"config", "set_", "quiet", "resume", "superlink", "root_certificates"} <= run_flags
    assert {"methods", "target", "config", "set_", "quiet"} <= compare_flags


def test_generated_flags_reach_the_config(capsys, no_loading, tmp_path):
    code, stderr = run_cli(["run", "--out", str(tmp_path), "--batch-size", "0"], capsys)
    assert_one_line_error(code, stderr, ["'batch_size'", ">= 1", "got 0"])
    code, stderr = run_cli(["run", "--resume", str(tmp_path), "--no-checkpoint"], capsys)
    assert_one_line_error(code, stderr, ["--resume", "--checkpoint"])


def test_a_directly_built_run_config_is_checked_and_normalised():
    cfg = RunConfig(alpha=1, checkpoint=0, rounds=3.0).validate()  # e.g. from a peer's JSON
    assert (cfg.alpha, cfg.checkpoint, cfg.rounds) == (1.0, False, 3) and type(cfg.alpha) is float
    with pytest.raises(ConfigError, match="option 'rounds' of the run must be an integer; got 'ten'"):
        RunConfig(rounds="ten").validate()
    with pytest.raises(ConfigError, match="option 'partition' of the run must be one of: iid, dirichlet; got 'x'"):
        RunConfig(partition="x").validate()
