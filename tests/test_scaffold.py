"""SCAFFOLD control variates (grad_mean and option II) pinned by hand: client variate, server variate, corrected
gradient, wire, bytes and reproducibility (see docs/strategies.md and methods/scaffold.py).

The hand-made values are binary fractions, so float32 arithmetic is exact and the tests compare
with ``==``; where a value comes out of a torch training step, the expected value is rebuilt from
that step's own gradient by the paper's formula.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from handmade import OUT, build, frame_size, parse_frame

from fedsqueeze.codecs import CodecContext, decode_tensors, encode_tensors
from fedsqueeze.errors import ConfigError, PayloadError
from fedsqueeze.methods import get_method, scaffold
from fedsqueeze.methods.base import RoundContext
from fedsqueeze.methods.scaffold import ScaffoldUpdate, corrected_gradients, option2_control, server_control

CTX = RoundContext(round=1, rounds=2, seed=0)


@pytest.fixture(scope="module")
def task():
    # a task of its own, not the process-wide shared one: the by-hand tests compare two methods' steps
    # to 1e-7, and after other modules' runs on the shared task (test_pinned_methods' fedpm
    # evaluation, then this file) they differed by up to 2e-5 (CI, 2026-12-01; cause not yet found)
    from fedsqueeze.task import build_task

    return build_task(tiny_config(out=OUT))


def _build(name, task, local_steps=3, **options):
    m = get_method(name)(tiny_config(method=name, out=OUT, local_steps=local_steps, options=options))
    m.setup(task)
    return m


def _full(m, value):
    return {n: np.full(m.shapes[n], value, dtype=np.float32) for n in m.names}


def _one(value):
    return {"w": np.array([value], dtype=np.float32)}


# ---- the rules, by hand ---------------------------------------------------------------------------


def test_option2_client_variate_by_hand():
    # c_i = 0.25, c = 0.5, x = 1, y = 0.5, K = 2 steps at lr 0.125: (x − y)/(K·lr) = 0.5/0.25 = 2
    got = option2_control(_one(0.25), _one(0.5), _one(1.0), _one(0.5), 2, {"w": 0.125})
    assert got["w"][0] == 0.25 - 0.5 + 2.0  # 1.75
    # each tensor divides by its own group's lr (the head's head_lr)
    two = option2_control(
        {"a": np.zeros(1, np.float32), "b": np.zeros(1, np.float32)},
        {"a": np.zeros(1, np.float32), "b": np.zeros(1, np.float32)},
        {"a": np.ones(1, np.float32), "b": np.ones(1, np.float32)},
        {"a": np.zeros(1, np.float32), "b": np.zeros(1, np.float32)},
        4,
        {"a": 0.5, "b": 0.0625},
    )
    assert (two["a"][0], two["b"][0]) == (0.5, 4.0)


def test_server_variate_scales_the_mean_by_the_fraction_of_clients():
    # c = 0.5; |S| = 2 of N = 4 clients send Δc = 1.0 and −0.5: c + (2/4)·mean = 0.5 + 0.5·0.25 = 0.625
    got = server_control(_one(0.5), [_one(1.0), _one(-0.5)], 4)
    assert got["w"][0] == 0.625
    assert got["w"][0] != 0.5 + 0.25  # the plain mean of Δc (no |S|/N) would give 0.75
    assert got["w"][0] != 0.5 - 0.125  # the opposite sign would give 0.375
    assert server_control(_one(0.5), [], 4)["w"][0] == 0.5  # no client, no change


def test_the_correction_is_added_to_every_gradient_before_the_step():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    sums = {"w": np.zeros(2, np.float32)}
    with corrected_gradients({"w": w}, {"w": np.array([0.5, -0.25], np.float32)}, sums):
        for _ in range(2):
            w.grad = None
            (3.0 * w).sum().backward()  # raw gradient 3 everywhere
            assert w.grad.tolist() == [3.5, 2.75]
    assert sums["w"].tolist() == [6.0, 6.0]  # the raw gradients of the two steps, before the correction
    w.grad = None
    (3.0 * w).sum().backward()  # closed: no correction any more
    assert w.grad.tolist() == [3.0, 3.0]


# ---- through the method ---------------------------------------------------------------------------


def _server_state(m, c_value):
    state = m.init_server()
    state["scaffold_c"] = _full(m, c_value)
    return state


@pytest.mark.parametrize("control", ["ii", "grad_mean"])
def test_client_update_by_hand(task, control):
    """One local SGD step (plain, the first step of momentum SGD): y = x − lr·(g − c_i + c), and
    c_i⁺ = c_i − c + (x − y)/lr = g for both variates; the upload carries Δc_i = c_i⁺ − c_i."""
    plain = _build("head", task, local_steps=1, optimizer="sgd")
    m = _build("head", task, local_steps=1, optimizer="sgd", scaffold=True, scaffold_control=control)
    lr = m.lr
    c, c_i = 0.0078125, -0.015625  # 2^-7, −2^-6
    x = {n: a.copy() for n, a in plain.init_server()["weights"].items()}  # both start from these weights
    base = plain.client_update(plain.downlink({"weights": x}, CTX, 0), 0, None, CTX)
    g = {n: -a / np.float32(lr) for n, a in decode_tensors(base.payload)[0].items()}  # the step's raw gradient
    state = {"weights": x, "scaffold_c": _full(m, c)}
    out = m.client_update(m.downlink(state, CTX, 0), 0, {"c": _full(m, c_i)}, CTX)

    update_bytes, control_bytes = scaffold.unpack(scaffold.UP_KIND, out.payload)
    delta = decode_tensors(update_bytes)[0]
    change = decode_tensors(control_bytes)[0]
    for n in m.names:
        np.testing.assert_allclose(delta[n], -lr * (g[n] - c_i + c), rtol=0, atol=1e-7)  # corrected step
        # g rebuilt from a float32 step carries an error of ~ulp(x)/lr ≈ 4e-7; a wrong term would be ≥ 0.008
        np.testing.assert_allclose(out.state["c"][n], g[n], rtol=0, atol=2e-6)
        assert np.array_equal(change[n], out.state["c"][n] - np.float32(c_i))  # Δc_i, exactly
    assert set(out.state) == {"codec", "c"}


def test_round_one_is_plain_fedavg_and_the_variates_start_at_zero(task):
    """c = c_i = 0 in round 1: the correction adds zeros, so the update is bit-identical to no SCAFFOLD."""
    plain = build("head", task)
    m = build("head", task, scaffold=True)
    state = m.init_server()
    assert all(not a.any() for a in state["scaffold_c"].values())
    base = plain.client_update(plain.downlink({"weights": state["weights"]}, CTX, 1), 1, None, CTX)
    out = m.client_update(m.downlink(state, CTX, 1), 1, None, CTX)
    assert bytes(scaffold.unpack(scaffold.UP_KIND, out.payload)[0]) == base.payload


def _upload(m, delta, change, n, client):
    update = encode_tensors(m.up_codec, delta, CodecContext(seed=CTX.seed_for(client, "uplink")), n=n)
    return scaffold.pack(scaffold.UP_KIND, update, scaffold.encode_control(change))


def test_aggregate_updates_x_as_fedavg_and_c_by_the_fraction_of_clients(task):
    m = build("head", task, scaffold=True)  # tiny_config: N = 4 clients
    state = _server_state(m, 0.5)
    x0 = {n: a.copy() for n, a in state["weights"].items()}
    uploads = {0: _upload(m, _full(m, 0.25), _full(m, 1.0), 3, 0), 1: _upload(m, _full(m, -0.75), _full(m, -0.5), 1, 1)}
    updates = {c: m.decode_update(p, c, state, CTX) for c, p in uploads.items()}
    assert all(isinstance(u, ScaffoldUpdate) for u in updates.values())
    state, _ = m.aggregate(state, updates, CTX)
    for n in m.names:
        assert np.array_equal(state["weights"][n], x0[n] + np.float32(0.0))  # (3·0.25 − 0.75)/4 = 0
        assert np.all(state["scaffold_c"][n] == 0.625)  # 0.5 + (1.0 − 0.5)/4


def test_downlink_carries_c_and_the_client_keeps_its_variate(task):
    m = build("head", task, scaffold=True)
    state = _server_state(m, 0.25)
    message = m.downlink(state, CTX, 0)
    weights_bytes, c_bytes = scaffold.unpack(scaffold.DOWN_KIND, message)
    plain = build("head", task)
    assert bytes(weights_bytes) == plain.downlink({"weights": state["weights"]}, CTX, 0)
    assert all(np.all(a == 0.25) for a in decode_tensors(c_bytes)[0].values())
    state["scaffold_c"] = _full(m, 0.5)  # a changed c is a new message (the round memo is keyed by it)
    assert m.downlink(state, CTX, 0) != message
    out = m.client_update(m.downlink(state, CTX, 0), 0, None, CTX)
    again = m.client_update(m.downlink(state, CTX, 0), 0, out.state, CTX)
    change = decode_tensors(scaffold.unpack(scaffold.UP_KIND, again.payload)[1])[0]
    assert any(not np.array_equal(change[n], again.state["c"][n]) for n in m.names)  # Δc is against the kept c_i


# ---- wire and bytes ---------------------------------------------------------------------------


def test_payload_bytes_are_the_update_plus_the_raw_control_variate_exactly(task):
    m = build("head", task, scaffold=True)
    delta, change = _full(m, 0.25), _full(m, -0.5)
    update = encode_tensors(m.up_codec, delta, CodecContext(seed=CTX.seed_for(0, "uplink")), n=3)
    control = encode_tensors(scaffold.RAW, change)
    payload = _upload(m, delta, change, 3, 0)
    sections = [len(update), len(control)]
    assert len(payload) == frame_size("scaffold-up", {"sections": sections}, sum(sections))
    kind, meta, body = parse_frame(payload)
    assert (kind, meta, body) == ("scaffold-up", {"sections": sections}, update + control)
    # the control variate is float32, 4 bytes a value, on top of the update
    assert len(control) >= 4 * m.max_elements and len(control) - 4 * m.max_elements < 1024
    # and the round trip gives back both parts
    got = m.decode_update(payload, 0, m.init_server(), CTX)
    assert all(np.array_equal(got.delta[n], delta[n]) and np.array_equal(got.control[n], change[n]) for n in m.names)
    assert got.n == 3


def test_hostile_uploads_drop_the_client(task):
    m = build("head", task, scaffold=True)
    state = m.init_server()
    good_update = encode_tensors(m.up_codec, _full(m, 0.25), CodecContext(seed=CTX.seed_for(0, "uplink")), n=3)
    bad_controls = {
        "nan": scaffold.encode_control({n: np.full(m.shapes[n], np.nan, np.float32) for n in m.names}),
        "missing": scaffold.encode_control(dict(list(_full(m, 0.5).items())[:-1])),
        "float64": encode_tensors(scaffold.RAW, {n: np.zeros(m.shapes[n], np.float64) for n in m.names}),
    }
    for why, control in bad_controls.items():
        with pytest.raises(PayloadError):
            m.decode_update(scaffold.pack(scaffold.UP_KIND, good_update, control), 0, state, CTX)
        assert why
    payload = scaffold.pack(scaffold.UP_KIND, good_update, scaffold.encode_control(_full(m, 0.5)))
    from fedsqueeze.codecs import frame, unframe

    _, meta, body = unframe(payload)
    for sections in ([1, 2], [len(body) + 1, -1], "x", [len(body)], [0.5, len(body) - 0.5]):
        with pytest.raises(PayloadError):
            m.decode_update(frame("scaffold-up", {"sections": sections}, bytes(body)), 0, state, CTX)
    with pytest.raises(PayloadError):  # a plain upload to a SCAFFOLD server
        m.decode_update(good_update, 0, state, CTX)


def test_scaffold_refuses_dp_and_upload_rewriting_attacks():
    with pytest.raises(ConfigError, match="DP-FedAvg"):
        get_method("fedavg")(tiny_config(out=OUT, options={"scaffold": True, "dp_clip": 1.0}))
    with pytest.raises(ConfigError, match="scaffold"):
        get_method("lora")(tiny_config(out=OUT, attack="sign_flip", attack_fraction=0.5, options={"scaffold": True}))
    get_method("lora")(tiny_config(out=OUT, attack="label_flip", attack_fraction=0.5, options={"scaffold": True}))


def test_a_round_counts_the_control_variates_both_ways(task):
    """Round 1 sends the same weights and the same updates with and without SCAFFOLD, so the byte
    difference is exactly each client's raw control frame plus the two-section frame, both ways."""
    from fedsqueeze.runtime.local import run_round

    records = []
    for on in (False, True):
        cfg = tiny_config(out=OUT, method="head", options={"scaffold": on})
        m = get_method("head")(cfg)
        m.setup(task)  # the head's values do not change the byte counts of raw float32 payloads
        states: dict = {}
        state, record = run_round(m, m.task, cfg, m.init_server(), states, CTX)
        records.append(record)
        if on:
            control = len(scaffold.encode_control(_full(m, 0.0)))  # every raw control frame of these tensors has this size
            assert len(states) == 2 and all(set(s) == {"codec", "c"} for s in states.values())
    k = records[1]["clients"]
    assert k == 2 and records[1]["clients_aggregated"] == 2
    assert records[0]["uplink_bytes"] % k == 0  # IID tiny task: both clients' plain uploads have one size
    per_up = records[0]["uplink_bytes"] // k
    per_down = records[0]["downlink_bytes"] // k
    expect_up = frame_size("scaffold-up", {"sections": [per_up, control]}, per_up + control)
    expect_down = frame_size("scaffold-down", {"sections": [per_down, control]}, per_down + control)
    assert records[1]["uplink_bytes"] == k * expect_up
    assert records[1]["downlink_bytes"] == k * expect_down


