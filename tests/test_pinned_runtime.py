"""Pinned runtime pieces: client sampling, the link model, round records and checkpoints, recomputed by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import tiny_config

from fedsqueeze.errors import PayloadError
from fedsqueeze.methods.base import RoundContext
from fedsqueeze.runtime.checkpoint import decode_checkpoint, encode_checkpoint, load_checkpoint, save_checkpoint
from fedsqueeze.runtime.common import client_link, round_record, run_header, sample_clients, simulated_round_time, transfer_s
from fedsqueeze.seeding import SERVER, np_rng


def test_sampling_is_the_seeded_choice_sorted():
    cfg = tiny_config(out="/tmp/unused", clients=9, clients_per_round=4, seed=3)
    for r in (1, 2, 5):
        expected = sorted(int(c) for c in np_rng(3, r, SERVER, "sample").choice(9, size=4, replace=False))
        assert sample_clients(cfg, RoundContext(r, 5, 3)) == expected
        assert len(set(expected)) == 4
    retry = sorted(int(c) for c in np_rng(3, 2, SERVER, "sample/retry1").choice(9, size=4, replace=False))
    assert sample_clients(cfg, RoundContext(2, 5, 3), attempt=1) == retry


def test_link_model_and_round_time():
    cfg = tiny_config(out="/tmp/unused", uplink_mbps=2.0, downlink_mbps=8.0, latency_ms=40.0, link_spread=0.5, seed=1)
    clients = {3: (1.5, 1_000_000, 250_000), 0: (0.25, 4_000_000, 10)}
    rec = simulated_round_time(cfg, clients)
    times = {}
    for c, (compute, down, up) in clients.items():
        f = math.exp(0.5 * np_rng(1, 0, c, "link").standard_normal())
        assert client_link(cfg, c) == pytest.approx((2.0 * f, 8.0 * f, 0.04), rel=1e-12)
        times[c] = compute + down * 8 / (8.0 * f * 1e6) + up * 8 / (2.0 * f * 1e6) + 0.04
    slowest = max(times, key=times.get)
    assert rec["sim_time_s"] == pytest.approx(times[slowest], rel=1e-12) and rec["sim_slowest_client"] == slowest
    assert [c["client"] for c in rec["sim_clients"]] == [0, 3]
    assert [c["time_s"] for c in rec["sim_clients"]] == pytest.approx([times[0], times[3]], rel=1e-12)
    assert [(c["compute_s"], c["downlink_bytes"], c["uplink_bytes"]) for c in rec["sim_clients"]] == [clients[0], clients[3]]
    assert simulated_round_time(cfg, {}) == {"sim_time_s": 0.0, "sim_slowest_client": None, "sim_clients": []}
    flat = tiny_config(out="/tmp/unused", uplink_mbps=2.0, downlink_mbps=8.0, latency_ms=40.0, link_spread=0.0)
    assert client_link(flat, 7) == (2.0, 8.0, 0.04)
    assert transfer_s(1_000_000, 8.0) == 1.0


def test_round_record_sums_bytes_and_bits_per_parameter():
    rec = round_record(
        round_=3,
        accuracy=0.5,
        loss=1.25,
        uplink=[100, 300],
        downlink=[50, 50, 50],
        model_params=400,
        aggregated=1,
        dropped=[{"client": 2, "reason": "x"}],
        wall_s=1.0,
        train_s=0.5,
        codec_s=0.25,
        extra={"keys": 4.0},
    )
    assert rec["uplink_bytes"] == 400 and rec["downlink_bytes"] == 150
    assert rec["uplink_bpp"] == pytest.approx(400 * 8 / (2 * 400)) and rec["downlink_bpp"] == pytest.approx(150 * 8 / (3 * 400))
    assert (rec["clients"], rec["clients_uploaded"], rec["clients_aggregated"]) == (3, 2, 1)
    assert (rec["round"], rec["accuracy"], rec["loss"], rec["keys"]) == (3, 0.5, 1.25, 4.0)
    assert (rec["wall_s"], rec["train_s"], rec["codec_s"]) == (1.0, 0.5, 0.25) and rec["dropped"][0]["client"] == 2
    head = run_header(tiny_config(out="/tmp/unused", method="head"), 1000, 10, "local")
    assert (head["method"], head["model_params"], head["trainable_params"], head["runtime"]) == ("head", 1000, 10, "local")
    assert head["config"]["method"] == "head" and set(head["versions"]) == {"python", "torch", "numpy"}


def test_checkpoint_round_trip_and_rejections(tmp_path):
    state = {"weights": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, "history": [{"round": 1}]}
    rounds = [{"round": 1, "accuracy": 0.25}, {"round": 2, "accuracy": 0.5}]
    data = encode_checkpoint(
        config={"method": "head"},
        round_=2,
        server_state=state,
        client_states={0: None, 4: {"ef": np.ones(2)}},
        rounds=rounds,
        state_versions={4: (2, 1)},
    )
    assert load_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, data)
    for ck in (decode_checkpoint(data), load_checkpoint(tmp_path)):
        assert ck.round == 2 and ck.config == {"method": "head"} and ck.rounds == rounds
        assert np.array_equal(ck.server_state["weights"]["w"], state["weights"]["w"]) and ck.server_state["history"] == [{"round": 1}]
        assert set(ck.client_states) == {0, 4} and ck.client_states[0] is None
        assert np.array_equal(ck.client_states[4]["ef"], np.ones(2))
        assert ck.state_versions == {4: (2, 1)}
    assert not list(tmp_path.glob(".*tmp"))  # written through a temporary file, then renamed
    with pytest.raises(PayloadError, match="round records"):
        decode_checkpoint(encode_checkpoint(config={}, round_=3, server_state=None, client_states={}, rounds=rounds))
    with pytest.raises(PayloadError, match="not a count"):
        decode_checkpoint(encode_checkpoint(config={}, round_=-1, server_state=None, client_states={}, rounds=[]))
    from fedsqueeze.treeio import pack_tree

    good = {
        "format": "fedsqueeze-checkpoint",
        "version": 1,
        "config": {},
        "round": 0,
        "server_state": None,
        "client_states": {},
        "rounds_json": np.frombuffer(json.dumps([]).encode(), np.uint8),
        "state_versions": {},
    }
    assert decode_checkpoint(pack_tree(good)).round == 0
    for key, value, match in [
        ("format", "other", "not a fedsqueeze checkpoint"),
        ("version", 2, "version 2"),
        ("config", [], "malformed"),
        ("client_states", {"a": 1}, "malformed"),
        ("rounds_json", np.zeros(2, np.int8), "malformed"),
        ("rounds_json", np.frombuffer(b"[", np.uint8), "not JSON"),
        ("state_versions", {1: [1]}, "versions are malformed"),
        ("round", True, "not a count"),
    ]:
        with pytest.raises(PayloadError, match=match):
            decode_checkpoint(pack_tree({**good, key: value}))


def test_checkpoint_messages_and_old_files(tmp_path):
    from fedsqueeze.errors import ConfigError, FedsqueezeError
    from fedsqueeze.treeio import pack_tree

    good = {
        "format": "fedsqueeze-checkpoint",
        "version": 1,
        "config": {},
        "round": 2,
        "server_state": None,
        "client_states": {},
        "rounds_json": np.frombuffer(json.dumps([{}, {}]).encode(), np.uint8),
    }
    assert decode_checkpoint(pack_tree(good)).state_versions == {}  # written before client state versions existed
    with pytest.raises(PayloadError, match="holds 1 round records for round 2"):
        decode_checkpoint(pack_tree({**good, "rounds_json": np.frombuffer(b"[{}]", np.uint8)}))
    with pytest.raises(PayloadError, match=r"holds \? round records for round 2"):
        decode_checkpoint(pack_tree({**good, "rounds_json": np.frombuffer(b'{"a": 1}', np.uint8)}))
    with pytest.raises(PayloadError, match="not JSON: JSONDecodeError"):
        decode_checkpoint(pack_tree({**good, "rounds_json": np.frombuffer(b"[", np.uint8)}))
    with pytest.raises(FedsqueezeError, match="cannot checkpoint the run"):
        encode_checkpoint(config={}, round_=0, server_state={"x": object()}, client_states={}, rounds=[])
    (tmp_path / "checkpoint").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match=f"the checkpoint '{tmp_path / 'checkpoint'}' is unreadable"):
        load_checkpoint(tmp_path)
