"""fedkseed and feedsign (and DP for decomfl): the rules pinned on hand-made cases, the catch-up
paths, the byte bounds, the payload round trips, and end-to-end runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import tiny_config
from handmade import assert_accuracy_is_real, fresh, shared_task

from fedsqueeze.errors import PayloadError
from fedsqueeze.methods import RoundContext, get_method
from fedsqueeze.methods.fedkseed import DENSE, REPLAY, SPARSE
from fedsqueeze.methods.zo import Perturber
from fedsqueeze.methods.zo_wire import compact_frame
from fedsqueeze.privacy import dp_epsilon
from fedsqueeze.runtime import run_local
from fedsqueeze.seeding import SERVER, np_rng, seed_int

SLACK = 16


@pytest.fixture(scope="module")
def task():
    return shared_task()


def make(name, task, rounds=10, local_steps=4, **options):
    cfg = tiny_config(method=name, rounds=rounds, local_steps=local_steps, out="/tmp/fedsqueeze-zo-unused", options=dict(options))
    m = get_method(name)(cfg)
    m.setup(fresh(task))
    return m


def z_of(m, seed):
    """z(seed, 0) over the method's trainable tensors, by name (our own regeneration)."""
    probe = [torch.zeros_like(m.named[n]) for n in m.names]
    Perturber(probe).add(int(seed), 0, 1.0)
    return {n: p.numpy().astype(np.float64) for n, p in zip(m.names, probe)}


def upload(kind, round_, body):
    return compact_frame(kind, round_, [], body)


# ---- fedkseed -----------------------------------------------------------------------------------


def test_fedkseed_sums_the_scalars_per_seed_of_the_pool(task):
    m = make("fedkseed", task, params="head", warm_start_rounds=0, pool_size=8, local_steps=5)
    state = m.init_server()
    w0 = {n: a.astype(np.float64) for n, a in state["weights"].items()}
    ctx = RoundContext(1, 10, 0)  # the pool comes from the run seed (0), the draws from the round's
    g = {0: np.arange(1, 6, dtype=np.float32), 2: -np.arange(10, 15, dtype=np.float32) / 7}
    ups = {c: m.decode_update(upload("fedkseed-up", 1, v.astype("<f4").tobytes()), c, state, ctx) for c, v in g.items()}
    state, metrics = m.aggregate(state, ups, ctx)
    # our own derivation: the pool, each client's draws, ĝ_j = Σ scalars of seed j / |S|
    pool = np.random.default_rng(seed_int(0, 0, SERVER, "fedkseed-pool")).integers(0, 1 << 63, size=8, dtype=np.uint64)
    total = np.zeros(8)
    for c, v in g.items():
        for j, x in zip(np_rng(0, 1, c, "fedkseed-steps").integers(0, 8, size=5), v):
            total[j] += x
    expected_coef = (-m.lr * total / 2).astype(np.float32)
    np.testing.assert_allclose(state["coef"], expected_coef, rtol=1e-6)
    expected = {n: w0[n] + sum(float(expected_coef[j]) * z_of(m, pool[j])[n] for j in range(8)) for n in m.names}
    for n in m.names:
        np.testing.assert_allclose(state["weights"][n], expected[n], rtol=1e-5, atol=1e-6)
    drawn = {int(j) for c in g for j in np_rng(0, 1, c, "fedkseed-steps").integers(0, 8, size=5)}
    assert metrics["seeds_touched"] == len(drawn)


def _play_hand(m, state, rounds, clients, scale=1.0):
    """Rounds where ``clients`` upload hand-made scalars (no training: fast)."""
    for r in rounds:
        ctx = RoundContext(r, m.cfg.rounds, 0)
        ups = {}
        for c in clients:
            v = (np.sin(np.arange(m.k) * (c + 1) + r) * scale).astype("<f4")
            ups[c] = m.decode_update(upload(m.name + "-up", r, v.tobytes()), c, state, ctx)
        state, _ = m.aggregate(state, ups, ctx)
    return state


@pytest.mark.parametrize("importance", ["uniform", "pro"])
def test_fedkseed_catch_up_paths_reach_the_server_model(task, importance):
    m = make("fedkseed", task, rounds=12, params="head", warm_start_rounds=0, pool_size=32, local_steps=6, importance=importance)
    state = _play_hand(m, m.init_server(), range(1, 7), [0, 1])
    ctx = RoundContext(7, 12, 0)
    messages = m.catch_up_messages(state, ctx, 0, None)  # a client that never took part: 6 records missed
    for mode, msg in messages.items():
        own = m.client_update(msg, 3, None, ctx).state
        for key in ("coef", "amp_sum", "amp_count"):
            assert np.array_equal(own[key], state[key]), (mode, key)  # the statistics are exact on every path
        for n in m.names:
            if mode == REPLAY:  # replay repeats the server's float32 operations: bit-identical
                assert torch.equal(torch.from_numpy(own["weights"][n]), torch.from_numpy(state["weights"][n]))
            else:  # the accumulated jump adds the same sum in another order
                np.testing.assert_allclose(own["weights"][n], state["weights"][n], rtol=1e-5, atol=1e-6)
    assert any(not np.array_equal(state["weights"][n], m.initial[n]) for n in m.names)
    # the sent message is the smallest of the three
    assert len(m.downlink(state, ctx, 3)) == min(len(v) for v in messages.values())


