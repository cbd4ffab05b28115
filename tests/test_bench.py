"""`fedsqueeze bench`: suites, store keys, statistics and claim words, plot styles, the tiny suite end to end."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest

from fedsqueeze import bench, store
from fedsqueeze.config import RunConfig
from fedsqueeze.errors import ConfigError, FedsqueezeError
from fedsqueeze.report import stats
from fedsqueeze.report.plots import FAMILIES, FAMILY_MARKERS, family_of, method_style, plot_order, run_styles
from fedsqueeze.report.suite import MARK_BEGIN, MARK_END, Row, paired, render_readme_table, replace_between_markers, rows_by_table

ROOT = Path(__file__).parent.parent


# ---- statistics ------------------------------------------------------------------------------------
def test_t_quantiles_are_the_textbook_values():
    # t(0.975, df) from any t table
    for df, want in ((1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622), (29, 2.0452)):
        assert stats.t_quantile(df) == pytest.approx(want, abs=5e-5)
    with pytest.raises(ValueError):
        stats.t_quantile(0)


def test_interval_by_hand():
    iv = stats.interval([0.78, 0.80, 0.79])  # mean 0.79, sd 0.01, half = 4.3027 · 0.01 / √3
    assert iv.mean == pytest.approx(0.79) and iv.n == 3
    assert iv.sd == pytest.approx(0.01)
    assert iv.half == pytest.approx(4.302653 * 0.01 / math.sqrt(3), rel=1e-6)
    assert iv.low == pytest.approx(0.79 - iv.half) and iv.high == pytest.approx(0.79 + iv.half)
    one = stats.interval([0.5])
    assert one.mean == 0.5 and one.half is None and one.low is None


def test_paired_differences_pair_by_seed_only():
    method = {0: 0.78, 1: 0.80, 2: 0.75, 5: 0.9}
    ref = {0: 0.79, 1: 0.83, 2: 0.76, 3: 0.7}
    d = stats.paired_differences(method, ref)
    assert set(d) == {0, 1, 2}
    assert d[0] == pytest.approx(-0.01) and d[1] == pytest.approx(-0.03) and d[2] == pytest.approx(-0.01)
    iv = stats.interval(list(d.values()))  # mean -0.01667, sd 0.011547, half 4.3027·sd/√3 = 0.028685
    assert iv.mean == pytest.approx(-0.05 / 3)
    sd = math.sqrt(((1 / 150) ** 2 * 2 + (2 / 150) ** 2) / 2)  # deviations +1/150, -2/150, +1/150
    assert iv.sd == pytest.approx(sd) and iv.half == pytest.approx(4.302653 * sd / math.sqrt(3), rel=1e-6)


def test_claim_words_come_from_the_interval():
    ref = "fedavg"
    assert stats.claim(None, ref) == "not paired with fedavg"
    assert stats.claim(stats.Interval(-0.01, 1, None, None), ref) == "1 seed: no interval"
    assert stats.claim(stats.Interval(0.02, 3, 0.001, 0.005), ref) == "above fedavg (+1.5 to +2.5 points)"
    assert stats.claim(stats.Interval(-0.02, 3, 0.001, 0.005), ref) == "below fedavg (1.5 to 2.5 points)"
    # contains 0: the larger side, rounded up to a tenth (-1.23 - 2.23 = -3.46 points → 3.5)
    assert stats.claim(stats.Interval(-0.0123, 3, 0.01, 0.0223), ref) == "indistinguishable from fedavg (within 3.5 points)"
    assert stats.claim(stats.Interval(0.0, 3, 0.01, 0.0100), ref) == "indistinguishable from fedavg (within 1.0 points)"


def test_binomial_sd():
    assert stats.binomial_sd(0.8, 1000) == pytest.approx(math.sqrt(0.16 / 1000))


# ---- plot styles -----------------------------------------------------------------------------------
def test_no_two_methods_share_colour_and_marker():
    from fedsqueeze.methods import METHODS

    names = sorted(set(METHODS) | {m for ms, _ in FAMILIES.values() for m in ms} | {"zz-new", "aa-new", "mm-new", "qq-new"})
    others = [m for m in names if family_of(m) == "other"]
    pairs = [(method_style(m, others)["color"], method_style(m, others)["marker"]) for m in names]
    assert len(set(pairs)) == len(pairs)
    listed = [m for ms, _ in FAMILIES.values() for m in ms]
    colours = [method_style(m)["color"] for m in listed]
    assert len(set(colours)) == len(colours)  # inside the families, even the colours are distinct
    for fam, (ms, cs) in FAMILIES.items():
        assert len(ms) == len(cs) == len(FAMILY_MARKERS[fam]), fam
    # families draw with markers of their own (codec and zo never share a marker: their colours are close)
    assert not set(FAMILY_MARKERS["codec"]) & set(FAMILY_MARKERS["zo"])
    assert not set(FAMILY_MARKERS["mask"]) & set(FAMILY_MARKERS["peft"])


def test_plot_order_groups_by_family_and_runs_share_nothing():
    assert plot_order(["deltamask", "zz", "lora", "fedavg", "qsgd", "head"]) == ["fedavg", "qsgd", "lora", "head", "deltamask", "zz"]
    styles = run_styles(["fedavg", "fedavg", "lora"])  # a method twice: one style per run
    assert len({(s["color"], s["marker"]) for s in styles}) == 3
    assert run_styles(["fedavg", "lora"]) == [method_style("fedavg"), method_style("lora")]


# ---- keys ------------------------------------------------------------------------------------------
def _cfg(**kw) -> RunConfig:
    return RunConfig(**{"model": "tiny", "method": "lora", **kw}).validate()


def test_run_key_follows_what_changes_results_only():
    k = bench.run_key(_cfg())
    assert k == bench.run_key(_cfg(out="elsewhere", overwrite=True, checkpoint=False))
    assert k == bench.run_key(_cfg(options={"rank": 8}))  # the default, written out
    assert k != bench.run_key(_cfg(options={"rank": 4}))
    assert k != bench.run_key(_cfg(seed=1))
    assert k != bench.run_key(_cfg(threads=1))
    assert k != bench.run_key(_cfg(), epoch=store.RESULTS_EPOCH + 1)
    assert k != bench.run_key(_cfg(method="head"))
    ident = bench.config_identity(_cfg(seed=3))
    assert ident == {"run": {"method": "lora", "model": "tiny", "seed": 3}, "options": {}}


def test_code_version_names_the_checkout():
    import subprocess

    import fedsqueeze

    code = bench.code_version()
    assert code["version"] == fedsqueeze.__version__
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT / "src", capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout: its commit, and whether src/ differs from it
        assert code["commit"] == head.stdout.strip() and isinstance(code["dirty"], bool)
    else:
        assert code["commit"] is None and code["dirty"] is None


@pytest.mark.parametrize(
    "text, problem",
    [
        ('name = "x"\nseeds = [0]\n[[settings]]\nname = "a"\nmethods = ["nosuch"]\n', "nosuch"),
        ('name = "x"\nseeds = [0, 0]\n', "twice"),
        ('name = "x"\nseeds = [0]\ntypo = 1\n', "typo"),
        ('name = "x"\nseeds = [0]\n[base]\nrounds = 0\n', "rounds"),
        ('name = "x"\nseeds = [0]\nreadme_table = ["nosuch", "iid"]\n', "readme_table"),
    ],
)
def test_suite_errors_name_the_problem(tmp_path, text, problem):
    bad = tmp_path / "s.toml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=problem):
        bench.load_suite(bad)


def test_catalogue_suite_declares_each_catalogue_task():
    suite = bench.load_suite(ROOT / "benchmarks/suites/catalogue.toml")
    assert {(e.task, e.config.model) for e in suite.entries} == {
        ("mpnet-wordnet", "mpnet"),
        ("effnet-fmnist", "effnet-lite0"),
        ("smollm2-wordnet", "smollm2"),
    }
    assert {e.seed for e in suite.entries} == {0} and len(suite.entries) == 18


def test_default_suite_declares_every_method_three_seeds():
    from fedsqueeze.methods import METHODS

    suite = bench.load_suite(ROOT / "benchmarks/suites/default.toml")
    iid = [e for e in suite.entries if e.setting == "iid"]
    assert {e.method for e in iid} == set(METHODS)  # every built-in method, so a new one cannot go unmeasured
    assert {e.seed for e in iid} == {0, 1, 2}
    assert all(e.config.threads == 1 and e.config.model == "minilm" for e in suite.entries)
    skew = [e for e in suite.entries if e.setting == "alpha0.1"]
    assert skew and all(e.config.partition == "dirichlet" and e.config.alpha == 0.1 for e in skew)
    assert all(e.config.dropout == 0.3 for e in suite.entries if e.setting == "dropout0.3")
    assert all(e.config.local_steps == 30 for e in suite.entries if e.method == "decomfl")


# ---- store and tables ------------------------------------------------------------------------------
def _record(method: str, seed: int, acc: float, key: str, epoch="1", setting="iid") -> dict:
    rounds = [
        {"round": 1, "accuracy": acc, "uplink_bytes": 100, "downlink_bytes": 300, "uplink_bpp": 1.0, "downlink_bpp": 3.0, "wall_s": 1.0}
    ]
    res = {
        "method": method,
        "config": {"seed": seed},
        "rounds": rounds,
        "final": {
            "accuracy": acc,
            "total_uplink_bytes": 100,
            "total_downlink_bytes": 300,
            "mean_uplink_bpp": 1.0,
            "mean_downlink_bpp": 3.0,
        },
    }
    labels = {"task": "t", "setting": setting, "method": method, "seed": seed}
    return store.make_record(res, labels, "s", key, epoch, {"version": "x", "commit": "abcdef0123", "dirty": False}, "test")


def test_rows_use_current_runs_never_mixed_with_stale():
    cfgs = {(m, s): _cfg(method=m, seed=s) for m in ("fedavg", "lora") for s in (0, 1)}
    entries = [store.Entry("t", "iid", m, s, c) for (m, s), c in cfgs.items()]
    recs = [
        _record("fedavg", 0, 0.80, bench.run_key(cfgs["fedavg", 0])),
        _record("fedavg", 1, 0.82, bench.run_key(cfgs["fedavg", 1])),
        _record("lora", 0, 0.78, bench.run_key(cfgs["lora", 0])),
        _record("lora", 1, 0.50, "oldkey", epoch=store.PRE_PIPELINE),  # stale: not used next to a current lora run
    ]
    found = bench.match(entries, recs)
    assert [f.status for f in found] == ["current", "current", "current", "stale"]
    rows = rows_by_table(found)[("t", "iid")]
    lora, fedavg = rows["lora"], rows["fedavg"]
    assert lora.status == "current" and lora.finals() == {0: 0.78} and lora.missing == 1
    diff = paired(lora, fedavg)
    assert diff is not None and diff.n == 1 and diff.mean == pytest.approx(-0.02)
    assert fedavg.accuracy().half == pytest.approx(12.706205 * math.sqrt(0.0002) / math.sqrt(2), rel=1e-6)
    # only stale runs: they stand in, marked
    found = bench.match(entries, recs[:2] + recs[3:])
    assert rows_by_table(found)[("t", "iid")]["lora"].status == "stale"
    assert [f.status for f in bench.match(entries, [])] == ["missing"] * 4


def test_readme_markers(tmp_path):
    begin, end = MARK_BEGIN.format(name="s"), MARK_END.format(name="s")
    text = f"intro\n{begin}\nold table\n{end}\noutro\n"
    assert replace_between_markers(text, "s", "NEW") == f"intro\n{begin}\nNEW\n{end}\noutro\n"
    with pytest.raises(ConfigError, match="markers"):
        replace_between_markers("no markers here", "s", "NEW")
    with pytest.raises(ConfigError, match="markers"):
        replace_between_markers(text + text, "s", "NEW")


def test_row_code_names_commits_and_imports():
    row = Row("lora", "stale", records=[_record("lora", 0, 0.7, "k", epoch=store.PRE_PIPELINE) | {"code": {"commit": None}}])
    assert row.code() == "pre-pipeline, code unknown"
    rec = _record("lora", 0, 0.7, "k")
    rec["code"]["dirty"] = True
    assert Row("lora", "current", records=[rec]).code() == "abcdef0+dirty"


# ---- the tiny suite, end to end --------------------------------------------------------------------
def _tiny_copy(tmp_path: Path) -> Path:
    """The tiny suite and a README with its markers, in a scratch copy of the repository layout."""
    shutil.copy(ROOT / "benchmarks/suites/tiny.toml", tmp_path / "tiny.toml")
    begin, end = MARK_BEGIN.format(name="tiny"), MARK_END.format(name="tiny")
    (tmp_path / "README.md").write_text(f"# x\n\nbefore\n{begin}\nold\n{end}\nafter\n")
    return tmp_path / "tiny.toml"


@pytest.fixture
def cached_data(monkeypatch):
    """Every run of a test reads WordNet once (the runs differ in method and seed, not in data)."""
    import functools

    from fedsqueeze import task

    monkeypatch.setattr(task, "load_dataset", functools.lru_cache(maxsize=4)(task.load_dataset))


def test_tiny_suite_end_to_end(tmp_path, monkeypatch, cached_data):
    """Fill (store) → report → README table; a second fill runs nothing; the report rebuilds from the store alone."""
    monkeypatch.chdir(tmp_path)
    suite = bench.load_suite(_tiny_copy(tmp_path))
    assert len(suite.entries) == 5
    done = bench.fill(suite, show_progress=False)
    assert done["failed"] == [] and len(done["ran"]) == 5
    records = store.read_store(suite.store)
    assert len(records) == 5 and all(r["epoch"] == store.RESULTS_EPOCH and r["code"] == bench.code_version() for r in records)
    assert {r["key"] for r in records} == {bench.run_key(e.config) for e in suite.entries}
    for r in records:  # each record is the run's results.json
        assert len(r["results"]["rounds"]) == 1 and all("sim_time_s" in x for x in r["results"]["rounds"])
    again = bench.fill(suite, show_progress=False)
    assert again["ran"] == [] and again["skipped"] == 5

    shutil.rmtree("runs/bench")  # the store alone is enough: the CLI rebuilds report, figures and README table
    from typer.testing import CliRunner

    from fedsqueeze.cli import app

    result = CliRunner().invoke(app, ["bench", "tiny.toml", "--report-only", "--readme", "README.md"])
    assert result.exit_code == 0, result.output
    found = bench.match(suite.entries, store.read_store(suite.store))
    md = Path("runs/report/tiny/report.md").read_text()
    assert "fedsqueeze bench tiny.toml --report-only" in md
    assert str(tmp_path) not in md and "/tmp" not in md
    for e in suite.entries:
        assert e.id in md
    for r in records:
        assert f"{r['results']['final']['accuracy']:.4f}" in md
    figures = [Path("runs/report/tiny/wordnet-iid.png"), Path("runs/report/tiny/wordnet-dropout0.5.png")]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in figures)

    readme = Path("README.md").read_text()
    assert readme.startswith("# x\n\nbefore\n") and readme.endswith("after\n") and "\nold\n" not in readme
    block = render_readme_table(suite, found, "runs/report/tiny/wordnet-iid.png")
    assert block in readme
    finals = {
        (r["entry"]["method"], r["entry"]["seed"]): r["results"]["final"]["accuracy"] for r in records if r["entry"]["setting"] == "iid"
    }
    for m in ("fedavg", "head"):
        iv = stats.interval([finals[m, 0], finals[m, 1]])
        assert f"{iv.mean:.3f} ± {iv.half:.3f} (2 seeds)" in block
    d = stats.interval(
        list(stats.paired_differences({s: finals["head", s] for s in (0, 1)}, {s: finals["fedavg", s] for s in (0, 1)}).values())
    )
    assert stats.claim(d, "fedavg") in block


def test_a_killed_entry_continues_from_its_checkpoint(tmp_path, monkeypatch):
    """A scratch run of the same config left behind is continued (or stored if it finished), not rerun."""
    from fedsqueeze import runners

    monkeypatch.chdir(tmp_path)
    suite = bench.load_suite(_tiny_copy(tmp_path))
    e = suite.entries[0]
    key = bench.run_key(e.config)
    scratch = Path("runs/bench/tiny") / key
    runners.run(dataclasses.replace(e.config, out=str(scratch)), show_progress=False)
    calls = []
    monkeypatch.setattr(runners, "run", lambda *a, **k: calls.append(a) or {})
    done = bench.fill(suite, only=[e.id], show_progress=False)
    assert done["ran"] == [e.id] and calls == []  # finished in scratch: stored without running
    stored = json.loads((suite.store / f"{key}.json").read_text())
    assert stored["results"]["rounds"] == json.loads((scratch / "results.json").read_text())["rounds"]
    with pytest.raises(ConfigError, match="matches no entry"):
        bench.select(suite.entries, ["nope/*"])


def test_import_run_stores_a_stale_stand_in_with_unknown_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    suite = bench.load_suite(_tiny_copy(tmp_path))
    e = next(x for x in suite.entries if x.id == "wordnet/iid/head/s1")
    res = _record("head", 1, 0.42, "unused")["results"]
    res["config"] = {**e.config.to_dict(), "threads": 2}  # made with another setting: not the entry's config
    path = tmp_path / "old.json"
    path.write_text(json.dumps(res))
    stored = bench.import_run(suite, path, e.id, "an old run")
    rec = json.loads(stored.read_text())
    assert rec["epoch"] == store.PRE_PIPELINE and rec["code"] == {"version": None, "commit": None, "dirty": None}
    assert rec["source"] == "an old run" and rec["results"]["config"]["threads"] == 2
    found = {f.entry.id: f for f in bench.match(suite.entries, store.read_store(suite.store))}
    assert found[e.id].status == "stale" and found[e.id].record["key"] == rec["key"]
    assert found["wordnet/iid/head/s0"].status == "missing"
    with pytest.raises(FedsqueezeError, match="not wordnet/iid/fedavg/s1"):
        bench.import_run(suite, path, "wordnet/iid/fedavg/s1", "x")


def test_the_stale_footnote_agrees_in_number():
    from fedsqueeze.report.suite import stale_note

    assert stale_note(["deltamask-exact"]).startswith("† 1 row (deltamask-exact) is a stale stand-in: a run stored under")
    assert "; it is replaced as the suite is filled." in stale_note(["x"])
    two = stale_note(["a", "b"])
    assert two.startswith("† 2 rows (a, b) are stale stand-ins: runs stored under") and two.endswith(
        "; they are replaced as the suite is filled."
    )
