"""Server strategies pinned by hand: server optimizers, robust rules, FedProx (see docs/strategies.md).

Each rule's expected value is recomputed here in float64 from the formulas of its paper, on
hand-made 2- to 5-client cases that go through the method's real payloads and ``decode_update``.
"""

from __future__ import annotations

import numpy as np
import pytest
from handmade import build, shared_task

from fedsqueeze.codecs import CodecContext, encode_tensors
from fedsqueeze.errors import ConfigError
from fedsqueeze.methods.base import RoundContext
from fedsqueeze.methods.robust import SCALAR_RULES, RobustRule, cap_flips, krum_scores, trimmed_votes
from fedsqueeze.methods.server_opt import SCHEDULES, ServerOpt
from fedsqueeze.methods.updates import weighted_mean, weighted_mean_f32


@pytest.fixture(scope="module")
def task():
    return shared_task()


def _round(m, state, deltas, counts, round_):
    """Aggregate one round of the hand-made ``deltas`` (sent as the method's real payloads)."""
    ctx = RoundContext(round=round_, rounds=2, seed=1)
    updates = {}
    for c, (d, n) in enumerate(zip(deltas, counts)):
        payload = encode_tensors(m.up_codec, d, CodecContext(seed=ctx.seed_for(c, "uplink")), n=n)
        updates[c] = m.decode_update(payload, c, state, ctx)
    return m.aggregate(state, updates, ctx)


def _hand(m, values):
    """Every trainable tensor filled with one hand-chosen value per client."""
    return [{n: np.full(m.shapes[n], v, dtype=np.float32) for n in m.names} for v in values]


# two rounds of two clients (3 and 1 examples): weighted means 0.25 then −0.5
ROUNDS = [([0.4, -0.2], [3, 1]), ([-0.6, -0.2], [3, 1])]
MEANS = [0.25, -0.5]


def _expected(rule, eta, *, mu=0.9, b1=0.9, b2=0.99, tau=1e-3):
    """x after the two rounds from x = 0, by the published update rules (scalars: all coordinates alike)."""
    x, m, v = 0.0, 0.0, tau**2
    for d in MEANS:
        if rule == "none":
            x += eta * d
        elif rule == "avgm":
            m = mu * m + d
            x += eta * m
        else:
            m = b1 * m + (1 - b1) * d
            if rule == "adagrad":
                v = v + d * d
            elif rule == "adam":
                v = b2 * v + (1 - b2) * d * d
            else:  # yogi
                v = v - (1 - b2) * d * d * np.sign(v - d * d)
            x += eta * m / (np.sqrt(v) + tau)
    return x


@pytest.mark.parametrize(
    "rule,opts",
    [
        ("none", {"server_lr": 0.5}),
        ("avgm", {"server_lr": 0.5, "server_momentum": 0.7}),
        ("adagrad", {"server_lr": 0.1, "beta1": 0.5, "tau": 0.01}),
        ("adam", {"server_lr": 0.1, "beta1": 0.5, "beta2": 0.9, "tau": 0.01}),
        ("yogi", {"server_lr": 0.1, "beta1": 0.5, "beta2": 0.9, "tau": 0.01}),
    ],
)
def test_server_optimizer_follows_its_rule_over_two_rounds(task, rule, opts):
    m = build("head", task, server_opt=rule, **opts)
    state = m.init_server()
    start = {n: a.astype(np.float64) for n, a in state["weights"].items()}
    for r, (values, counts) in enumerate(ROUNDS, start=1):
        state, _ = _round(m, state, _hand(m, values), counts, r)
    kw = {
        k: v
        for k, v in {"mu": opts.get("server_momentum"), "b1": opts.get("beta1"), "b2": opts.get("beta2"), "tau": opts.get("tau")}.items()
        if v
    }
    x = _expected(rule, opts["server_lr"], **kw)
    for n in m.names:
        np.testing.assert_allclose(state["weights"][n], start[n] + x, rtol=1e-5, atol=1e-6)
    if rule != "none":  # the state is numpy arrays only (checkpointable), named like the weights
        assert set(state["server_opt"]["m"]) == set(m.names)
        assert all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in state["server_opt"]["m"].values())


