import json
import os
import subprocess
import sys


def _cli(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.path.join(os.path.dirname(__file__), "..", "src")}
    return subprocess.run([sys.executable, "-m", "fedsqueeze", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_run_from_cli(tmp_path):
    out = tmp_path / "r"
    p = _cli(
        "run",
        "--method",
        "fedavg",
        "--model",
        "tiny",
        "--rounds",
        "2",
        "--clients",
        "4",
        "--clients-per-round",
        "2",
        "--out",
        str(out),
        "--set",
        "train_size=100",
        "--set",
        "test_size=50",
    )
    assert p.returncode == 0, p.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["train_size"] == 100 and len(res["rounds"]) == 2


def test_unknown_method_exits_2_with_choices():
    p = _cli("run", "--method", "nosuch")
    assert p.returncode == 2
    assert "fedavg" in p.stderr and "Traceback" not in p.stderr


def test_typo_option_exits_2():
    p = _cli("run", "--method", "fedavg", "--model", "tiny", "--set", "server_lrr=1")
    assert p.returncode == 2 and "server_lr" in p.stderr and "Traceback" not in p.stderr


def test_methods_lists_methods_and_codecs():
    p = _cli("methods")
    assert p.returncode == 0
    assert "fedavg" in p.stdout and "head" in p.stdout and "raw" in p.stdout
