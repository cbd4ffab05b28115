"""`fedsqueeze compare`, `report`/`plot`: report.md numbers come from results.json; plots are written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedsqueeze.config import RunConfig
from fedsqueeze.errors import ConfigError
from fedsqueeze.report.compare import find_results, labels_for, load_results, render_report, time_to_target, write_report
from fedsqueeze.runners import method_configs, split_options

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parent.parent / "src")}
    return subprocess.run([sys.executable, "-m", "fedsqueeze", *args], capture_output=True, text=True, env=env, timeout=600)


def _table_rows(md: str, heading: str) -> dict[str, list[str]]:
    """The rows of the first markdown table under ``heading``, keyed by their first cell."""
    section = md.split(heading, 1)[1]
    rows = {}
    started = False
    for line in section.splitlines():
        if line.startswith("|"):
            started = True
            cells = [c.strip() for c in line.strip("|").split("|")]
            if cells[0] not in ("method", "---", "round"):
                rows[cells[0]] = cells[1:]
        elif started:
            break
    return rows


def _num(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("×"))


def _check_report_numbers(md: str, results: dict[str, dict]) -> None:
    rows = _table_rows(md, "## Accuracy and bytes")
    assert set(rows) == set(results)
    for label, res in results.items():
        acc, best, up, up_r, down, down_r, up_bpp, down_bpp, trainable, wall, sim = rows[label]
        final, rounds = res["final"], res["rounds"]
        assert acc == f"{final['accuracy']:.4f}"
        assert best == f"{max(r['accuracy'] for r in rounds):.4f}"
        assert _num(up) == final["total_uplink_bytes"] == sum(r["uplink_bytes"] for r in rounds)
        assert _num(down) == final["total_downlink_bytes"] == sum(r["downlink_bytes"] for r in rounds)
        assert _num(up_r) == round(final["total_uplink_bytes"] / len(rounds))
        assert _num(down_r) == round(final["total_downlink_bytes"] / len(rounds))
        assert up_bpp == f"{final['mean_uplink_bpp']:.4g}" and down_bpp == f"{final['mean_downlink_bpp']:.4g}"
        assert _num(trainable) == res["trainable_params"]
        assert wall == f"{sum(r['wall_s'] for r in rounds):.1f}"
        assert sim == f"{sum(r['sim_time_s'] for r in rounds):.1f}"


def test_compare_cli_writes_report_and_plots(tmp_path):
    out = tmp_path / "cmp"
    p = _cli(
        "compare",
        "--methods",
        "fedavg,head",
        "--model",
        "tiny",
        "--rounds",
        "2",
        "--out",
        str(out),
        "--quiet",
        "--clients",
        "4",
        "--clients-per-round",
        "2",
        "--set",
        "train_size=100",
        "--set",
        "test_size=50",
        "--set",
        "local_steps=2",
        "--set",
        "batch_size=8",
    )
    assert p.returncode == 0, p.stderr
    for name in ("report.md", "pareto.png", "accuracy.png", "bpp.png"):
        assert (out / name).is_file(), name
    for name in ("pareto.png", "accuracy.png", "bpp.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC and (out / name).stat().st_size > 10_000
    results = {m: json.loads((out / m / "results.json").read_text()) for m in ("fedavg", "head")}
    # same task, partition and seed: the configs differ only in the method and its output directory
    a, b = (dict(results[m]["config"]) for m in ("fedavg", "head"))
    assert {k for k in a if a[k] != b[k]} == {"method", "out"}
    md = (out / "report.md").read_text()
    _check_report_numbers(md, results)
    ratios = _table_rows(md, "## Against fedavg")
    up_ratio = results["fedavg"]["final"]["total_uplink_bytes"] / results["head"]["final"]["total_uplink_bytes"]
    assert ratios["head"][0] == f"{up_ratio:,.1f}×" and ratios["fedavg"][0] == "1.0×"
    assert "fedsqueeze compare --methods fedavg,head" in md  # the command that made it

    # the same report again from the results files alone
    p = _cli("report", str(out), "--out", str(tmp_path / "again"))
    assert p.returncode == 0, p.stderr
    md2 = (tmp_path / "again" / "report.md").read_text()
    _check_report_numbers(md2, results)
    assert md2.split("Task:", 1)[1] == md.split("Task:", 1)[1]
    assert all((tmp_path / "again" / n).is_file() for n in ("pareto.png", "accuracy.png", "bpp.png"))


def test_compare_unknown_method_fails_before_any_run(tmp_path):
    from typer.testing import CliRunner

    from fedsqueeze.cli import app

    result = CliRunner().invoke(app, ["compare", "--methods", "fedavg,nosuch", "--model", "tiny", "--out", str(tmp_path / "c")])
    assert isinstance(result.exception, ConfigError) and "nosuch" in str(result.exception)
    assert not (tmp_path / "c").exists()


# ---- reports from hand-made results (no training) -------------------------------------------------
def _fake(method: str, accs: list[float], up: int, down: int, sim: float | None = 1.0, params: int = 1000) -> dict:
    rounds = []
    for i, acc in enumerate(accs, 1):
        r = {
            "round": i,
            "accuracy": acc,
            "loss": 1.0,
            "uplink_bytes": up,
            "downlink_bytes": down,
            "uplink_bpp": up * 8 / (2 * params),
            "downlink_bpp": down * 8 / (2 * params),
            "clients": 2,
            "wall_s": 2.0,
        }
        if sim is not None:
            r["sim_time_s"] = sim
        rounds.append(r)
    final = {
        "accuracy": accs[-1],
        "total_uplink_bytes": up * len(accs),
        "total_downlink_bytes": down * len(accs),
        "mean_uplink_bpp": rounds[0]["uplink_bpp"],
        "mean_downlink_bpp": rounds[0]["downlink_bpp"],
    }
    cfg = RunConfig(method=method, model="tiny").to_dict()
    return {"method": method, "config": cfg, "model_params": params, "trainable_params": params, "rounds": rounds, "final": final}


def test_time_to_target_sums_costs_up_to_first_round_reaching_it():
    res = _fake("x", [0.1, 0.4, 0.6, 0.5], up=100, down=300, sim=2.5)
    assert time_to_target(res, 0.55) == {"round": 3, "uplink_bytes": 300, "downlink_bytes": 900, "wall_s": 6.0, "sim_time_s": 7.5}
    assert time_to_target(res, 0.7) is None
    assert time_to_target(_fake("x", [0.9], 1, 1, sim=None), 0.5)["sim_time_s"] is None


def test_report_default_target_ratios_and_missing_sim(tmp_path):
    results = [_fake("fedavg", [0.2, 0.5], up=4000, down=4000), _fake("head", [0.3, 0.4], up=40, down=400, sim=None)]
    md = render_report(results)
    assert "## Time to accuracy 0.4500" in md  # 90% of the best final accuracy (0.5)
    ttt = _table_rows(md, "## Time to accuracy")
    assert ttt["fedavg"][:2] == ["2", "8,000"] and ttt["head"][0] == "not reached"
    ratios = _table_rows(md, "## Against fedavg")
    assert ratios["head"][:3] == ["100.0×", "10.0×", f"{8000 / 440:,.1f}×"]
    assert ratios["head"][3] == "-0.1000"
    assert _table_rows(md, "## Accuracy and bytes")["head"][-1] == "n/a"  # no sim_time_s recorded
    done = write_report(results, tmp_path / "r", target=0.35)
    assert done["target"] == 0.35 and all(p.read_bytes()[:8] == PNG_MAGIC for p in done["plots"])
    assert "## Time to accuracy 0.3500" in done["report"].read_text()


def test_report_without_fedavg_has_no_ratio_table_and_warns_on_task_mismatch():
    a, b = _fake("head", [0.3], 10, 10), _fake("lora", [0.4], 20, 20)
    b["config"]["seed"] = 7
    md = render_report([a, b])
    assert "## Against" not in md
    assert "seed differs between runs" in md


def test_labels_disambiguate_repeated_methods(tmp_path):
    runs = []
    for name in ("raw", "int8"):
        d = tmp_path / name
        d.mkdir()
        (d / "results.json").write_text(json.dumps(_fake("fedavg", [0.5], 10, 10)))
        runs.append(d)
    results = load_results([tmp_path])  # a directory of run directories
    assert labels_for(results) == ["fedavg (int8)", "fedavg (raw)"]
    assert find_results([runs[0] / "results.json", runs[1]]) == [runs[0] / "results.json", runs[1] / "results.json"]
    with pytest.raises(ConfigError):
        find_results([tmp_path / "nothing"])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError):
        load_results([tmp_path / "bad.json"])


# ---- option routing -------------------------------------------------------------------------------
def test_split_options_routes_shared_and_per_method_keys():
    routed = split_options({"server_lr": 0.5, "head.optimizer": "sgd"}, ["fedavg", "head"])
    assert routed == {"fedavg": {"server_lr": 0.5}, "head": {"server_lr": 0.5, "optimizer": "sgd"}}
    routed = split_options({"fedavg": {"server_lr": 2.0}, "server_lr": 0.5}, ["fedavg", "head"])  # TOML [options.fedavg]
    assert routed == {"fedavg": {"server_lr": 2.0}, "head": {"server_lr": 0.5}}
    with pytest.raises(ConfigError, match="taken by none of the compared methods.*server_lr"):
        split_options({"server_lrr": 1}, ["fedavg", "head"])
    with pytest.raises(ConfigError, match="not one of the compared methods"):
        split_options({"lora.rank": 4}, ["fedavg", "head"])


def test_method_configs_share_everything_but_method_and_out(tmp_path):
    base = RunConfig(model="tiny", seed=3, options={"server_lr": 0.5})
    cfgs = method_configs(base, ["fedavg", "head"], tmp_path)
    assert [c.method for c in cfgs] == ["fedavg", "head"]
    assert [c.out for c in cfgs] == [str(tmp_path / "fedavg"), str(tmp_path / "head")]
    assert all(c.seed == 3 and c.model == "tiny" for c in cfgs)
    with pytest.raises(ConfigError):
        method_configs(base, ["fedavg", "fedavg"], tmp_path)


def test_a_failing_method_does_not_lose_the_others(tmp_path, monkeypatch):
    import fedsqueeze.runners
    from fedsqueeze.runners import run_compare

    def fake_run(cfg, show_progress=True, **kwargs):
        if cfg.method == "head":
            raise RuntimeError("boom")
        return _fake(cfg.method, [0.5, 0.6], 100, 100)

    monkeypatch.setattr(fedsqueeze.runners, "run", fake_run)
    done = run_compare(RunConfig(model="tiny"), ["fedavg", "head"], tmp_path, show_progress=False)
    assert done["failed"] == [{"method": "head", "error": "RuntimeError: boom"}]
    md = done["report"].read_text()
    assert "**head failed**" in md and set(_table_rows(md, "## Accuracy and bytes")) == {"fedavg"}
