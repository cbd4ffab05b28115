"""Every user-facing failure is one clean line and exit 2, never a traceback (issue 15, item 7).

Each case runs the real CLI entry (``fedsqueeze.cli.main``) the way a user would hit it. The cases
run together in one ``tests/cli_driver.py`` process (one interpreter start-up instead of one per
case), which records exactly what each case wrote to file descriptor 2 and its exit code; one case
goes through ``python -m fedsqueeze`` itself, so the real process's exit status and stderr are pinned too.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SRC = str(Path(__file__).parent.parent / "src")
TINY = ("--model", "tiny", "--clients", "4", "--clients-per-round", "2", "--rounds", "1", "--quiet")
SMALL = ("--set", "train_size=40", "--set", "test_size=20", "--set", "local_steps=1")
ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": SRC}


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **ENV}
    return subprocess.run([sys.executable, "-m", "fedsqueeze", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def _drive(cases: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    """Every case's ``fedsqueeze ARGV`` in one driver process: name -> (exit code, stderr) of that case."""
    names = list(cases)
    p = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "cli_driver.py"), json.dumps([cases[n] for n in names])],
        env={**os.environ, **ENV},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    runs = json.loads(p.stdout.strip().splitlines()[-1])
    return {n: subprocess.CompletedProcess(r["argv"], r["code"], "", r["stderr"]) for n, r in zip(names, runs)}


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


# ---- the failing cases, set up and run together ------------------------------------------------

BAD_VALUES = [
    ("test_size=0", "option 'test_size' of the run must be >= 1; got 0"),
    ("eval_batch_size=0", "option 'eval_batch_size' of the run must be >= 1; got 0"),
    ("max_length=0", "option 'max_length' of the run must be >= 1; got 0"),
    ("client_timeout=nan", "option 'client_timeout' of the run must be a finite number; got nan"),
    ("local_epochs=inf", "option 'local_epochs' of the run must be a finite number; got inf"),
    ("server_lr=nan", "option 'server_lr' of method 'fedavg' must be a finite number; got nan"),
    ("uplink_mbps=inf", "option 'uplink_mbps' of the run must be a finite number"),
]
UNWRITABLE = not hasattr(os, "geteuid") or os.geteuid() == 0


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-round tiny fedavg run's OUT (config.toml, checkpoint after round 2)."""
    from conftest import tiny_config

    from fedsqueeze.runtime import run_local

    out = tmp_path_factory.mktemp("ckpt") / "run"
    run_local(tiny_config(rounds=2, train_size=40, test_size=20, local_steps=1, out=str(out)), False)
    return out


def _tampered(finished_run: Path, where: Path, change) -> Path:
    """A copy of the run's OUT whose checkpoint (rolled back to round 1) is re-encoded after ``change(tree)``."""
    from fedsqueeze.runtime.checkpoint import CHECKPOINT_FILE, decode_checkpoint, encode_checkpoint
    from fedsqueeze.treeio import pack_tree, unpack_tree

    out = where / "run"
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


def _first_weight(tree) -> str:
    return sorted(_weights(tree))[0]


def _beyond(tree) -> None:
    record = json.loads(tree["rounds_json"].tobytes())[0]
    tree["round"] = 5
    tree["rounds_json"] = np.frombuffer(json.dumps([{**record, "round": r} for r in range(1, 6)]).encode(), dtype=np.uint8)


def _reshape(tree) -> None:
    _weights(tree)[_first_weight(tree)] = _weights(tree)[_first_weight(tree)].ravel()[:-1].copy()


def _retype(tree) -> None:
    _weights(tree)[_first_weight(tree)] = _weights(tree)[_first_weight(tree)].astype(np.float64)


def _stray(tree) -> None:
    tree["client_states"][99] = None


TAMPER = {
    "beyond": _beyond,
    "no_server_state": lambda tree: tree.pop("server_state"),
    "missing_tensor": lambda tree: _weights(tree).pop(_first_weight(tree)),
    "wrong_shape": _reshape,
    "wrong_dtype": _retype,
    "stray_client": _stray,
    "untampered": lambda tree: None,
}