def test_fedkseed_catch_up_is_O_K_bytes_whatever_the_missed_rounds(task):
    pool = 64
    m = make("fedkseed", task, rounds=60, params="head", warm_start_rounds=0, pool_size=pool, local_steps=20)
    state = m.init_server()
    sizes, replays = {}, {}
    last = 0
    for missed in (1, 4, 16, 50):
        state = _play_hand(m, state, range(last + 1, missed + 1), [0, 1])
        last = missed
        ctx = RoundContext(missed + 1, 60, 0)
        sizes[missed] = len(m.downlink(state, ctx, 3))  # client 3 never took part: `missed` records behind
        replays[missed] = len(m.catch_up_messages(state, ctx, 0, None)[REPLAY])
        assert sizes[missed] <= 4 * pool + SLACK  # the dense path bounds it: 4 bytes per seed of the pool
    assert replays[50] > 10 * 4 * pool  # replaying the history would have cost ever more
    assert replays[1] == sizes[1] or sizes[1] < replays[1]


def test_fedkseed_pro_draws_by_amplitude(task):
    m = make("fedkseed", task, params="head", warm_start_rounds=0, pool_size=4, local_steps=2000, importance="pro", importance_clip=2.0)
    stats = {"coef": np.zeros(4, np.float32), "amp_sum": np.array([0, 3, 1, 8], np.float32), "amp_count": np.array([0, 2, 1, 3])}
    amp = np.array([0, 1, 0.5, 2])  # amp_sum / (count + 1)
    norm = amp / 2
    expected = np.exp(norm) / np.exp(norm).sum()
    np.testing.assert_allclose(m.probabilities(stats), expected, rtol=1e-9)
    draws = m.step_indices(2, 0, 1, stats)
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / 2000, expected, atol=0.04)
    # a replayed record adds |clip(ĝ)| and a count to the seeds it touched
    m.replay({"round": 1, "index": np.array([1, 3]), "scalars": np.array([-5.0, 0.5], np.float32)}, stats)
    np.testing.assert_array_equal(stats["amp_sum"], np.array([0, 5, 1, 8.5], np.float32))
    np.testing.assert_array_equal(stats["amp_count"], [0, 3, 1, 4])


def test_fedkseed_rejects_hostile_downlinks(task):
    m = make("fedkseed", task, rounds=6, params="head", warm_start_rounds=0, pool_size=16, local_steps=3)
    state = _play_hand(m, m.init_server(), range(1, 3), [0, 1])
    ctx = RoundContext(3, 6, 0)
    msgs = m.catch_up_messages(state, ctx, 0, None)
    # a sparse message naming a seed outside the pool, and one with a NaN coefficient (valid CRCs)
    with pytest.raises(PayloadError):
        m.client_update(compact_frame("fedkseed-down", 3, [SPARSE, 0], bytes([1, 40]) + np.float32(1).tobytes()), 2, None, ctx)
    with pytest.raises(PayloadError):
        m.client_update(compact_frame("fedkseed-down", 3, [DENSE, 0], np.full(16, np.nan, "<f4").tobytes()), 2, None, ctx)
    with pytest.raises(PayloadError):
        m.client_update(msgs[DENSE][:-1], 2, None, ctx)
    with pytest.raises(PayloadError):  # an upload of the wrong length
        m.decode_update(upload("fedkseed-up", 3, np.zeros(4, "<f4").tobytes()), 0, state, ctx)


# ---- feedsign -----------------------------------------------------------------------------------


