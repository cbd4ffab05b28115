"""Running on Flower: ``--runtime flower-sim`` (simulation engine, Ray) and ``--runtime flower``
(a real SuperLink with SuperNodes, started with :mod:`fedsqueeze.runtime.flower_deploy` or by hand).

Both run the ServerApp of :mod:`fedsqueeze.runtime.flower_app` and the ClientApp of
:mod:`fedsqueeze.runtime.flower_client` around the round engine, so the bytes, rounds and
results.json are those of the local runtime. Every Flower process started from here gets
``FLWR_TELEMETRY_ENABLED=0``, ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` and a private
``FLWR_HOME`` (see :func:`flower_env`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import tomli_w

from fedsqueeze.config import RunConfig
from fedsqueeze.errors import FedsqueezeError
from fedsqueeze.runtime.checkpoint import Checkpoint

CONNECTION = "fedsqueeze"  # name of the SuperLink connection in the private FLWR_HOME
CLIENT_STATE_DIR = "client-state"  # simulation: OUT/client-state holds the virtual nodes' client states


def flower_env(flwr_home: str | Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a Flower process: no telemetry, no runtime installs, a private home.

    ``src`` of a source checkout is put on PYTHONPATH so that the ServerApp and ClientApp
    processes Flower spawns can import fedsqueeze even without ``pip install -e .``.
    """
    env = dict(os.environ if base is None else base)
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.25")  # Flower's 1 s adds up to a second per message
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    package_root = str(Path(__file__).resolve().parents[2])
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if package_root not in paths:
        env["PYTHONPATH"] = os.pathsep.join([package_root, *paths])
    # Flower's own commands live next to this interpreter
    bindir = str(Path(sys.executable).parent)
    if bindir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "")])
    return env


