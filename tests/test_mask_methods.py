"""fedpm, deltamask, deltamask-exact: masked model, payload round trips, corrupt payloads, end to end."""

import numpy as np
import pytest
import torch
from handmade import assert_accuracy_is_real

from fedsqueeze.errors import PayloadError
from fedsqueeze.masking import MaskedModel, select_masked, shared_uniforms, stratified_uniforms
from fedsqueeze.methods import RoundContext, get_method
from fedsqueeze.runtime import run_local
from fedsqueeze.task import build_task

MASK_METHODS = ["fedpm", "deltamask", "deltamask-exact"]


@pytest.fixture(scope="module")
def tiny_task():
    from conftest import tiny_config

    return build_task(tiny_config(out="/tmp/unused"))


def _method(name, task, **options):
    from conftest import tiny_config

    cfg = tiny_config(method=name, out="/tmp/unused")
    cfg.options.update(options)
    method = get_method(name)(cfg)
    method.setup(task)
    return method


def test_masked_forward_leaves_the_model_untouched(tiny_task):
    model = tiny_task.model
    layout = select_masked(model)
    masked = MaskedModel(model, layout)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = tiny_task.test.subset(list(range(8)))
    inputs = {k: v for k, v in batch.inputs.items()}
    with torch.no_grad():
        plain = model(**inputs)
        ones = masked.forward(torch.ones(layout.total), inputs)
        zeros = masked.forward(torch.zeros(layout.total), inputs)
    torch.testing.assert_close(ones, plain)
    assert not torch.allclose(zeros, plain)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    assert layout.total == sum(m.weight.numel() for m in model.backbone.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("stratify", [True, False])
@pytest.mark.parametrize("name", MASK_METHODS)
def test_payload_round_trip_rebuilds_the_client_mask(tiny_task, name, stratify):
    opts = {"kappa_start": 0.5, "kappa_end": 0.5} if name != "fedpm" else {}
    method = _method(name, tiny_task, stratify=stratify, **opts)
    state = method.init_server()
    ctx = RoundContext(round=1, rounds=2, seed=0)
    out = method.client_update(method.downlink(state, ctx, 1), 1, None, ctx)
    update = method.decode_update(out.payload, 1, state, ctx)
    # the client's own mask, redrawn from its final probabilities is not returned: compare via statistics
    theta_start = method.start_theta(method.theta_of(state["theta_sym"], state["levels"]))
    mask, stats = method.rebuild_mask(update, theta_start, None, 1, ctx)
    ref = method.server_uniforms(ctx, 1) < theta_start
    if name == "fedpm":
        assert mask.sum() > 0 and set(np.unique(mask)) <= {0, 1}
    else:
        changed = np.flatnonzero(mask.astype(bool) != ref)
        assert stats["keys"] == out.metrics["keys"] > 0
        if name == "deltamask-exact":
            assert stats["fp_flips"] == 0 and changed.size == stats["keys"]
        else:
            assert changed.size == stats["keys"] + stats["fp_flips"]
    for n in method.head_names:
        assert np.abs(update.head_delta[n]).sum() > 0
    new_state, metrics = method.aggregate(state, {1: update}, ctx)
    if name == "fedpm":  # Beta rule: θ = Σm / K, one client ⇒ θ ∈ {0, 1}
        assert new_state["levels"] == 1 and set(np.unique(new_state["theta_sym"])) <= {0, 1}
    else:  # delta rule: θ moves by ±1 only where the client's mask left its reference
        theta = method.theta_of(new_state["theta_sym"], new_state["levels"])
        moved = mask.astype(float) - ref
        np.testing.assert_allclose(theta, np.clip(theta_start + moved, 0, 1), atol=0.5 / 255 + 1e-6)
    if name != "fedpm":
        assert "fp_flips" in metrics


@pytest.mark.parametrize("coder", ["levels", "context"])
def test_fedpm_mask_decodes_exactly(tiny_task, coder):
    from fedsqueeze.methods.updates import MaskUpdate

    method = _method("fedpm", tiny_task, coder=coder)
    state = method.init_server()
    ctx = RoundContext(round=1, rounds=1, seed=3)
    sym = state["theta_sym"]
    theta_start = method.start_theta(method.theta_of(sym, 255))
    rng = np.random.default_rng(0)
    mask = rng.random(method.n) < 0.9
    # encode_mask draws u < θ; with θ in {0, 1} the mask is exactly `mask`
    meta, body, _ = method.encode_mask(method.server_uniforms(ctx, 0), mask.astype(np.float32), theta_start, sym, 255, ctx)
    code = method.decode_mask(meta, memoryview(body), state, ctx, 0)
    rebuilt, _ = method.rebuild_mask(MaskUpdate(1, {}, code), theta_start, None, 0, ctx)
    np.testing.assert_array_equal(rebuilt.astype(bool), mask)


@pytest.mark.parametrize("name", MASK_METHODS)
def test_corrupt_payloads_raise_payload_error(tiny_task, name):
    method = _method(name, tiny_task)
    state = method.init_server()
    ctx = RoundContext(round=1, rounds=1, seed=0)
    message = method.downlink(state, ctx, 0)
    payload = method.client_update(message, 0, None, ctx).payload
    bad = bytearray(payload)
    bad[len(bad) // 2] ^= 0xFF
    for broken in (bytes(bad), payload[:-5], payload[:40], b""):
        with pytest.raises(PayloadError):
            method.decode_update(broken, 0, state, ctx)
    with pytest.raises(PayloadError):
        method.decode_update(message, 0, state, ctx)  # a server message is not a client update
    with pytest.raises(PayloadError):
        method.decode_downlink(payload)


@pytest.mark.parametrize("name", MASK_METHODS)
def test_runs_end_to_end_with_coded_downlink(tiny_cfg, name):
    cfg = tiny_cfg(method=name, rounds=2)
    res = run_local(cfg, show_progress=False)
    assert len(res["rounds"]) == 2
    assert_accuracy_is_real(cfg, res)
    for r in res["rounds"]:
        assert r["clients_aggregated"] == 2
        assert 0 < r["uplink_bpp"] < 1.0 and 0 < r["downlink_bpp"] < 1.0
        if name != "fedpm":
            assert "fp_flips" in r and "keys" in r
    if name == "deltamask-exact":
        assert all(r["fp_flips"] == 0 for r in res["rounds"])


def test_same_seed_same_masks(tiny_cfg):
    a = run_local(tiny_cfg(method="deltamask", rounds=1), show_progress=False)
    b = run_local(tiny_cfg(method="deltamask", rounds=1), show_progress=False)
    strip = lambda res: [(r["accuracy"], r["uplink_bytes"], r["fp_flips"]) for r in res["rounds"]]
    assert strip(a) == strip(b)


def test_stratified_uniforms_are_uniform_and_keep_counts_at_k_theta():
    n, k = 200_000, 5
    theta = np.random.default_rng(3).random(n).astype(np.float32)
    us = [stratified_uniforms(np.random.default_rng(7), n, j, k) for j in range(k)]
    for u in us:  # each client's draw is still uniform on [0, 1)
        assert u.min() >= 0 and u.max() < 1
        assert np.abs(np.histogram(u, bins=10, range=(0, 1))[0] / n - 0.1).max() < 0.005
    kept = sum((u < theta).astype(int) for u in us)
    assert np.all((kept >= np.floor(k * theta)) & (kept <= np.ceil(k * theta)))
    independent = sum((shared_uniforms(np.random.default_rng(j), n) < theta).astype(int) for j in range(k))
    assert np.mean(np.abs(independent - k * theta) > 1) > 0.1  # Binomial counts wander far more


def test_strata_are_a_pure_function_of_the_participants(tiny_task):
    method = _method("deltamask", tiny_task, stratify=True)
    state = method.init_server()
    ctx = RoundContext(round=1, rounds=2, seed=0, participants=(2, 4, 7))
    strata = [json_meta(method.downlink(state, ctx, c))["stratum"] for c in (4, 2, 7)]
    assert strata == [[1, 3], [0, 3], [2, 3]]  # the index among the sorted participants, whatever the call order
    assert json_meta(method.downlink(state, ctx, 2))["stratum"] == [0, 3]  # asked again: same stratum
    with pytest.raises(PayloadError, match="no stratum"):
        method.server_uniforms(ctx, 9)  # not a participant
    bare = RoundContext(round=1, rounds=2, seed=0)  # no participants: K = clients_per_round, k = client mod K
    k = method.cfg.clients_per_round
    assert [method.stratum(bare, c) for c in (4, 2, 7)] == [(4 % k, k), (2 % k, k), (7 % k, k)]


def test_mask_downlink_memo_follows_the_state_not_the_round(tiny_task):
    method = _method("fedpm", tiny_task, downlink="full")  # the delta downlink moves its view once a round
    state = method.init_server()
    ctx = RoundContext(round=1, rounds=2, seed=0)
    first = method.downlink(state, ctx, 0)
    state["theta_sym"][:10] = 0  # edited within the round: the next message must carry it
    sym, levels, _, _ = method.decode_downlink(method.downlink(state, ctx, 1))
    assert np.array_equal(sym, state["theta_sym"]) and method.downlink(state, ctx, 1) != first


def json_meta(message: bytes) -> dict:
    from fedsqueeze.codecs.framing import unframe

    return unframe(message)[1]


@pytest.mark.parametrize("how", ["threshold", "sample", "expected"])
def test_eval_masks(tiny_task, how):
    method = _method("fedpm", tiny_task, eval_mask=how)
    state = method.init_server()
    state["theta_sym"][: method.n // 2] = 0  # half the positions at θ = 0, the rest at theta_init
    theta = method.theta_of(state["theta_sym"], state["levels"])
    mask = method.eval_mask(state).numpy()
    if how == "expected":
        np.testing.assert_array_equal(mask, theta)
    else:
        assert set(np.unique(mask)) <= {0.0, 1.0}
        dropped = mask[: method.n // 2].mean()  # a draw keeps θ=0 positions at the clip probability
        assert dropped == 0 if how == "threshold" else 0 < dropped < 2 * method.opts.clip_eps
    acc, loss = method.evaluate(state)
    # independently: a copy of the model whose masked weights are multiplied by the mask in place
    import copy

    from fedsqueeze.training import evaluate

    model = copy.deepcopy(tiny_task.model)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for w_name, off, shape in zip(method.layout.names, method.layout.offsets, method.layout.shapes):
            named[w_name].mul_(torch.from_numpy(mask[off : off + int(np.prod(shape))].reshape(shape)))
    acc2, loss2 = evaluate(model, tiny_task.test, method.cfg.eval_batch_size)
    assert acc == acc2 and loss == pytest.approx(loss2, rel=1e-5)


@pytest.mark.parametrize("name", MASK_METHODS)
def test_delta_aggregation_moves_theta_only_where_masks_left_the_reference(tiny_task, name):
    opts = {"kappa_start": 0.5, "kappa_end": 0.5} if name != "fedpm" else {}
    method = _method(name, tiny_task, aggregate="delta", **opts)
    state = method.init_server()
    ctx = RoundContext(round=1, rounds=2, seed=0)
    theta_start = method.start_theta(method.theta_of(state["theta_sym"], state["levels"]))
    updates, moved = {}, np.zeros(method.n)
    for c in (0, 1):
        out = method.client_update(method.downlink(state, ctx, c), c, None, ctx)
        updates[c] = method.decode_update(out.payload, c, state, ctx)
        ref = method.server_uniforms(ctx, c) < theta_start
        mask, _ = method.rebuild_mask(updates[c], theta_start, ref, c, ctx)
        moved += mask.astype(float) - ref
    assert np.count_nonzero(moved) > 0
    sym_before = state["theta_sym"].copy()
    new, _ = method.aggregate(state, updates, ctx)
    theta = method.theta_of(new["theta_sym"], new["levels"])
    expected = np.clip(theta_start + moved / 2, 0, 1)
    assert np.abs(theta - expected).max() <= 0.5 / 255 + 1e-6  # uint8 levels
    still = moved == 0
    assert np.array_equal(new["theta_sym"][still], sym_before[still])  # no sampling noise where nobody moved
    with pytest.raises(ValueError, match="carry_priors"):
        _method(name, tiny_task, aggregate="delta", carry_priors=True)
