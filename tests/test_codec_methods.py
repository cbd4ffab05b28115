"""Codec composition with tensor methods: options, the compressed baselines and FedSZ end to end."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tiny_config
from handmade import assert_accuracy_is_real

from fedsqueeze.codecs import CodecContext, decode_tensors, encode_tensors
from fedsqueeze.errors import ConfigError
from fedsqueeze.methods import get_method
from fedsqueeze.methods.base import RoundContext
from fedsqueeze.methods.updates import TensorUpdate
from fedsqueeze.methods.weights import read_weights
from fedsqueeze.runtime import run_local
from fedsqueeze.task import build_task


@pytest.fixture(scope="module")
def make():
    """Build a method on one shared tiny task (FedAvg-like methods all train every tensor)."""
    task = build_task(tiny_config())

    def build(cfg):
        method = get_method(cfg.method)(cfg)
        method.setup(task)
        return method

    return build


def test_codec_options_reach_the_codecs(tiny_cfg):
    cfg = tiny_cfg(
        method="fedavg",
        options={"uplink_codec": "sz3", "downlink_codec": "zstd", "sz3_bound": 1e-3, "sz3_mode": "abs", "downlink_zstd_level": 9},
    )
    m = get_method("fedavg")(cfg)
    assert (m.up_codec.codec_id, m.up_codec.opts.bound, m.up_codec.opts.mode) == ("sz3", 1e-3, "abs")
    assert (m.down_codec.codec_id, m.down_codec.opts.level) == ("zstd", 9)
    fedsz = get_method("fedsz")(tiny_cfg(method="fedsz"))
    assert fedsz.up_codec.opts.bound == 2e-2 and fedsz.up_codec.opts.name_filter == "weight"
    assert get_method("fedsz")(tiny_cfg(method="fedsz", options={"sz3_bound": 0.1})).up_codec.opts.bound == 0.1


@pytest.mark.parametrize(
    "options, match",
    [
        ({"uplink_codec": "sz3", "sz3_bund": 1e-2}, "did you mean 'bound'"),  # typo in a codec option
        ({"topk_k": 0.1}, "which either direction does not use"),  # codec not in use
        ({"uplink_codec": "sz3", "downlink_sz3_bound": 0.1}, "which the downlink does not use"),
        ({"uplink_codec": "sz4"}, "option .uplink_codec. of method .fedavg. must be one of: .*raw"),
        ({"downlink_codec": "topk"}, "downlink_codec='topk' is meant for updates, not model weights"),
        ({"downlink_codec": "sz4"}, "option .downlink_codec. of method .fedavg. must be one of: .*raw"),
        ({"uplink_codec": "qsgd", "qsgd_levels": "lots"}, "option .levels. of codec .qsgd. must be an integer"),
        ({"uplnk_codec": "sz3"}, "did you mean 'uplink_codec'"),
    ],
)
def test_bad_codec_options_are_config_errors(tiny_cfg, options, match):
    with pytest.raises(ConfigError, match=match):
        get_method("fedavg")(tiny_cfg(method="fedavg", options=options))


@pytest.mark.parametrize("method", ["fedsz", "topk", "qsgd", "signsgd", "eden"])
def test_compressed_methods_payload_round_trips(make, tiny_cfg, method):
    m = make(tiny_cfg(method=method))
    state, ctx = m.init_server(), RoundContext(round=1, rounds=1, seed=0)
    out = m.client_update(m.downlink(state, ctx, 0), 0, m.init_client(0), ctx)
    update = m.decode_update(out.payload, 0, state, ctx)
    assert update.n > 0 and set(update.delta) == set(m.names)
    # the payload holds far fewer bytes than float32 would
    assert len(out.payload) * 8 / m.trainable_params() < 8
    if method in ("topk", "signsgd"):
        assert out.state and any(k.startswith("ef:") for k in out.state)  # error-feedback memory kept


def test_fedsz_compress_weights_sends_weights_and_recovers_the_update(make, tiny_cfg):
    m = make(tiny_cfg(method="fedsz", options={"compress_weights": True, "sz3_bound": 1e-4, "sz3_mode": "abs"}))
    state, ctx = m.init_server(), RoundContext(round=1, rounds=1, seed=0)
    out = m.client_update(m.downlink(state, ctx, 0), 0, None, ctx)
    sent, _ = decode_tensors(out.payload)
    trained = read_weights(m.named)
    delta = m.decode_update(out.payload, 0, state, ctx).delta
    for name in m.names:
        np.testing.assert_allclose(sent[name], trained[name], rtol=0, atol=1.01e-4)  # the weights travel
        np.testing.assert_allclose(delta[name], trained[name] - state["weights"][name], rtol=0, atol=1.1e-4)


def test_fedsz_runs_end_to_end_with_a_compressed_downlink(tiny_cfg):
    cfg = tiny_cfg(method="fedsz", options={"downlink_codec": "fp16"})
    res = run_local(cfg, show_progress=False)
    fedavg_bpp = 32.0
    for r in res["rounds"]:
        assert r["uplink_bpp"] < fedavg_bpp / 4
        assert 16.0 < r["downlink_bpp"] < 16.2
    assert_accuracy_is_real(cfg, res)


def test_head_with_lossless_downlink_is_exact(tiny_cfg):
    a = run_local(tiny_cfg(method="head", options={"downlink_codec": "zstd", "uplink_codec": "zstd"}), show_progress=False)
    b = run_local(tiny_cfg(method="head"), show_progress=False)
    assert [r["accuracy"] for r in a["rounds"]] == [r["accuracy"] for r in b["rounds"]]
    assert a["rounds"][0]["uplink_bytes"] < b["rounds"][0]["uplink_bytes"]


def test_sz3_downlink_on_weights_stays_within_bound(make, tiny_cfg):
    m = make(tiny_cfg(method="fedavg", options={"downlink_codec": "sz3", "sz3_mode": "abs", "sz3_bound": 1e-3}))
    state = m.init_server()
    msg = m.downlink(state, RoundContext(round=1, rounds=1, seed=0), 0)
    weights, _ = decode_tensors(msg, CodecContext(max_elements=m.max_elements))
    for n in m.names:
        assert np.abs(weights[n] - state["weights"][n]).max() <= 1e-3 * (1 + 1e-6)
    assert len(msg) < len(encode_tensors(m.down_codec.__class__(), {}, CodecContext())) + 4 * m.max_elements


def test_downlink_is_encoded_once_per_round_and_follows_aggregation(make, tiny_cfg):
    m = make(tiny_cfg(method="fedavg"))
    state = m.init_server()
    ctx = RoundContext(round=1, rounds=2, seed=0)
    first = m.downlink(state, ctx, 0)
    assert m.downlink(state, ctx, 1) is first  # one encoding serves every client of the round
    delta = {n: np.full_like(a, 0.5) for n, a in state["weights"].items()}
    state, _ = m.aggregate(state, {0: TensorUpdate(delta, 1)}, ctx)
    after, _ = decode_tensors(m.downlink(state, ctx, 0), CodecContext(max_elements=m.max_elements))
    assert all(np.array_equal(after[n], state["weights"][n]) for n in m.names)
    assert m.downlink(state, RoundContext(round=2, rounds=2, seed=0), 0) != first


def test_downlink_memo_never_serves_a_stale_encoding(make, tiny_cfg):
    m = make(tiny_cfg(method="head"))
    state = m.init_server()
    ctx = RoundContext(round=1, rounds=2, seed=0)
    first = m.downlink(state, ctx, 0)
    name = m.names[0]
    state["weights"][name][...] += 1.0  # changed in place, same round: the memo's digest must notice
    after, _ = decode_tensors(m.downlink(state, ctx, 1), CodecContext(max_elements=m.max_elements))
    assert np.array_equal(after[name], state["weights"][name])
    fresh = make(tiny_cfg(method="head"))  # another method object on the edited state: the same bytes
    assert fresh.downlink(state, ctx, 0) == m.downlink(state, ctx, 0) != first