def test_adaptive_default_server_lr_is_small(task):
    assert build("head", task, server_opt="adam").server_opt.eta == 1e-2
    assert build("head", task).server_opt.eta == 1.0


def test_yogi_differs_from_adam_where_v_exceeds_the_square(task):
    # v0 = τ² = 1 > Δ² = 0.25: adam shrinks v by (1−β2)(v−Δ²), yogi by (1−β2)Δ² → different steps
    a = _expected("adam", 1.0, b1=0.0, b2=0.5, tau=1.0)
    y = _expected("yogi", 1.0, b1=0.0, b2=0.5, tau=1.0)
    assert abs(a - y) > 1e-3


# ---- robust tensor rules ---------------------------------------------------------------------------

FOUR = [0.1, 0.2, 0.3, 9.0]  # three honest clients and one outlier (the tiny task has 4 clients)
COUNTS = [1, 2, 3, 4]


@pytest.mark.parametrize(
    "opts,expected",
    [
        ({}, sum(v * n for v, n in zip(FOUR, COUNTS)) / sum(COUNTS)),  # weighted mean: the outlier dominates
        ({"robust": "median"}, 0.25),
        ({"robust": "trimmed_mean", "trim_beta": 0.25}, (0.2 + 0.3) / 2),  # ⌊0.25·4⌋ = 1 from each end
        ({"robust": "trimmed_mean", "trim_beta": 0.2}, sum(FOUR) / 4),  # ⌊0.8⌋ = 0 trimmed
    ],
)
def test_coordinate_rules(task, opts, expected):
    m = build("head", task, server_lr=1.0, **opts)
    state = m.init_server()
    start = {n: a.astype(np.float64) for n, a in state["weights"].items()}
    state, _ = _round(m, state, _hand(m, FOUR), COUNTS, 1)
    for n in m.names:
        np.testing.assert_allclose(state["weights"][n], start[n] + expected, rtol=1e-5, atol=1e-6)


def test_the_mean_rule_is_exact_on_hand_values_and_float32():
    deltas = [{"w": np.array([1.0, 2.0, 3.0], np.float32)}, {"w": np.array([4.0, 5.0, 6.0], np.float32)}]
    out, _ = RobustRule("mean").combine(deltas, [1, 3])  # weights 1/4 and 3/4
    assert out["w"].dtype == np.float32
    np.testing.assert_array_equal(out["w"], [3.25, 4.25, 5.25])


@pytest.mark.parametrize("block", [1, 2, 7, 1 << 18])
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 5), (64, 33)])
def test_weighted_mean_f32_is_the_float64_mean_cast_bit_for_bit(shape, block):
    rng = np.random.default_rng(7)
    arrays = [(rng.standard_normal(shape) * 1e-3).astype(np.float32) for _ in range(4)]
    if arrays[0].size:
        arrays[0].reshape(-1)[0] = 3.4e38  # near float32's max: the float64 sum keeps it finite
        arrays[1].reshape(-1)[0] = 3.4e38
    counts = [3, 100, 1, 17]
    got = weighted_mean_f32(arrays, counts, block=block)
    want = weighted_mean(arrays, counts).astype(np.float32)
    assert got.shape == shape and got.dtype == np.float32
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))  # the same bits, not only close


def test_weighted_mean_f32_holds_blocks_not_float64_copies_of_the_tensor():
    import tracemalloc

    n, block = 1_000_000, 1 << 14
    arrays = [np.full(n, k, np.float32) for k in range(5)]
    weighted_mean_f32(arrays, [1] * 5, block=block)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    out = weighted_mean_f32(arrays, [1, 1, 1, 1, 1], block=block)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    assert np.array_equal(out, np.full(n, 2.0, np.float32))
    # the float32 result, two float64 blocks and numpy's 8192-value float64 cast buffer (64 KiB), plus
    # 64 KiB of slack; the whole-tensor float64 mean alone would be 8 bytes a value
    assert peak <= 4 * n + 2 * 8 * block + 2 * 65536, peak
    with pytest.raises(ValueError, match="block"):
        weighted_mean_f32(arrays, [1] * 5, block=0)


