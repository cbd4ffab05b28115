"""Reliability: checkpoint and resume, client faults, min_clients, and bad user input (docs/reliability.md)."""

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from fedsqueeze.runners import resume
from fedsqueeze.runtime import run_local
from fedsqueeze.runtime.checkpoint import load_checkpoint
from fedsqueeze.runtime.local import ClientFault, call_with_timeout

SRC = str(Path(__file__).resolve().parent.parent / "src")
# measured times, and the link model built on them, differ from run to run
WALL_CLOCK = {"wall_s", "train_s", "codec_s", "sim_time_s", "sim_slowest_client", "sim_clients"}
# a run whose rounds take a moment, so a kill can land between them
KILL_RUN = dict(
    method="fedavg",
    model="tiny",
    rounds=4,
    clients=4,
    clients_per_round=2,
    train_size=100,
    test_size=50,
    local_steps=2,
    batch_size=4,
    seed=3,
    threads=1,  # the killed run and the reference run in another process: the same float sums
)


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": SRC}


def _cli_args(out: Path) -> list[str]:
    args = ["run", "--quiet", "--out", str(out)]
    for key in ("method", "model", "rounds", "clients", "seed"):
        args += [f"--{key}", str(KILL_RUN[key])]
    for key in ("clients_per_round", "train_size", "test_size", "local_steps", "batch_size", "threads"):
        args += ["--set", f"{key}={KILL_RUN[key]}"]
    return args


def _csv_rows(path: Path) -> int:
    if not path.is_file():
        return 0
    with path.open(newline="") as f:
        return max(0, sum(1 for _ in csv.reader(f)) - 1)


def _without_clock(res: dict) -> dict:
    rounds = [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in res["rounds"]]
    final = {k: v for k, v in res["final"].items() if k not in WALL_CLOCK}
    return {"rounds": rounds, "final": final, "model_params": res["model_params"]}


def test_sigkill_after_round_2_then_resume_equals_uninterrupted(tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedsqueeze", *_cli_args(out)], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 240
    while _csv_rows(out / "rounds.csv") < 2:
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, "the run did not reach round 2 in time"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(out).round
    assert 2 <= killed_at < 4, f"killed after round {killed_at}"
    # results.json may lag the checkpoint by a round (the kill can land between the two writes)
    assert json.loads((out / "results.json").read_text())["rounds"][-1]["round"] in (killed_at - 1, killed_at)

    # the resume and the reference run in this process (the CLI's --resume runs in test_engine and test_user_errors)
    threads = torch.get_num_threads()  # both runs set one thread; later tests get theirs back
    try:
        resume(out, show_progress=False)
        reference = run_local(tiny_config(out=str(tmp_path / "reference"), **KILL_RUN), show_progress=False)
    finally:
        torch.set_num_threads(threads)
    resumed = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3, 4]
    assert _without_clock(resumed) == _without_clock(json.loads(json.dumps(reference)))
    assert {k: v for k, v in resumed["config"].items() if k != "out"} == {k: v for k, v in reference["config"].items() if k != "out"}
    assert _csv_rows(out / "rounds.csv") == 4
    assert load_checkpoint(out).round == 4


def test_resume_of_a_finished_run_changes_nothing(tiny_cfg):
    cfg = tiny_cfg(method="head", rounds=2)
    first = run_local(cfg, show_progress=False)
    again = resume(cfg.out, show_progress=False)
    assert again["rounds"] == json.loads(json.dumps(first["rounds"]))


def test_thirty_percent_of_clients_failing_every_round_still_completes(tiny_cfg):
    cfg = tiny_cfg(
        method="head",
        rounds=4,
        clients=10,
        clients_per_round=10,
        train_size=200,
        fault_raise=0.1,
        fault_hang=0.1,
        fault_garbage=0.1,
        client_timeout=2.0,
        min_clients=1,
        min_clients_policy="retry",
    )
    res = run_local(cfg, show_progress=False)
    assert [r["round"] for r in res["rounds"]] == [1, 2, 3, 4]
    reasons = [d["reason"] for r in res["rounds"] for d in r["dropped"]]
    assert any("crashed" in x for x in reasons)
    assert any("timeout" in x for x in reasons)
    assert any("bad payload" in x for x in reasons)
    assert len(reasons) >= 6  # about 12 of the 40 client-rounds fail with these probabilities
    for r in res["rounds"]:
        assert r["clients_aggregated"] >= 1 and not r["skipped"]


