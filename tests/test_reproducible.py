"""The same config gives bit-identical round records in two separate processes.

Each method runs in two separate processes (``tests/cli_driver.py``, the CLI's ``main`` in a fresh
interpreter), so nothing of one (torch's global RNG state, a warmed cache) reaches the other; the two
processes run the methods in opposite orders, so neither may a run before it in the same process.
Before issue 15, ``lora``'s and ``adapter``'s initial tuner values drew from torch's unseeded global
generator and the two processes' losses differed in the fifth digit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# everything a round record holds that does not measure time
SAME = ("round", "accuracy", "loss", "train_loss", "uplink_bytes", "downlink_bytes", "clients", "clients_uploaded", "clients_aggregated")
TASK = ("--model", "tiny", "--clients", "4", "--clients-per-round", "2", "--rounds", "2")
SETS = ("train_size=200", "test_size=100", "local_steps=3", "batch_size=8", "seed=3")


def _run(method: str, out: Path, runtime: str = "local", env_extra: dict[str, str] | None = None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent / "src")}
    p = subprocess.run(
        [*_cmd(method, runtime), "--out", str(out)], capture_output=True, text=True, env={**env, **(env_extra or {})}, timeout=400
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def _cmd(method: str, runtime: str = "local") -> list[str]:
    sets = [a for s in (*SETS, "threads=1") for a in ("--set", s)]
    return [sys.executable, "-m", "fedsqueeze", "run", "--quiet", "--runtime", runtime, "--method", method, *TASK, *sets]


METHODS = ["lora", "adapter"]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> dict[str, tuple[dict, dict]]:
    """Each method run in two driver processes, in opposite orders: method -> (its run in A, its run in B).

    Process A runs lora then adapter, process B adapter then lora, so a run also may not depend on what
    ran before it in the same process (torch's global RNG, a warmed cache); one start-up per process.
    """
    root = tmp_path_factory.mktemp("repro")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent / "src")}
    for name, order in (("a", METHODS), ("b", METHODS[::-1])):
        cases = [[*_cmd(m)[3:], "--out", str(root / name / m)] for m in order]  # the argv after `python -m fedsqueeze`
        p = subprocess.run(
            [sys.executable, str(Path(__file__).parent / "cli_driver.py"), json.dumps(cases)],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert p.returncode == 0, p.stderr[-3000:]
        for m, res in zip(order, json.loads(p.stdout.strip().splitlines()[-1])):
            assert res["code"] == 0, (m, res["stderr"][-3000:])
    read = lambda name, m: json.loads((root / name / m / "results.json").read_text())  # noqa: E731
    return {m: (read("a", m), read("b", m)) for m in METHODS}


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_give_bit_identical_round_records(two_processes, method):
    a, b = two_processes[method]
    assert a["method"] == b["method"] == method
    assert len(a["rounds"]) == len(b["rounds"]) == 2
    for ra, rb in zip(a["rounds"], b["rounds"]):
        for key in SAME:
            assert ra[key] == rb[key], (method, ra["round"], key, ra[key], rb[key])
    assert a["final"]["accuracy"] == b["final"]["accuracy"]


def test_tuner_init_is_seeded_and_leaves_the_global_rng_alone():
    """In one process: the tuner's initial values follow the run seed, and torch's global stream is not advanced."""
    import torch
    from conftest import tiny_config

    from fedsqueeze.runtime import prepare

    def initial(method: str, seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(1234)
        expected = torch.rand(3)
        torch.manual_seed(1234)
        m, _ = prepare(tiny_config(method=method, seed=seed))
        assert torch.equal(torch.rand(3), expected), "building the run advanced torch's global RNG"
        return {n: p.detach().clone() for n, p in m.named.items()}

    for method in ("lora", "adapter"):
        first, again, other = initial(method, 0), initial(method, 0), initial(method, 1)
        assert first.keys() == again.keys()
        assert all(torch.equal(first[n], again[n]) for n in first)
        assert any(not torch.equal(first[n], other[n]) for n in first if "head" not in n)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_local_and_flower_sim_give_bit_identical_round_records(tmp_path, method):
    """Slow (Ray start-up): the tuner init and every draw are the same on Flower's simulation engine."""
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="fsq-", dir="/tmp")  # Ray's socket paths must stay short
    sim = _run(method, tmp_path / "sim", "flower-sim", {"TMPDIR": ray_tmp})
    local = _run(method, tmp_path / "local")
    assert sim["runtime"] == "flower-sim"
    for ra, rb in zip(local["rounds"], sim["rounds"], strict=True):
        for key in SAME:
            assert ra[key] == rb[key], (method, ra["round"], key, ra[key], rb[key])