def test_median_is_per_coordinate_and_averages_the_middle_pair():
    deltas = [{"w": np.array([1.0, 10.0], np.float32)}, {"w": np.array([2.0, 0.0], np.float32)},
              {"w": np.array([5.0, 3.0], np.float32)}, {"w": np.array([7.0, 4.0], np.float32)}]  # fmt: skip
    out, _ = RobustRule("median").combine(deltas, [1, 1, 1, 1])
    np.testing.assert_array_equal(out["w"], [3.5, 3.5])


def test_krum_scores_and_selection():
    pts = [0.0, 1.0, 3.0, 10.0]  # one coordinate per client, in two tensors (distances add up)
    deltas = [{"a": np.array([p], np.float32), "b": np.array([0.0], np.float32)} for p in pts]
    # k=4, f=1: each client's 4−1−2 = 1 nearest other
    np.testing.assert_allclose(krum_scores(deltas, 1), [1.0, 1.0, 4.0, 49.0])
    out, metrics = RobustRule("krum", f=1).combine(deltas, [1, 1, 1, 1])
    assert out["a"][0] == 0.0 and metrics["krum_first"] == 0  # tie between 0 and 1: the first
    # f=0: 2 nearest; scores 0:1+9, 1:1+4, 2:4+9, 3:49+81 → multi_krum m=0 keeps k−f=4, m=2 keeps {1,0}
    np.testing.assert_allclose(krum_scores(deltas, 0), [10.0, 5.0, 13.0, 130.0])
    out, metrics = RobustRule("multi_krum", f=0, m=2).combine(deltas, [1, 3, 1, 1])
    assert metrics["krum_selected"] == 2
    np.testing.assert_allclose(out["a"], [(0.0 * 1 + 1.0 * 3) / 4])


def test_norm_bound_clips_each_update_before_the_rule():
    deltas = [{"w": np.array([3.0, 4.0], np.float32)}, {"w": np.array([0.3, 0.4], np.float32)}]
    out, metrics = RobustRule("mean", norm_bound=1.0).combine(deltas, [1, 1])
    np.testing.assert_allclose(out["w"], [(0.6 + 0.3) / 2, (0.8 + 0.4) / 2], rtol=1e-6)
    assert metrics["norm_bounded"] == 1


def test_robust_rules_refuse_dp(task):
    with pytest.raises(ConfigError, match="do not compose"):
        build("head", task, robust="median", dp_clip=1.0)


# ---- ZO scalars and mask votes ----------------------------------------------------------------------


def test_scalar_rules():
    s = np.array([[1.0, -4.0], [2.0, 0.0], [3.0, 1.0], [1e4, 2.0], [4.0, 3.0]], np.float32)
    np.testing.assert_allclose(SCALAR_RULES["mean"](s, 0.2, 1), s.mean(axis=0))
    np.testing.assert_allclose(SCALAR_RULES["median"](s, 0.2, 1), [3.0, 1.0])
    np.testing.assert_allclose(SCALAR_RULES["trimmed_mean"](s, 0.2, 1), [3.0, 1.0])  # middle three: (2+3+4)/3, (0+1+2)/3


def test_mask_vote_rules():
    ref = np.array([1, 1, 0, 0], np.int32)
    all_flipped = 1 - ref
    capped, was = cap_flips(all_flipped, ref, 0.5)
    assert was and np.array_equal(capped, ref)
    one = np.array([0, 1, 0, 0], np.int32)
    assert np.array_equal(cap_flips(one, ref, 0.25)[0], one)  # 1 of 4 flips: at the cap, kept
    votes = np.array([[1, 0, 1], [1, 0, 0], [1, 1, 0], [0, 1, 1], [1, 1, 1]], np.int32)
    np.testing.assert_allclose(trimmed_votes(votes, 0.2), [3 * 5 / 3, 2 * 5 / 3, 2 * 5 / 3])