def test_feedsign_takes_the_majority_and_breaks_ties_by_a_seeded_coin(task):
    m = make("feedsign", task, params="head", warm_start_rounds=0, local_steps=4)
    state = m.init_server()
    w0 = {n: a.astype(np.float64) for n, a in state["weights"].items()}
    ctx = RoundContext(1, 10, 5)
    votes = {0: [1, 1, -1, 1], 1: [1, -1, -1, -1], 3: [-1, 1, -1, -1], 2: [1, -1, 1, 1]}  # sums 2, 0, -2, 0
    bits = {c: bytes([sum(1 << i for i, v in enumerate(vs) if v > 0)]) for c, vs in votes.items()}
    ups = {c: m.decode_update(upload("feedsign-up", 1, b), c, state, ctx) for c, b in bits.items()}
    state, metrics = m.aggregate(state, ups, ctx)
    coin = np_rng(5, 1, SERVER, "feedsign-ties").integers(0, 2, size=4) * 2 - 1
    expected_votes = [1, coin[1], -1, coin[3]]
    seeds = np_rng(5, 1, SERVER, "feedsign-seeds").integers(0, 1 << 63, size=4, dtype=np.uint64)
    expected = {n: w0[n] - m.lr * sum(v * z_of(m, s)[n] for v, s in zip(expected_votes, seeds)) for n in m.names}
    for n in m.names:
        np.testing.assert_allclose(state["weights"][n], expected[n], rtol=1e-5, atol=1e-6)
    assert list(state["history"][-1]["votes"]) == expected_votes
    agree = np.mean([np.mean(np.array(v) == expected_votes) for v in votes.values()])
    assert metrics["vote_agreement"] == pytest.approx(agree)


def test_feedsign_uploads_one_bit_per_step_and_replays_exactly(task):
    k = 20
    m = make("feedsign", task, rounds=8, params="head", warm_start_rounds=0, local_steps=k)
    state, clients = m.init_server(), {}
    for r, who in {1: [0, 1], 2: [0, 2], 3: [0, 2], 4: [1, 2]}.items():
        ctx, ups = RoundContext(r, 8, 0), {}
        for c in who:
            msg = m.downlink(state, ctx, c)
            out = m.client_update(msg, c, clients.get(c), ctx)
            clients[c] = out.state
            assert len(out.payload) <= math.ceil(k / 8) + SLACK  # 1 bit per step + a ≤ 16 B header
            assert len(out.payload) == math.ceil(k / 8) + 6  # exactly: tag, round, 3 bytes of bits, CRC-32
            ups[c] = m.decode_update(out.payload, c, state, ctx)
        if r == 4:  # client 1 was away for rounds 2 and 3: 2 records of K bits came down
            assert len(m.downlink(state, ctx, 1)) <= math.ceil(2 * k / 8) + SLACK
        state, _ = m.aggregate(state, ups, ctx)
    for n in m.names:  # client 1 replayed rounds 1..3 before training in round 4
        assert torch.equal(torch.from_numpy(clients[1]["weights"][n]), torch.from_numpy(clients[2]["weights"][n]))
    with pytest.raises(PayloadError):  # padding bits set
        m.decode_update(upload("feedsign-up", 5, bytes([0, 0, 0xF0])), 0, state, RoundContext(5, 8, 0))


# ---- decomfl with DP ----------------------------------------------------------------------------


def test_decomfl_dp_clips_sums_and_adds_seeded_noise(task):
    m = make("decomfl", task, params="head", warm_start_rounds=0, perturbations=2, local_steps=3, dp_clip=1.0, dp_noise=0.5)
    state = m.init_server()
    ctx = RoundContext(1, 10, 4)
    g = {0: np.full((3, 2), 3.0, np.float32), 1: np.full((3, 2), 0.1, np.float32)}  # norms 7.35 (clipped) and 0.245
    ups = {c: m.decode_update(upload("decomfl-up", 1, v.tobytes()), c, state, ctx) for c, v in g.items()}
    state, metrics = m.aggregate(state, ups, ctx)
    clipped = g[0] / np.linalg.norm(g[0]) + g[1]
    noise = np_rng(4, 1, SERVER, "dp-noise").normal(0.0, 0.5, size=(3, 2))
    expected = (clipped + noise) / m.cfg.clients_per_round
    np.testing.assert_allclose(state["history"][-1]["scalars"], expected, rtol=1e-5)
    assert metrics["dp_epsilon"] == pytest.approx(dp_epsilon(m.cfg.clients_per_round / m.cfg.clients, 0.5, 1, 1e-5))
    assert metrics["dp_clipped_fraction"] == 0.5


# ---- end to end ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,options",
    [("fedkseed", {"params": "head", "pool_size": 64, "importance": "pro"}), ("feedsign", {"params": "lora", "warm_start_steps": 3})],
)
def test_runs_end_to_end(tiny_cfg, method, options):
    cfg = tiny_cfg(method=method, rounds=3, local_steps=8, threads=1, options=dict(options))
    res = run_local(cfg, show_progress=False)
    assert_accuracy_is_real(cfg, res)
    for r in res["rounds"][1:]:  # the zeroth-order rounds: a few bytes per client
        per_client = r["uplink_bytes"] / r["clients_uploaded"]
        assert per_client <= (1 if method == "feedsign" else 4 * 8) + SLACK
