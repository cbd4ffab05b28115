"""`fedsqueeze run --runtime flower-sim` (Ray) gives the local runtime's results. Slow: Ray start-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _run(runtime: str, out) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "fedsqueeze",
        "run",
        "--quiet",
        "--runtime",
        runtime,
        "--method",
        "head",
        "--model",
        "tiny",
        "--rounds",
        "2",
        "--set",
        "train_size=400",
        "--set",
        "test_size=200",
        "--out",
        str(out),
    ]
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    subprocess.run(cmd, check=True, timeout=600, env=env)
    return json.loads((out / "results.json").read_text())


def test_flower_sim_cli_matches_local(tmp_path):
    sim, local = _run("flower-sim", tmp_path / "sim"), _run("local", tmp_path / "local")
    assert sim["runtime"] == "flower-sim"
    for a, b in zip(local["rounds"], sim["rounds"], strict=True):
        assert (a["uplink_bytes"], a["downlink_bytes"], a["clients"]) == (b["uplink_bytes"], b["downlink_bytes"], b["clients"])
        assert b["accuracy"] == pytest.approx(a["accuracy"], abs=1e-6)