def test_decomfl_trimmed_mean_of_the_scalars(task):
    from fedsqueeze.methods.zo_wire import compact_frame

    m = build("decomfl", task, params="head", warm_start_rounds=0, perturbations=2, aggregate="trimmed_mean", trim_beta=0.25)
    state = m.init_server()
    ctx = RoundContext(round=1, rounds=2, seed=9)
    scale = {0: 1.0, 1: 2.0, 2: 3.0, 3: 1e4}  # one client sends huge scalars
    base = np.arange(m.k * m.p, dtype=np.float32).reshape(m.k, m.p) + 1
    body = {c: (base * s).astype("<f4").tobytes() for c, s in scale.items()}
    ups = {c: m.decode_update(compact_frame("decomfl-up", 1, [], b), c, state, ctx) for c, b in body.items()}
    state, _ = m.aggregate(state, ups, ctx)
    np.testing.assert_allclose(state["history"][-1]["scalars"], base * 2.5, rtol=1e-6)  # middle two of 1, 2, 3, 1e4


def _mask_round(m, keeps_of, ctx):
    """One round of fedpm/deltamask clients whose masks are ``keeps_of(ref)``; the new θ and θ_start."""
    from handmade import hand_head, mask_payload

    state = m.init_server()
    theta_start = m.start_theta(m.theta_of(state["theta_sym"], state["levels"]))
    ups, refs = {}, {}
    for c, make in keeps_of.items():
        refs[c] = m.server_uniforms(ctx, c) < theta_start
        ups[c] = m.decode_update(mask_payload(m, state, ctx, c, make(refs[c]), hand_head(m, c), 4), c, state, ctx)
    state, metrics = m.aggregate(state, ups, ctx)
    return state, theta_start, refs, metrics