# ---- whole runs (slow: each builds a tiny task) ---------------------------------------------------

RUN = dict(method="lora", clients=4, clients_per_round=2, rounds=3, local_steps=3, threads=1, options={"scaffold": True})
CLOCK = {"wall_s", "train_s", "codec_s", "sim_time_s", "sim_slowest_client", "sim_clients"}


def _records(res: dict) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in CLOCK} for r in res["rounds"]]


@pytest.mark.slow  # three tiny lora runs in this process (~15 s each on a loaded machine)
def test_same_seed_same_bits_and_resume_keeps_every_variate(tiny_cfg):
    """Two runs of one seed give the same records; a run resumed after round 2 from its checkpoint
    (server c and every client's c_i restored) ends where the uninterrupted run does."""
    import json

    from fedsqueeze.runtime import run_local
    from fedsqueeze.runtime.checkpoint import load_checkpoint

    whole = run_local(tiny_cfg(**RUN), show_progress=False)
    again = run_local(tiny_cfg(**RUN), show_progress=False)
    assert _records(whole) == _records(again)
    first = tiny_cfg(**{**RUN, "rounds": 2})
    run_local(first, show_progress=False)
    ckpt = load_checkpoint(first.out)
    assert ckpt.round == 2 and any(a.any() for a in ckpt.server_state["scaffold_c"].values())
    assert ckpt.client_states and all(set(s) == {"codec", "c"} for s in ckpt.client_states.values())
    import dataclasses

    resumed = run_local(dataclasses.replace(first, rounds=3), show_progress=False, resume=ckpt)
    assert _records(json.loads(json.dumps(resumed))) == _records(json.loads(json.dumps(whole)))