def flower_bin(name: str) -> str:
    """Path of a Flower command (``flwr``, ``flower-superlink``...) of this environment."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise FedsqueezeError(f"Flower command {name!r} not found; is flwr installed in this environment?")
    return found


def _with_absolute_out(cfg: RunConfig) -> RunConfig:
    return replace(cfg, out=str(Path(cfg.out).expanduser().resolve()))


# ---- simulation engine ---------------------------------------------------------------------------
def run_flower_sim(
    cfg: RunConfig,
    show_progress: bool = True,
    client_cpus: float = 1.0,
    resume: Checkpoint | None = None,
) -> dict[str, Any]:
    """Run ``cfg`` on Flower's simulation engine (from ``resume`` if given): one virtual SuperNode per client.

    The virtual nodes share this machine, so they keep their client states in ``OUT/client-state``,
    which lets a killed simulation resume with every client's state as it was.
    """
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise FedsqueezeError("--runtime flower-sim needs Ray: pip install 'flwr[simulation]==1.41.0'")
    cfg = _with_absolute_out(cfg)
    home = tempfile.mkdtemp(prefix="fsq-flwr-")
    os.environ.update({k: v for k, v in flower_env(home).items() if k.startswith(("FLWR_", "HF_", "TOKENIZERS_")) or k == "PYTHONPATH"})
    from flwr.simulation import run_simulation

    from fedsqueeze.runtime.flower_app import ServerSettings, client_app, make_server_app

    settings = ServerSettings(
        runtime="flower-sim",
        wait_nodes_s=600.0,  # virtual nodes always come; a loaded machine only makes them slow to build their task
        show_progress=show_progress,
        state_dir=str(Path(cfg.out) / CLIENT_STATE_DIR),
        resume=resume,
        prepare_nodes=True,
    )
    backend: dict[str, Any] = {
        "client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": os.cpu_count() or 1,
            "logging_level": "error",
            "log_to_driver": False,
            "_temp_dir": tempfile.mkdtemp(prefix="fsq-ray-"),
        },
    }
    flwr_logger = logging.getLogger("flwr")
    propagate, flwr_logger.propagate = flwr_logger.propagate, False  # Flower logs through its own handler
    try:
        run_simulation(make_server_app(cfg, settings), client_app, num_supernodes=cfg.clients, backend_config=backend)
    finally:
        flwr_logger.propagate = propagate
        import ray

        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(home, ignore_errors=True)
    if settings.results is None:
        raise FedsqueezeError("the Flower simulation ended without results (see the log above)")
    return settings.results


# ---- deployment ----------------------------------------------------------------------------------
def app_pyproject(
    cfg: RunConfig,
    wait_nodes_s: float = 120.0,
    reply_timeout_s: float = 3600.0,
    resume: bool = False,
) -> dict[str, Any]:
    """The pyproject.toml of the Flower app that ``flwr run`` ships to the SuperLink.

    The app's code is fedsqueeze itself (installed where the SuperLink and SuperNodes run); the
    run config travels in ``[tool.flwr.app.config]`` as JSON.
    """
    from fedsqueeze.runtime.flower_app import RESUME_KEY, RUN_CONFIG_KEY, TIMEOUT_KEY, WAIT_KEY
    from fedsqueeze.runtime.flower_wire import config_to_json

    return {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": "fedsqueeze-flower",
            "version": "1.0.0",
            "description": "fedsqueeze on Flower",
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fedsqueeze",
                    "components": {
                        "serverapp": "fedsqueeze.runtime.flower_app:server_app",
                        "clientapp": "fedsqueeze.runtime.flower_client:client_app",
                    },
                    "config": {
                        RUN_CONFIG_KEY: config_to_json(cfg),
                        WAIT_KEY: float(wait_nodes_s),
                        TIMEOUT_KEY: float(reply_timeout_s),
                        RESUME_KEY: bool(resume),
                    },
                }
            }
        },
    }


def write_flwr_config(home: Path, superlink: str, root_certificates: str | None) -> None:
    """A private FLWR_HOME/config.toml whose default connection is ``superlink``."""
    conn: dict[str, Any] = {"address": superlink}
    if root_certificates:
        conn["root-certificates"] = str(Path(root_certificates).expanduser().resolve())
    else:
        conn["insecure"] = True
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}}))


def run_flower(
    cfg: RunConfig,
    superlink: str = "127.0.0.1:9093",
    root_certificates: str | None = None,
    show_progress: bool = True,
    wait_nodes_s: float = 120.0,
    timeout_s: float | None = None,
    resume: bool = False,
    insecure: bool = False,
) -> dict[str, Any] | None:
    """Start ``cfg`` on a running SuperLink with ``flwr run`` and wait for it to finish.

    The connection is TLS, verified against ``root_certificates`` (the federation's ca.crt);
    without it the run is refused unless ``insecure`` is True (plain text, with a warning).
    The ServerApp writes results.json and rounds.csv to ``cfg.out`` on the SuperLink's machine;
    they are returned when that is this machine (None otherwise).
    """
    if root_certificates and insecure:
        raise FedsqueezeError("--root-certificates and --insecure: choose one")
    if not root_certificates and not insecure:
        raise FedsqueezeError(
            f"refusing an unencrypted connection to the SuperLink {superlink}: give --root-certificates CA.crt "
            "(the federation's ca.crt; `fedsqueeze federation` prints it), or --insecure for a SuperLink without TLS"
        )
    if root_certificates and not Path(root_certificates).expanduser().is_file():
        raise FedsqueezeError(f"--root-certificates {root_certificates}: no such file")
    if insecure:
        logging.getLogger("fedsqueeze").warning(
            "--insecure: the run and its models travel to %s unencrypted, and the SuperLink is not verified", superlink
        )
    cfg = _with_absolute_out(cfg)
    results_path = Path(cfg.out) / "results.json"
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="fsq-flwr-") as tmp:
        home, app_dir = Path(tmp) / "home", Path(tmp) / "app"
        app_dir.mkdir()
        (app_dir / "pyproject.toml").write_text(tomli_w.dumps(app_pyproject(cfg, wait_nodes_s, resume=resume)))
        write_flwr_config(home, superlink, root_certificates)
        cmd = [flower_bin("flwr"), "run", str(app_dir), CONNECTION, "--stream"]
        out = None if show_progress else subprocess.DEVNULL
        proc = subprocess.Popen(cmd, env=flower_env(home), stdout=out, stderr=subprocess.STDOUT if out else None, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 15)
                proc.wait(timeout=10)
        if rc is None:
            raise FedsqueezeError(f"the Flower run did not finish within {timeout_s:.0f}s")
        if rc != 0:
            raise FedsqueezeError(f"`flwr run` failed with exit code {rc}")
    if not results_path.is_file() or results_path.stat().st_mtime < started:
        return None  # the ServerApp ran elsewhere (or wrote nothing): an older results.json is not this run's
    return json.loads(results_path.read_text())
