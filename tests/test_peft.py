"""FedPEFT methods: what trains, what travels, and that the payloads round-trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from handmade import assert_accuracy_is_real

from fedsqueeze.codecs import decode_tensors
from fedsqueeze.errors import ConfigError
from fedsqueeze.methods import RoundContext
from fedsqueeze.methods.weights import read_weights
from fedsqueeze.runtime import run_local
from fedsqueeze.runtime.local import prepare, run_round

PEFT_METHODS = ["bitfit", "lora", "adapter", "prompt", "ia3"]
TINY_HEAD = 32 * 26 + 26  # tiny model: hidden 32, wordnet: 26 classes


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", PEFT_METHODS)
def test_payload_round_trips_only_the_tuner_moves_and_bpp_is_32_per_trainable(tiny_cfg, name):
    cfg = tiny_cfg(method=name, local_steps=3)
    method, task = prepare(cfg)
    d, t = task.model_params, method.trainable_params()
    assert TINY_HEAD < t < 0.01 * d  # head plus a small tuner, a tiny share of the model
    frozen = {n: p.detach().clone() for n, p in task.model.named_parameters() if n not in set(method.names)}
    assert frozen and all(not task.model.get_parameter(n).requires_grad for n in frozen)
    state = method.init_server()
    before = {n: a.copy() for n, a in state["weights"].items()}
    ctx = RoundContext(round=1, rounds=1, seed=0)

    message = method.downlink(state, ctx, 0)
    down, _ = decode_tensors(message)
    assert set(down) == set(method.names)  # only the trainable tensors travel down, never the backbone
    out = method.client_update(message, 0, None, ctx)
    update = method.decode_update(out.payload, 0, state, ctx)
    assert set(update.delta) == set(method.names) and update.n == len(task.client_indices[0])
    # the decoded delta is exactly what the client's training did to its tensors
    after = read_weights(method.named)
    for n in method.names:
        np.testing.assert_array_equal(update.delta[n], after[n] - before[n])
    tuner = [n for n in method.names if not n.startswith("head.")]
    assert tuner and any(np.abs(update.delta[n]).max() > 0 for n in tuner)

    # a whole simulator round: bytes on the wire = 4 bytes per trainable parameter + a small header
    state, r = run_round(method, task, cfg, {"weights": before}, {}, ctx)
    per_client = r["uplink_bytes"] / r["clients_uploaded"]
    header = per_client - 4 * t
    assert 0 < header < 2500  # framing + JSON table of names/shapes, no tensor data
    assert r["uplink_bpp"] == pytest.approx(32 * t / d + header * 8 / d)
    assert r["downlink_bytes"] / r["clients"] == pytest.approx(per_client, abs=200)  # same tensors down
    assert r["clients_aggregated"] == 2 and (r["accuracy"], r["loss"]) == method.evaluate(state)
    for n, p in task.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"{name} changed frozen weight {n}"


def test_adapter_starts_as_the_pretrained_function(tiny_cfg):
    from fedsqueeze.task import build_task
    from fedsqueeze.training import batch_inputs

    cfg = tiny_cfg(method="adapter")
    task = build_task(cfg)
    batch = batch_inputs(task.test, torch.arange(8))
    plain = task.model(**batch)
    method, adapted = prepare(cfg)
    assert method.trainable_params() == TINY_HEAD + 2 * 2 * (2 * 32 * 16 + 16 + 32)  # 2 layers × 2 adapters
    torch.testing.assert_close(adapted.model(**batch), plain)


@pytest.mark.parametrize("mode", ["prompt", "prefix"])
def test_prompt_keeps_pooling_over_real_tokens(tiny_cfg, mode):
    from fedsqueeze.training import batch_inputs

    method, task = prepare(tiny_cfg(method="prompt", options={"mode": mode, "virtual_tokens": 4}))
    batch = batch_inputs(task.test, torch.arange(8))
    hidden = task.model.backbone(**batch).last_hidden_state
    assert hidden.shape[:2] == batch["input_ids"].shape
    per_layer = 2 * 2 * 32 if mode == "prefix" else 32  # prefix: keys and values in each of 2 layers
    assert method.trainable_params() == TINY_HEAD + 4 * per_layer


def test_lora_options_reach_peft(tiny_cfg):
    method, _ = prepare(tiny_cfg(method="lora", options={"rank": 2, "target_modules": "query,key,value"}))
    # 2 layers × 3 projections × (A: 2×32 + B: 32×2)
    assert method.trainable_params() == TINY_HEAD + 2 * 3 * 2 * 2 * 32
    with pytest.raises(ConfigError):
        prepare(tiny_cfg(method="lora", options={"target_modules": "no_such_layer"}))


def test_prompt_refuses_images(tiny_cfg):
    with pytest.raises(ConfigError, match="text"):
        prepare(tiny_cfg(method="prompt", dataset="fashion-mnist"))


def test_lora_non_iid_with_dropout(tiny_cfg):
    cfg = tiny_cfg(method="lora", rounds=3, clients=6, clients_per_round=3, partition="dirichlet", alpha=0.1, dropout=0.4)
    res = run_local(cfg, show_progress=False)
    assert sum(len(r["dropped"]) for r in res["rounds"]) > 0
    for r in res["rounds"]:
        assert r["clients_aggregated"] == r["clients"] - len(r["dropped"])
    assert_accuracy_is_real(cfg, res)


def test_lora_uplink_goes_through_any_registered_codec(tiny_cfg):
    """A PEFT payload takes the shared codec path: a new codec needs no PEFT-specific code."""
    from fedsqueeze.codecs import CODECS, Codec, register_codec
    from fedsqueeze.codecs.base import check_table, tensor_table

    class Half(Codec):  # a stand-in lossy codec: float16 bodies
        codec_id = "test-half"
        lossless = False

        # the table describes what decode returns (float32, checked against what the server expects);
        # the body holds the float16 values
        def encode(self, tensors, ctx):
            half = {n: a.astype(np.float16) for n, a in tensors.items()}
            return {"tensors": tensor_table(tensors)}, b"".join(a.tobytes() for a in half.values())

        def decode(self, meta, body, ctx):
            rows = check_table(meta.get("tensors"), ctx)
            out, pos = {}, 0
            for name, _dt, shape, numel in rows:
                out[name] = np.frombuffer(body[pos : pos + 2 * numel], dtype="<f2").reshape(shape).astype(np.float32)
                pos += 2 * numel
            return out

    register_codec(Half)
    try:
        method, task = prepare(tiny_cfg(method="lora", options={"uplink_codec": "test-half"}))
        ctx = RoundContext(round=1, rounds=1, seed=0)
        state = method.init_server()
        state, r = run_round(method, task, method.cfg, state, {}, ctx)
        per_client = r["uplink_bytes"] / r["clients_uploaded"]
        assert 2 * method.trainable_params() < per_client < 2 * method.trainable_params() + 2500
        assert r["clients_aggregated"] == 2
    finally:
        CODECS.pop("test-half", None)