@pytest.fixture(scope="module")
def driven(tmp_path_factory, finished_run) -> dict[str, subprocess.CompletedProcess]:
    """Every case below, each with files of its own, run by one driver process."""
    root = tmp_path_factory.mktemp("cases")

    def where(name: str) -> Path:
        (root / name).mkdir()
        return root / name

    afile = where("file") / "afile"
    afile.write_text("not a directory")
    cases = {
        "out_is_a_file": ["run", *TINY, *SMALL, "--out", str(afile)],
        "out_below_a_file": ["run", *TINY, *SMALL, "--out", str(afile / "run")],
    }
    if not UNWRITABLE:
        locked = where("locked")
        cases["out_unwritable"] = ["run", *TINY, *SMALL, "--out", str(locked / "run")]
    bad = where("utf8") / "bad.toml"
    bad.write_bytes(b'method = "fedavg"\nnote = "\xff\xfe"\n')
    cases["not_utf8"] = ["run", "--config", str(bad), "--out", str(bad.parent / "run")]
    opt = where("opt") / "opt.toml"
    opt.write_text("options = 5\n")
    cases["options_not_a_table"] = ["run", "--config", str(opt), "--out", str(opt.parent / "run")]
    for i, (setting, _) in enumerate(BAD_VALUES):
        cases[f"set:{setting}"] = ["run", *TINY, "--set", setting, "--out", str(where(f"set{i}") / "run")]
    nan = where("nan") / "nan.toml"
    nan.write_text("model = 'tiny'\nlocal_epochs = inf\n[options]\nserver_lr = nan\n")
    cases["non_finite_toml"] = ["run", "--config", str(nan), "--out", str(nan.parent / "run")]
    for name, change in TAMPER.items():
        cases[f"ckpt:{name}"] = ["run", "--resume", str(_tampered(finished_run, where(f"ckpt-{name}"), change))]
    cases["ckpt:untampered"].append("--quiet")
    if not UNWRITABLE:
        locked.chmod(0o555)
    try:
        return _drive(cases)
    finally:
        if not UNWRITABLE:
            locked.chmod(0o755)


def test_out_is_a_file(driven):
    _clean_error(driven["out_is_a_file"], "afile")


def test_out_below_a_file(driven):
    _clean_error(driven["out_below_a_file"], "Not a directory", "afile")


@pytest.mark.skipif(UNWRITABLE, reason="root may write into any directory")
def test_out_in_an_unwritable_directory(driven):
    _clean_error(driven["out_unwritable"], "Permission denied")


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


def test_config_file_not_utf8(driven):
    _clean_error(driven["not_utf8"], "bad.toml", "not UTF-8")


def test_config_file_options_not_a_table(driven):
    _clean_error(driven["options_not_a_table"], "[options] in the config file must be a table; got 5")


def test_method_name_with_markup_is_printed_verbatim(tmp_path):
    """The one case through ``python -m fedsqueeze`` itself: the real process exits 2 with one line."""
    _clean_error(_cli("run", "--method", "x[/]", "--out", str(tmp_path / "run")), "unknown method 'x[/]'")


@pytest.mark.parametrize(("setting", "needle"), BAD_VALUES)
def test_bad_values_through_set(driven, setting, needle):
    _clean_error(driven[f"set:{setting}"], needle)


def test_non_finite_values_in_a_toml_file(driven):
    _clean_error(driven["non_finite_toml"], "local_epochs", "finite")


# ---- checkpoints with a valid frame and wrong contents ----------------------------------------


@pytest.mark.parametrize(
    ("case", "needles"),
    [
        ("beyond", ("round 5, beyond the run's rounds=2", "without --resume")),
        ("no_server_state", ("lacks server_state",)),
        ("missing_tensor", ("server state['weights'] has the wrong keys", "without --resume")),
        ("wrong_shape", ("server state['weights']", "expected float32")),
        ("wrong_dtype", ("is float64", "expected float32")),
        ("stray_client", ("clients [99]",)),
    ],
)
def test_a_tampered_checkpoint_is_one_clean_error(driven, case, needles):
    _clean_error(driven[f"ckpt:{case}"], *needles)


def test_untampered_checkpoint_still_resumes(driven):
    p = driven["ckpt:untampered"]
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
