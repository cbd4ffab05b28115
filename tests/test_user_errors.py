"""Every user-facing failure is one clean line and exit 2, never a traceback (issue 15, item 7).

Each case runs the real CLI (``python -m fedsqueeze run ...``) the way a user would hit it.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SRC = str(Path(__file__).parent.parent / "src")
TINY = ("--model", "tiny", "--clients", "4", "--clients-per-round", "2", "--rounds", "1", "--quiet")
SMALL = ("--set", "train_size=40", "--set", "test_size=20", "--set", "local_steps=1")


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-m", "fedsqueeze", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def _clean_error(p: subprocess.CompletedProcess, *needles: str) -> str:
    """The one error line of a run that must have failed cleanly; it contains every needle."""
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr and len(lines) == 1, p.stderr[-3000:]
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ---- --out ------------------------------------------------------------------------------------


def _cli_here(capsys, *args: str) -> tuple[int, str]:
    """``fedsqueeze ...`` in this process (no interpreter start-up); its exit code and stderr."""
    from fedsqueeze.cli import main

    argv = sys.argv
    sys.argv = ["fedsqueeze", *args]
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.argv = argv
    return code, capsys.readouterr().err


@pytest.mark.parametrize("runtime", ["local", "flower"])
def test_a_run_into_an_earlier_runs_out_leaves_its_files_untouched(tmp_path, capsys, runtime):
    """Before: `run --runtime flower` deleted OUT/results.json before it started, and a fresh local run
    rewrote config.toml and emptied rounds.csv at once."""
    out = tmp_path / "run"
    code, err = _cli_here(capsys, "run", *TINY, *SMALL, "--method", "head", "--out", str(out))
    assert code == 0, err
    files = {name: (out / name).read_bytes() for name in ("results.json", "config.toml", "rounds.csv", "checkpoint")}
    again = ["run", *TINY, *SMALL, "--method", "head", "--seed", "1", "--out", str(out), "--runtime", runtime]
    if runtime == "flower":  # no SuperLink listens there: the refusal must come before any connection
        again += ["--insecure", "--superlink", "127.0.0.1:9"]
    code, err = _cli_here(capsys, *again)
    assert code == 2 and "already holds a run" in err and "--overwrite" in err, err
    assert {name: (out / name).read_bytes() for name in files} == files


def test_out_is_a_file(tmp_path):
    (tmp_path / "afile").write_text("not a directory")
    _clean_error(_cli("run", *TINY, *SMALL, "--out", str(tmp_path / "afile")), "afile")


def test_out_below_a_file(tmp_path):
    (tmp_path / "afile").write_text("not a directory")
    _clean_error(_cli("run", *TINY, *SMALL, "--out", str(tmp_path / "afile" / "run")), "Not a directory", "afile")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write into any directory")
def test_out_in_an_unwritable_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        _clean_error(_cli("run", *TINY, *SMALL, "--out", str(locked / "run")), "Permission denied")
    finally:
        locked.chmod(0o755)


def test_disk_full_is_one_line(tmp_path, monkeypatch, capsys):
    """ENOSPC while writing a result (in-process, as no real disk can be filled here): one line, exit 2."""
    from fedsqueeze import cli
    from fedsqueeze.runtime import engine

    def full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(engine, "atomic_write_text", full)
    monkeypatch.setattr(sys, "argv", ["fedsqueeze", "run", *TINY, *SMALL, "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: No space left on device: ") and "config.toml" in lines[0], lines


# ---- config files and values ------------------------------------------------------------------


def test_config_file_not_utf8(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b'method = "fedavg"\nnote = "\xff\xfe"\n')
    _clean_error(_cli("run", "--config", str(bad), "--out", str(tmp_path / "run")), "bad.toml", "not UTF-8")


def test_config_file_options_not_a_table(tmp_path):
    cfg = tmp_path / "opt.toml"
    cfg.write_text("options = 5\n")
    _clean_error(_cli("run", "--config", str(cfg), "--out", str(tmp_path / "run")), "[options] in the config file must be a table; got 5")


def test_method_name_with_markup_is_printed_verbatim(tmp_path):
    _clean_error(_cli("run", "--method", "x[/]", "--out", str(tmp_path / "run")), "unknown method 'x[/]'")


@pytest.mark.parametrize(
    ("setting", "needle"),
    [
        ("test_size=0", "option 'test_size' of the run must be >= 1; got 0"),
        ("eval_batch_size=0", "option 'eval_batch_size' of the run must be >= 1; got 0"),
        ("max_length=0", "option 'max_length' of the run must be >= 1; got 0"),
        ("client_timeout=nan", "option 'client_timeout' of the run must be a finite number; got nan"),
        ("local_epochs=inf", "option 'local_epochs' of the run must be a finite number; got inf"),
        ("server_lr=nan", "option 'server_lr' of method 'fedavg' must be a finite number; got nan"),
        ("uplink_mbps=inf", "option 'uplink_mbps' of the run must be a finite number"),
    ],
)
def test_bad_values_through_set(tmp_path, setting, needle):
    _clean_error(_cli("run", *TINY, "--set", setting, "--out", str(tmp_path / "run")), needle)


def test_non_finite_values_in_a_toml_file(tmp_path):
    cfg = tmp_path / "nan.toml"
    cfg.write_text("model = 'tiny'\nlocal_epochs = inf\n[options]\nserver_lr = nan\n")
    _clean_error(_cli("run", "--config", str(cfg), "--out", str(tmp_path / "run")), "local_epochs", "finite")


# ---- checkpoints with a valid frame and wrong contents ----------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-round tiny fedavg run's OUT (config.toml, checkpoint after round 2)."""
    from conftest import tiny_config

    from fedsqueeze.runtime import run_local

    out = tmp_path_factory.mktemp("ckpt") / "run"
    run_local(tiny_config(rounds=2, train_size=40, test_size=20, local_steps=1, out=str(out)), False)
    return out


