"""Packaging: one version, declared extras, a changelog entry; a wheel built from the tree installs
into a fresh virtual environment and runs (slow: it installs torch and the dependencies)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import fedsqueeze

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_version_has_one_source_and_a_changelog_entry():
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fedsqueeze.__version__"}
    assert f"\n## {fedsqueeze.__version__}\n" in (ROOT / "CHANGELOG.md").read_text()


def test_flower_is_an_extra_and_the_local_runtime_needs_none():
    project = PYPROJECT["project"]
    extras = project["optional-dependencies"]
    assert {"flower", "models", "dev"} <= set(extras)
    core = " ".join(project["dependencies"])
    assert "flwr" not in core and any(d.startswith("flwr[simulation]") for d in extras["flower"])
    # every package the core installs is pinned or bounded the way requirements.txt pins it
    pinned = {line.split("==")[0].split("[")[0] for line in (ROOT / "requirements.txt").read_text().splitlines() if "==" in line}
    named = {d.split("==")[0].split("<")[0].split(">")[0].split("[")[0].strip() for d in project["dependencies"]}
    assert named - {"torch", "xxhash"} <= pinned


@pytest.mark.slow
def test_a_wheel_built_from_the_tree_installs_in_a_fresh_venv_and_runs(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

    def sh(*cmd, cwd=tmp_path, check=True):
        out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, cmd))} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
        return out

    dist = tmp_path / "dist"
    sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, ROOT)
    wheels = list(dist.glob("fedsqueeze-*.whl"))
    assert [w.name for w in wheels] == [f"fedsqueeze-{fedsqueeze.__version__}-py3-none-any.whl"]

    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", venv)
    py = venv / "bin" / "python"
    sh(py, "-m", "pip", "install", "-q", "torch==2.13.0")  # first, pinned: the local CPU build
    sh(py, "-m", "pip", "install", "-q", wheels[0], "-c", ROOT / "constraints.txt")

    info = json.loads(
        sh(
            py, "-c", "import json, fedsqueeze, importlib.metadata as m; print(json.dumps([fedsqueeze.__file__, m.version('fedsqueeze')]))"
        ).stdout
    )
    assert info[0].startswith(str(venv)) and info[1] == fedsqueeze.__version__
    assert sh(py, "-c", "import flwr", check=False).returncode != 0  # the core install has no Flower

    out = tmp_path / "run"
    sh(
        venv / "bin" / "fedsqueeze",
        "run",
        "--model",
        "tiny",
        "--rounds",
        "1",
        "--clients",
        "2",
        "--clients-per-round",
        "2",
        "--train-size",
        "100",
        "--test-size",
        "50",
        "--quiet",
        "--out",
        out,
        "--set",
        "threads=1",
    )
    res = json.loads((out / "results.json").read_text())
    assert len(res["rounds"]) == 1 and res["final"]["total_uplink_bytes"] > 0

    refused = sh(venv / "bin" / "fedsqueeze", "run", "--model", "tiny", "--runtime", "flower-sim", "--out", tmp_path / "sim", check=False)
    assert refused.returncode != 0 and "fedsqueeze[flower]" in refused.stdout + refused.stderr