def test_min_clients_skip_keeps_the_model_and_retry_resamples(tiny_cfg):
    common = dict(method="head", rounds=2, clients=6, clients_per_round=3, fault_raise=0.8, min_clients=3)
    skipped = run_local(tiny_cfg(min_clients_policy="skip", **common), show_progress=False)
    assert all(r["skipped"] and r["clients_aggregated"] == 0 for r in skipped["rounds"])
    assert skipped["rounds"][0]["accuracy"] == skipped["rounds"][1]["accuracy"]  # no update applied
    retried = run_local(tiny_cfg(min_clients_policy="retry", max_retries=2, **common), show_progress=False)
    for r in retried["rounds"]:
        assert r["attempts"] == 3 and r["clients"] == 9  # every attempt's messages are counted
        assert any(d.get("attempt") == 2 for d in r["dropped"])


def test_stragglers_past_the_deadline_are_dropped(tiny_cfg):
    res = run_local(
        tiny_cfg(method="head", rounds=2, clients=6, clients_per_round=4, straggler=0.5, straggler_delay=100.0, deadline=50.0),
        show_progress=False,
    )
    late = [d for r in res["rounds"] for d in r["dropped"]]
    assert late and all("straggler" in d["reason"] and "50s deadline" in d["reason"] for d in late)
    for r in res["rounds"]:
        assert r["clients_uploaded"] == 4 and r["clients_aggregated"] == 4 - len(r["dropped"])


def test_call_with_timeout_abandons_a_hung_client():
    seen = threading.Event()

    def hang(abandon):
        abandon.wait()
        seen.set()
        raise RuntimeError("left")

    t0 = time.monotonic()
    with pytest.raises(ClientFault, match="timeout"):
        call_with_timeout(hang, 0.2, "test-hang")
    assert time.monotonic() - t0 < 5 and seen.wait(5)  # the abandoned worker was told to leave, and did
    assert call_with_timeout(lambda abandon: 42, 5, "test-ok") == 42
    with pytest.raises(ValueError):
        call_with_timeout(lambda abandon: int("x"), 5, "test-raise")


BAD_INPUT = [
    # (argv, words the message must contain)
    (["run", "--method", "nosuch"], ["unknown method", "fedavg", "head"]),
    (
        [
            "run",
            "--model",
            "tiny",
            "--set",
            "uplink_codec=nosuch",
            "--set",
            "train_size=50",
            "--set",
            "test_size=20",
            "--out",
            "{tmp}/codec",
        ],
        ["uplink_codec", "raw", "one of"],
    ),
    (["run", "--dataset", "nosuch"], ["unknown dataset", "wordnet", "fashion-mnist", "hf:"]),
    (["run", "--runtime", "nosuch"], ["runtime", "one of: local, flower-sim, flower"]),
    (["run", "--set", "server_lrr=2"], ["server_lr", "did you mean"]),
    (["run", "--config", "{tmp}/typo.toml"], ["roundz", "did you mean 'rounds'"]),
    (["run", "--model", "/no/such/model/dir"], ["/no/such/model/dir", "minilm", "tiny"]),
    (["run", "--set", "rounds=abc"], ["rounds", "must be an integer"]),
    (["run", "--set", "min_clients_policy=sometimes"], ["retry", "skip"]),
    (["run", "--set", "fault_hang=0.2"], ["client_timeout"]),
    (["run", "--resume", "{tmp}/not-a-run"], ["config.toml", "--out"]),
    (["run", "--resume", "{tmp}", "--rounds", "3"], ["--resume", "--rounds"]),
]


def _drive(cases):
    p = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "cli_driver.py"), json.dumps(cases)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def bad_input(tmp_path_factory):
    """Every BAD_INPUT case, then a run on a machine without the wordnet package, in one driver process."""
    tmp = tmp_path_factory.mktemp("bad-input")
    (tmp / "typo.toml").write_text('roundz = 3\nmodel = "tiny"\n')
    cases = [[a.replace("{tmp}", str(tmp)) for a in argv] for argv, _ in BAD_INPUT]
    *results, missing = _drive([*cases, {"argv": ["run", "--model", "tiny", "--out", str(tmp / "run")], "missing_wordnet": True}])
    return results, missing


def test_bad_user_input_is_one_clear_message_and_exit_2(bad_input):
    for (argv, words), res in zip(BAD_INPUT, bad_input[0], strict=True):
        assert res["code"] == 2, (argv, res)
        assert "Traceback" not in res["stderr"], (argv, res["stderr"])
        flat = " ".join(res["stderr"].split())
        for word in words:
            assert word in flat, (argv, word, flat)


def test_missing_debian_dataset_names_the_package(bad_input):
    res = bad_input[1]
    flat = " ".join(res["stderr"].split())
    assert res["code"] == 2 and "Traceback" not in flat
    assert "apt-get install -y wordnet-base" in flat