def _tampered(finished_run: Path, tmp_path: Path, change) -> Path:
    """A copy of the run's OUT whose checkpoint (rolled back to round 1) is re-encoded after ``change(tree)``."""
    import shutil

    from fedsqueeze.runtime.checkpoint import CHECKPOINT_FILE, decode_checkpoint, encode_checkpoint
    from fedsqueeze.treeio import pack_tree, unpack_tree

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    ck = decode_checkpoint((out / CHECKPOINT_FILE).read_bytes())
    data = encode_checkpoint(
        config=ck.config,
        round_=1,
        server_state=ck.server_state,
        client_states=ck.client_states,
        rounds=ck.rounds[:1],
        state_versions={c: v for c, v in ck.state_versions.items() if v[0] <= 1},
    )
    tree = unpack_tree(data)
    change(tree)
    (out / CHECKPOINT_FILE).write_bytes(pack_tree(tree))
    return out


def _weights(tree) -> dict:
    return tree["server_state"]["weights"]


def test_checkpoint_round_beyond_rounds(finished_run, tmp_path):
    import json

    def beyond(tree):
        record = json.loads(tree["rounds_json"].tobytes())[0]
        tree["round"] = 5
        tree["rounds_json"] = np.frombuffer(json.dumps([{**record, "round": r} for r in range(1, 6)]).encode(), dtype=np.uint8)

    out = _tampered(finished_run, tmp_path, beyond)
    _clean_error(_cli("run", "--resume", str(out)), "round 5, beyond the run's rounds=2", "without --resume")


def test_checkpoint_missing_server_state(finished_run, tmp_path):
    out = _tampered(finished_run, tmp_path, lambda tree: tree.pop("server_state"))
    _clean_error(_cli("run", "--resume", str(out)), "lacks server_state")


def test_checkpoint_server_state_missing_a_tensor(finished_run, tmp_path):
    out = _tampered(finished_run, tmp_path, lambda tree: _weights(tree).pop(sorted(_weights(tree))[0]))
    _clean_error(_cli("run", "--resume", str(out)), "server state['weights'] has the wrong keys", "without --resume")


def test_checkpoint_server_state_of_the_wrong_shape(finished_run, tmp_path):
    def reshape(tree):
        name = sorted(_weights(tree))[0]
        _weights(tree)[name] = _weights(tree)[name].ravel()[:-1].copy()

    out = _tampered(finished_run, tmp_path, reshape)
    _clean_error(_cli("run", "--resume", str(out)), "server state['weights']", "expected float32")


def test_checkpoint_server_state_of_the_wrong_dtype(finished_run, tmp_path):
    def retype(tree):
        name = sorted(_weights(tree))[0]
        _weights(tree)[name] = _weights(tree)[name].astype(np.float64)

    out = _tampered(finished_run, tmp_path, retype)
    _clean_error(_cli("run", "--resume", str(out)), "is float64", "expected float32")


def test_checkpoint_state_of_a_client_outside_the_run(finished_run, tmp_path):
    def stray(tree):
        tree["client_states"][99] = None

    out = _tampered(finished_run, tmp_path, stray)
    _clean_error(_cli("run", "--resume", str(out)), "clients [99]")


def test_untampered_checkpoint_still_resumes(finished_run, tmp_path):
    out = _tampered(finished_run, tmp_path, lambda tree: None)
    p = _cli("run", "--resume", str(out), "--quiet")
    assert p.returncode == 0, p.stderr[-3000:]


def test_check_state_like_accepts_what_grows_and_rejects_what_changed():
    from fedsqueeze.errors import PayloadError
    from fedsqueeze.runtime.engine import check_state_like

    fresh = {"w": np.zeros((2, 3), np.float32), "history": [], "warm": {}, "levels": 16, "opt": None, "pair": [1.0, "x"]}
    grown = {**fresh, "history": [{"s": np.ones(3)}], "warm": {"h": np.ones(2)}, "levels": 20, "opt": np.ones(4), "pair": [2.5, "y"]}
    check_state_like(grown, fresh)
    for bad, needle in [
        ({**fresh, "w": np.zeros((3, 2), np.float32)}, "float32[3, 2], expected float32[2, 3]"),
        ({**fresh, "w": np.zeros((2, 3), np.float64)}, "float64"),
        ({**fresh, "w": [0.0] * 6}, "not an array"),
        ({k: v for k, v in fresh.items() if k != "w"}, "missing ['w']"),
        ({**fresh, "extra": 1}, "unexpected ['extra']"),
        ({**fresh, "levels": 1.5}, "expected int"),
        ({**fresh, "levels": True}, "expected int"),
        ({**fresh, "history": {}}, "not a list"),
        ({**fresh, "pair": [1.0]}, "has 1 entries, expected 2"),
        ({**fresh, "pair": ["1", "x"]}, "expected float"),
        ([fresh], "not a dict"),
    ]:
        with pytest.raises(PayloadError, match=r"^server state") as exc:
            check_state_like(bad, fresh, "server state")
        assert needle in str(exc.value), (needle, str(exc.value))