@pytest.mark.slow  # a tiny run from the CLI in the local runtime and in flower-sim (Ray start-up)
def test_cli_local_and_flower_sim_give_the_same_scaffold_run(tmp_path):
    import json
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    src = str(Path(__file__).resolve().parents[1] / "src")
    ray_tmp = tempfile.mkdtemp(prefix="fsq-sc-", dir="/tmp")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TMPDIR": ray_tmp, "PYTHONPATH": src}
    results = {}
    try:
        for runtime in ("local", "flower-sim"):
            out = tmp_path / runtime
            sets = ["train_size=200", "test_size=100", "clients_per_round=2", "local_steps=3", "threads=1", "scaffold=true"]
            cmd = [sys.executable, "-m", "fedsqueeze", "run", "--quiet", "--runtime", runtime, "--model", "tiny", "--method", "head"]
            cmd += ["--clients", "4", "--rounds", "3", "--out", str(out), *[a for s in sets for a in ("--set", s)]]
            subprocess.run(cmd, check=True, timeout=600, env=env)
            results[runtime] = json.loads((out / "results.json").read_text())
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    local, sim = results["local"], results["flower-sim"]
    assert sim["runtime"] == "flower-sim" and local["config"]["options"]["scaffold"] is True
    assert _records(local) == _records(sim)
