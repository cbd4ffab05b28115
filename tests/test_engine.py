"""One round engine under every runtime: the same config gives the same round records locally and on
Flower (faults included), a killed Flower run resumes to the uninterrupted result, and every run
setting is honoured by every runtime or rejected up front.

The two Flower properties share one pair of Ray runs (Ray's start-up is most of their cost): a
flower-sim run under every fault, SIGKILLed after its first checkpoint and resumed, must give the
round records of the same config run uninterrupted on the local runtime."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch

from fedsqueeze.config import RunConfig
from fedsqueeze.errors import ConfigError
from fedsqueeze.results import summarize
from fedsqueeze.runtime.checkpoint import load_checkpoint
from fedsqueeze.runtime.support import FIELD_SUPPORT, RUNTIMES, check_runtime

SRC = str(Path(__file__).resolve().parents[1] / "src")

# every fault the engine knows, on at once: the seed below makes each of them happen at least once
FAULTS = dict(
    seed=6,
    dropout=0.15,
    fault_raise=0.1,
    fault_garbage=0.1,
    fault_hang=0.1,
    # each injected hang costs this long; an honest flower-sim round takes ~0.2 s, but its replies may queue
    # behind a hung client's actor (busy HANG_GRACE_S = 5 s more) on a loaded machine: keep a wide margin
    client_timeout=10.0,
    fault_corrupt=0.1,
    straggler=0.2,
    deadline=30.0,
    min_clients=2,
    min_clients_policy="retry",
)
TASK = dict(model="tiny", clients=4, clients_per_round=3, rounds=4, train_size=200, test_size=100, local_steps=3, batch_size=8, threads=1)
SAME = (
    "round",
    "accuracy",
    "loss",
    "uplink_bytes",
    "downlink_bytes",
    "uplink_bpp",
    "downlink_bpp",
    "clients",
    "clients_uploaded",
    "clients_aggregated",
    "dropped",
    "attempts",
    "skipped",
)


def _cli_args(values: dict) -> list[str]:
    return [a for k, v in values.items() for a in ("--set", f"{k}={json.dumps(v) if isinstance(v, str) else v}")]


def _env(tmp: Path) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TMPDIR": str(tmp),
        "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
    }


def _run_cmd(runtime: str, method: str, out: Path, extra: dict) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fedsqueeze",
        "run",
        "--quiet",
        "--runtime",
        runtime,
        "--method",
        method,
        "--out",
        str(out),
        *_cli_args({**TASK, **extra}),
    ]


def _kill_leftovers(tmp: Path) -> None:
    """Stop every process of the run (Ray's own included) that outlived it, by PID."""
    for proc in psutil.process_iter(["cmdline", "environ"]):
        try:
            if str(tmp) in " ".join(proc.info["cmdline"] or []) or (proc.info["environ"] or {}).get("TMPDIR") == str(tmp):
                if proc.pid != os.getpid():
                    proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _same_records(a: dict, b: dict) -> None:
    assert len(a["rounds"]) == len(b["rounds"])
    for ra, rb in zip(a["rounds"], b["rounds"]):
        for key in SAME:
            assert ra[key] == rb[key], (ra["round"], key, ra[key], rb[key])


@pytest.fixture(scope="module")
def faulty_runs(tmp_path_factory) -> dict:
    """topk under every fault: on flower-sim, SIGKILLed after its first checkpoint, then resumed; and locally, whole.

    topk keeps error-feedback memory on every client, so the resumed nodes must get their states back.
    The local run is the reference, built in this process from the same settings as the CLI runs.
    """
    from fedsqueeze.runtime import run_local

    ray_tmp = Path(tempfile.mkdtemp(prefix="fsq-", dir="/tmp"))  # Ray's socket paths must stay short
    env, out = _env(ray_tmp), tmp_path_factory.mktemp("engine") / "killed"
    try:
        proc = subprocess.Popen(
            _run_cmd("flower-sim", "topk", out, FAULTS),
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and proc.poll() is None:
                ckpt = load_checkpoint(out) if (out / "checkpoint").is_file() else None
                if ckpt is not None and ckpt.round >= 1:
                    break
                time.sleep(0.05)
            ended_early = proc.poll() is not None
            if not ended_early:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            _kill_leftovers(ray_tmp)
        killed_at = load_checkpoint(out).round if (out / "checkpoint").is_file() else 0
        try:
            done = subprocess.run(
                [sys.executable, "-m", "fedsqueeze", "run", "--quiet", "--resume", str(out)],
                env=env,
                timeout=400,
                capture_output=True,
                text=True,
            )
        finally:
            _kill_leftovers(ray_tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    threads = torch.get_num_threads()  # the local run sets one thread; later tests get theirs back
    try:
        cfg = RunConfig(method="topk", out=str(out.parent / "whole"), **TASK, **FAULTS).validate()
        local = json.loads(json.dumps(run_local(cfg, show_progress=False)))
    finally:
        torch.set_num_threads(threads)
    sim = _results(out) if done.returncode == 0 else None
    return {"out": out, "ended_early": ended_early, "killed_at": killed_at, "resume": done, "sim": sim, "local": local}


def test_local_and_flower_sim_give_identical_round_records_under_faults(faulty_runs):
    """Dropout, crash, hang (timeout), garbage, corruption and stragglers, with retries: same records."""
    done, sim, local = faulty_runs["resume"], faulty_runs["sim"], faulty_runs["local"]
    assert done.returncode == 0, done.stderr[-3000:]
    assert (sim["runtime"], local["runtime"]) == ("flower-sim", "local")
    assert {k: v for k, v in sim["config"].items() if k not in ("out", "runtime")} == {
        k: v for k, v in local["config"].items() if k not in ("out", "runtime")
    }
    _same_records(local, sim)
    reasons = " | ".join(d["reason"] for r in local["rounds"] for d in r["dropped"])
    for kind in (
        "dropout: no reply",
        "injected fault: the client crashed",
        f"timeout: no reply within client_timeout={FAULTS['client_timeout']:g}s",
        "bad payload",
        "straggler: reply 60s late",
    ):
        assert kind in reasons, f"the seeded faults never produced {kind!r}: pick another seed"
    assert any(r["attempts"] > 1 for r in local["rounds"]), "no round was retried"
    assert any(r["clients_aggregated"] > 0 for r in local["rounds"]), "no round trained"


def test_killed_flower_sim_run_resumes_to_the_uninterrupted_result(faulty_runs):
    """SIGKILL a Flower simulation after its first checkpoint; --resume ends where an uninterrupted run does."""
    done, out = faulty_runs["resume"], faulty_runs["out"]
    assert not faulty_runs["ended_early"], "the run ended before it could be killed"
    assert 1 <= faulty_runs["killed_at"] < TASK["rounds"]
    assert done.returncode == 0, done.stderr[-3000:]
    resumed, whole = faulty_runs["sim"], faulty_runs["local"]
    assert resumed["runtime"] == "flower-sim"
    _same_records(whole, resumed)
    # a round after the kill trained on state the resumed nodes got back
    assert any(r["round"] > faulty_runs["killed_at"] and r["clients_aggregated"] > 0 for r in resumed["rounds"])
    assert any(p.name.startswith("client-") for p in (out / "client-state").rglob("*.tree"))


def test_every_run_field_is_classified_and_honoured_by_every_runtime_at_its_defaults():
    names = {f.name for f in dataclasses.fields(RunConfig)}
    assert set(FIELD_SUPPORT) == names
    for runtime in RUNTIMES:
        check_runtime(RunConfig(runtime=runtime))


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("name", sorted(f.name for f in dataclasses.fields(RunConfig) if f.name != "runtime"))
def test_a_field_a_runtime_does_not_honour_is_rejected_naming_the_runtime(name, runtime):
    """Take ``runtime`` away from ``name``'s runtimes: a non-default value is refused, the default is not."""
    support = {**FIELD_SUPPORT, name: FIELD_SUPPORT[name] - {runtime}}
    default = getattr(RunConfig(), name)
    changed = {
        "options": {"x": 1},
        "method": "head",
        "model": "tiny",
        "dataset": "fashion-mnist",
        "out": "elsewhere",
        "partition": "dirichlet",
        "min_clients_policy": "retry",
        "text_column": "t",
        "label_column": "l",
        "checkpoint": not default,
    }.get(name)
    if changed is None and isinstance(default, str):
        changed = default + "x"  # any other string (check_runtime compares with the default, not the choices)
    if changed is None:
        changed = default + 1 if not isinstance(default, float) else default + 0.5
        if name.startswith(("fault_", "dropout", "straggler")) and name != "straggler_delay":
            changed = 0.1
    cfg = dataclasses.replace(RunConfig(runtime=runtime, clients_per_round=5), **{name: changed})
    check_runtime(dataclasses.replace(RunConfig(runtime=runtime)), support)  # defaults pass
    with pytest.raises(ConfigError, match=f"--runtime {runtime} does not honour {name}="):
        check_runtime(cfg, support)


def test_unknown_runtime_is_a_config_error_before_anything_loads():
    with pytest.raises(ConfigError, match="unknown runtime 'ray'.*local, flower-sim, flower"):
        check_runtime(RunConfig(runtime="ray"))


def test_compare_runs_every_method_on_the_configured_runtime(tmp_path, monkeypatch):
    import fedsqueeze.runners as runners

    seen: list[tuple[str, str]] = []

    def fake_run(cfg, show_progress=True, **kwargs):
        seen.append((cfg.method, cfg.runtime))
        rounds = [
            {
                "round": 1,
                "accuracy": 0.5,
                "loss": 1.0,
                "uplink_bytes": 10,
                "downlink_bytes": 10,
                "uplink_bpp": 1.0,
                "downlink_bpp": 1.0,
                "clients": 1,
                "clients_uploaded": 1,
                "clients_aggregated": 1,
                "wall_s": 1.0,
                "train_s": 1.0,
                "codec_s": 0.0,
            }
        ]
        return {
            "method": cfg.method,
            "config": cfg.to_dict(),
            "model_params": 100,
            "trainable_params": 10,
            "runtime": cfg.runtime,
            "rounds": rounds,
            "final": summarize(rounds),
        }

    monkeypatch.setattr(runners, "run", fake_run)
    runners.run_compare(RunConfig(model="tiny", runtime="flower-sim"), ["fedavg", "head"], tmp_path, show_progress=False)
    assert seen == [("fedavg", "flower-sim"), ("head", "flower-sim")]


def test_a_fresh_run_never_overwrites_an_earlier_runs_results(tmp_path):
    from fedsqueeze.runners import run

    cfg = RunConfig(
        model="tiny",
        method="head",
        clients=2,
        clients_per_round=2,
        rounds=1,
        train_size=40,
        test_size=20,
        local_steps=1,
        batch_size=8,
        out=str(tmp_path / "run"),
    )
    first = run(cfg, show_progress=False)
    before = (tmp_path / "run" / "results.json").read_bytes()
    with pytest.raises(ConfigError, match=r"already holds a run \(results.json, checkpoint\).*--resume.*--overwrite"):
        run(dataclasses.replace(cfg, seed=1), show_progress=False)
    assert (tmp_path / "run" / "results.json").read_bytes() == before  # untouched
    again = run(dataclasses.replace(cfg, seed=1, overwrite=True), show_progress=False)
    assert again["config"]["seed"] == 1 and first["config"]["seed"] == 0
    assert json.loads((tmp_path / "run" / "results.json").read_text())["config"]["seed"] == 1