def test_mask_flip_cap_ignores_a_client_that_flips_everything(task):
    m = build("fedpm", task, aggregate="delta", client_flip_cap=0.5)
    ctx = RoundContext(round=1, rounds=2, seed=4)
    few = np.arange(0, m.n, 97)

    def honest(ref):
        keep = ref.copy()
        keep[few] ^= True
        return keep

    state, theta_start, refs, metrics = _mask_round(m, {0: honest, 1: lambda ref: ~ref}, ctx)
    change = (honest(refs[0]).astype(np.float32) - refs[0]) / np.float32(2)  # client 1 votes "no change"
    expected = np.rint(np.clip(theta_start + change, 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(state["theta_sym"], expected)
    assert metrics["flip_capped"] == 0.5  # one of the two clients


def test_mask_trimmed_votes(task):
    m = build("fedpm", task, vote_trim=0.25)  # beta rule: θ = trimmed Σm / K
    ctx = RoundContext(round=1, rounds=2, seed=4)
    rng = np.random.default_rng(3)
    masks = {c: rng.random(m.n) < p for c, p in ((0, 0.9), (1, 0.8), (2, 0.7))}
    makers = {c: (lambda ref, k=k: k) for c, k in masks.items()}
    makers[3] = lambda ref: np.zeros(m.n, bool)  # an attacker votes to drop every weight
    state, _, _, _ = _mask_round(m, makers, ctx)
    votes = np.sort(np.stack([masks[0], masks[1], masks[2], np.zeros(m.n, bool)]).astype(np.float64), axis=0)
    expected = np.rint(votes[1:3].mean(axis=0) * 4)
    np.testing.assert_array_equal(state["theta_sym"].astype(np.int64), expected.astype(np.int64))


# ---- FedProx ----------------------------------------------------------------------------------------


def test_proximal_penalty_value():
    import torch

    from fedsqueeze.training import proximal_penalty

    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    penalty = proximal_penalty([w], 0.5)
    with torch.no_grad():
        w += torch.tensor([3.0, -4.0])
    assert float(penalty()) == pytest.approx(0.5 * 0.5 * 25.0)


@pytest.mark.parametrize("name", ["head", "bitfit"])
def test_prox_mu_keeps_the_local_model_near_the_global_one(task, name):
    from handmade import fresh

    from fedsqueeze.codecs import decode_tensors
    from fedsqueeze.methods.tensor import update_norm

    norms = []
    for mu in (0.0, 50.0):
        m = build(name, fresh(task), prox_mu=mu, optimizer="sgd")
        ctx = RoundContext(round=1, rounds=1, seed=0)
        out = m.client_update(m.downlink(m.init_server(), ctx, 0), 0, None, ctx)
        norms.append(update_norm(decode_tensors(out.payload)[0]))
    # same seeds, same data: without the term the two runs would be bit-identical; the term pulls towards the global model
    assert norms[1] < norms[0]


def test_methods_lists_every_strategy_rule_and_attack():
    from typer.testing import CliRunner

    from fedsqueeze.cli import app
    from fedsqueeze.config import ATTACKS
    from fedsqueeze.methods.robust import TENSOR_RULES
    from fedsqueeze.methods.server_opt import SERVER_OPTIMIZERS

    out = CliRunner().invoke(app, ["methods"], terminal_width=250).output
    settings = [f"server_opt={r}" for r in SERVER_OPTIMIZERS] + [f"robust={r}" for r in TENSOR_RULES] + [f"attack={a}" for a in ATTACKS]
    assert all(s in out for s in settings), [s for s in settings if s not in out]
    for opt in (
        "server_momentum",
        "trim_beta",
        "krum_f",
        "cclip_tau",
        "cclip_iters",
        "norm_bound",
        "prox_mu",
        "scaffold_control",
        "client_flip_cap",
        "vote_trim",
    ):
        assert opt in out
    for opt in ("attack_fraction", "grad_mean"):
        assert opt in out


def test_server_optimizer_state_survives_a_checkpoint(task):
    from fedsqueeze.runtime.checkpoint import decode_checkpoint, encode_checkpoint
    from fedsqueeze.runtime.engine import check_state_like

    m = build("head", task, server_opt="yogi")
    state = m.init_server()
    for r, (values, counts) in enumerate(ROUNDS, start=1):
        state, _ = _round(m, state, _hand(m, values), counts, r)
    data = encode_checkpoint(
        config={}, round_=2, server_state=state, client_states={}, rounds=[{"round": 1}, {"round": 2}], state_versions={}
    )
    back = decode_checkpoint(data).server_state
    check_state_like(back, m.init_server(), "server state")  # what a resume checks
    for part in ("m", "v"):
        assert all(np.array_equal(back["server_opt"][part][n], state["server_opt"][part][n]) for n in m.names)


# ---- server_lr_schedule -------------------------------------------------------------------------


def test_server_lr_schedules_by_hand():
    assert SCHEDULES == ("constant", "cosine", "exp")
    # cosine over T = 4 rounds: η·½(1 + cos(π·(t−1)/4)) = η·(1, ½ + √2/4, ½, ½ − √2/4)
    cos = ServerOpt("none", lr=0.5, schedule="cosine", rounds=4)
    expected = [0.5, 0.5 * (0.5 + 2**0.5 / 4), 0.25, 0.5 * (0.5 - 2**0.5 / 4)]
    assert [cos.eta_at(t) for t in (1, 2, 3, 4)] == pytest.approx(expected, rel=1e-15, abs=0)
    # exp: η·γ^(t−1) = 0.5, 0.125, 0.03125 for γ = 0.25
    ex = ServerOpt("avgm", lr=0.5, schedule="exp", decay=0.25)
    assert [ex.eta_at(t) for t in (1, 2, 3)] == [0.5, 0.125, 0.03125]
    # constant (the default) ignores the round; lr = 0 is still the rule's default η
    assert [ServerOpt("adam").eta_at(t) for t in (1, 7)] == [1e-2, 1e-2]
    assert ServerOpt("none", schedule="cosine", rounds=2).eta_at(2) == pytest.approx(0.5, rel=1e-15)
    assert ServerOpt("none", schedule="cosine", rounds=0).eta_at(1) == 1.0  # T = 0 is read as 1: no division by 0


def test_the_schedule_scales_the_step_not_the_momentum():
    # avgm μ = 0.5, η = 1, exp γ = 0.5, Δ = 1 every round: m = 1, 1.5, 1.75 (unscaled);
    # x = 1·1 + 0.5·1.5 + 0.25·1.75 = 2.1875 (every value exact in float32)
    opt = ServerOpt("avgm", lr=1.0, momentum=0.5, schedule="exp", decay=0.5)
    weights = {"x": np.zeros(1, dtype=np.float32)}
    state = opt.init_state(weights)
    for t in (1, 2, 3):
        opt.step(weights, {"x": np.ones(1, dtype=np.float32)}, state, t)
    assert weights["x"][0] == 2.1875 and state["m"]["x"][0] == 1.75
    # adam's m and v are the constant-η run's; only η·m/(√v+τ) is scaled (round 2 of cosine T = 2: η/2)
    d = {"x": np.array([0.5], dtype=np.float32)}
    plain, cosine = (
        ServerOpt("adam", lr=0.1, beta1=0.5, tau=0.5),
        ServerOpt("adam", lr=0.1, beta1=0.5, tau=0.5, schedule="cosine", rounds=2),
    )
    wp, wc = {"x": np.zeros(1, dtype=np.float32)}, {"x": np.zeros(1, dtype=np.float32)}
    sp, sc = plain.init_state(wp), cosine.init_state(wc)
    plain.step(wp, d, sp, 1)
    cosine.step(wc, d, sc, 1)
    assert wc["x"][0] == wp["x"][0]
    before_p, before_c = wp["x"][0], wc["x"][0]
    plain.step(wp, d, sp, 2)
    cosine.step(wc, d, sc, 2)
    assert sc["m"]["x"][0] == sp["m"]["x"][0] and sc["v"]["x"][0] == sp["v"]["x"][0]
    assert wc["x"][0] - before_c == pytest.approx((wp["x"][0] - before_p) / 2, rel=1e-6)


def test_a_tensor_method_steps_by_the_scheduled_eta_of_the_round(task):
    # the hand rounds' weighted means are 0.25 then −0.5; exp γ = 0.25, η = 1: x = 0.25 − 0.25·0.5 = 0.125
    m = build("head", task, server_lr=1.0, server_lr_schedule="exp", server_lr_decay=0.25)
    assert (m.server_opt.schedule, m.server_opt.decay, m.server_opt.rounds) == ("exp", 0.25, m.cfg.rounds)
    state = m.init_server()
    start = {n: a.copy() for n, a in state["weights"].items()}
    for r, (values, counts) in enumerate(ROUNDS, start=1):
        state, _ = _round(m, state, _hand(m, values), counts, r)
    for n in m.names:
        np.testing.assert_allclose(state["weights"][n], start[n] + np.float32(0.125), rtol=0, atol=1e-6)
    # cosine over the config's T = 2 rounds: η = 1 then ½: x = 0.25 − 0.25 = 0
    c = build("head", task, server_lr_schedule="cosine")
    state = c.init_server()
    for r, (values, counts) in enumerate(ROUNDS, start=1):
        state, _ = _round(c, state, _hand(c, values), counts, r)
    for n in c.names:
        np.testing.assert_allclose(state["weights"][n], start[n], rtol=0, atol=1e-6)


def test_the_streamed_round_steps_by_the_scheduled_eta_too(task):
    # the engine folds each update into the accumulator and steps in finish(): round 2 of exp γ = 0.25
    # moves by 0.25·(−0.5) after round 1's 0.25, as aggregate() does (previous test)
    m = build("head", task, server_lr=1.0, server_lr_schedule="exp", server_lr_decay=0.25)
    state = m.init_server()
    start = {n: a.copy() for n, a in state["weights"].items()}
    for r, (values, counts) in enumerate(ROUNDS, start=1):
        ctx = RoundContext(round=r, rounds=2, seed=1)
        acc = m.accumulator(state, ctx)
        assert acc is not None
        for c, (d, n) in enumerate(zip(_hand(m, values), counts)):
            payload = encode_tensors(m.up_codec, d, CodecContext(seed=ctx.seed_for(c, "uplink")), n=n)
            update = m.decode_update(payload, c, state, ctx)
            assert acc.alone(c, acc.prepare(c, update)) is None  # the integrity trial steps by the same η
            acc.add(c, acc.prepare(c, update))
        state, _ = acc.finish()
    for n in m.names:
        np.testing.assert_allclose(state["weights"][n], start[n] + np.float32(0.125), rtol=0, atol=1e-6)


def test_server_lr_schedule_options_are_checked(task):
    with pytest.raises(ConfigError):
        build("head", task, server_lr_schedule="linear")
    with pytest.raises(ConfigError):
        build("head", task, server_lr_decay=0.0)
