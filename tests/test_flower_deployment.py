"""Integration: a real SuperLink and two SuperNodes on 127.0.0.1 (TLS, SuperNode authentication) give the
local runtime's results.

Both Flower runs go to the same federation at once (the SuperNodes serve both), while the local
reference runs in this process, so the test pays Flower's start-up and polling delays once.
One round each: a second round would only repeat the deployment's message path. What it adds is
checked on cheaper paths: the ServerApp carries the model across rounds the same way on flower-sim
(tests/test_engine.py, four rounds), and a node worker's prepared task serves a second round with
the in-process payloads and client states (tests/test_node_worker.py).
Every process started here is stopped by PID, also when something fails.
"""

from __future__ import annotations

import csv
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import torch
from conftest import tiny_config

from fedsqueeze.runtime import run_local
from fedsqueeze.runtime.flower import run_flower
from fedsqueeze.runtime.flower_deploy import Federation

# (method, options): the head, and a compressed method (FedSZ: SZ3 on the update)
CASES = [("head", {}), ("fedsz", {})]
CONTRACT_ROUND = {
    "round",
    "accuracy",
    "loss",
    "uplink_bytes",
    "downlink_bytes",
    "uplink_bpp",
    "downlink_bpp",
    "clients",
    "wall_s",
    "train_s",
    "codec_s",
}


def _cfg(method: str, options: dict, out: Path):
    # one torch thread on both sides: the same float sums, so even SZ3's value-dependent sizes agree
    return tiny_config(method=method, options=dict(options), clients=2, clients_per_round=2, rounds=1, threads=1, out=str(out))


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_superlink_and_two_supernodes_match_local(tmp_path):
    fed = Federation(nodes=2, workdir=str(tmp_path / "federation"))
    pids: list[int] = []
    threads = torch.get_num_threads()  # the local runs below set one thread; later tests get theirs back
    try:
        fed.start()
        with ThreadPoolExecutor(len(CASES)) as pool:
            remote = [
                pool.submit(
                    run_flower,
                    _cfg(m, o, tmp_path / f"flower-{m}"),
                    superlink=fed.address,
                    root_certificates=fed.root_certificates,  # TLS and SuperNode authentication: Federation's defaults
                    show_progress=False,
                    wait_nodes_s=90,
                    timeout_s=400,
                )
                for m, o in CASES
            ]
            local = [run_local(_cfg(m, o, tmp_path / f"local-{m}"), show_progress=False) for m, o in CASES]
            pids = fed.process_tree()
            remote = [f.result() for f in remote]
    finally:
        torch.set_num_threads(threads)
        pids += fed.process_tree()
        fed.stop()
    assert pids and all(_gone(p) for p in pids), "a Flower process outlived the federation"

    for (method, _), loc, flw in zip(CASES, local, remote):
        assert flw is not None, f"{method}: no results.json from the Flower run"
        assert flw["runtime"] == "flower" and loc["runtime"] == "local"
        assert set(flw) == set(loc) and flw["config"] == {**loc["config"], "out": flw["config"]["out"]}
        assert flw["model_params"] == loc["model_params"] and flw["trainable_params"] == loc["trainable_params"]
        assert len(flw["rounds"]) == len(loc["rounds"]) == 1
        for a, b in zip(loc["rounds"], flw["rounds"]):
            assert CONTRACT_ROUND <= set(b) and set(a) == set(b)
            for key in (
                "uplink_bytes",
                "downlink_bytes",
                "uplink_bpp",
                "downlink_bpp",
                "clients",
                "clients_uploaded",
                "clients_aggregated",
                "dropped",
            ):
                assert a[key] == b[key], (method, key)
            assert b["accuracy"] == pytest.approx(a["accuracy"], abs=1e-6)
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        rows = lambda run: list(csv.reader((tmp_path / f"{run}-{method}" / "rounds.csv").open()))  # noqa: E731
        assert rows("flower")[0] == rows("local")[0] and len(rows("flower")) == len(rows("local")) == 2
