"""The knobs that make zeroth-order training learn: DeComFL's adjust_perturb (P changes at set
rounds) and the moving-average (momentum) estimator, pinned on hand-made cases; the wire stays
exact (byte counts, bit-identical replay of a stale client)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config
from handmade import assert_accuracy_is_real, fresh, shared_task

from fedsqueeze.config import build_config
from fedsqueeze.errors import ConfigError, PayloadError
from fedsqueeze.methods import RoundContext, get_method
from fedsqueeze.methods.decomfl import perturb_changes
from fedsqueeze.methods.decomfl_wire import decode_downlink
from fedsqueeze.methods.zo import Momentum, Perturber, estimate_step
from fedsqueeze.methods.zo_wire import compact_frame
from fedsqueeze.runtime import run_local
from fedsqueeze.seeding import SERVER, np_rng


@pytest.fixture(scope="module")
def task():
    return shared_task()


def make(name, task, rounds=10, local_steps=4, clients=4, lr=0.0, **options):
    run = dict(method=name, rounds=rounds, local_steps=local_steps, clients=clients, lr=lr, out="/tmp/fedsqueeze-zo-unused")
    cfg = tiny_config(**run, options=options)
    m = get_method(name)(cfg)
    m.setup(fresh(task))
    return m


def z_of(m, seed, index=0):
    """z(seed, index) over the method's trainable tensors, by name, in float64 (our own regeneration)."""
    probe = [torch.zeros_like(m.named[n]) for n in m.names]
    Perturber(probe).add(int(seed), index, 1.0)
    return {n: p.numpy().astype(np.float64) for n, p in zip(m.names, probe)}


def play(m, state, clients, r, who):
    """One round of real client training: downlink, update, decode, aggregate. Returns (state, downlinks, uplinks)."""
    ctx, ups, down, up = RoundContext(r, m.cfg.rounds, 0), {}, {}, {}
    for c in who:
        down[c] = m.downlink(state, ctx, c)
        out = m.client_update(down[c], c, clients.get(c), ctx)
        clients[c], up[c] = out.state, out.payload
        ups[c] = m.decode_update(out.payload, c, state, ctx)
    state, _ = m.aggregate(state, ups, ctx)
    return state, down, up


# ---- adjust_perturb -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,base,expected",
    [
        ("", 1, [1, 1, 1, 1, 1, 1, 1]),
        ("3,5", 1, [1, 1, 2, 2, 4, 4, 4]),  # P doubles at rounds 3 and 5
        ("3:5,6:2", 1, [1, 1, 5, 5, 5, 2, 2]),  # P set at rounds 3 and 6
        ("2, 4:3, 6", 2, [2, 4, 4, 3, 3, 6, 6]),  # mixed: double, set, double what was set
    ],
)
def test_adjust_perturb_gives_P_of_every_round(task, text, base, expected):
    m = make("decomfl", task, rounds=7, params="head", warm_start_rounds=1, perturbations=base, adjust_perturb=text)
    assert [m.p_at(r) for r in range(1, 8)] == expected
    assert m.wire.p_at(7) == expected[-1]  # the wire reads the same schedule


@pytest.mark.parametrize("text", ["0", "3,3", "4,2", "x", "3:0", "3,,5", "3:"])
def test_adjust_perturb_refuses_malformed_schedules(text):
    with pytest.raises(ValueError):
        perturb_changes(text, 1)
    with pytest.raises(ConfigError, match="adjust_perturb"):
        get_method("decomfl")(build_config(None, {"method": "decomfl"}, {"adjust_perturb": text}))


def test_adjust_perturb_is_capped():
    cfg = build_config(None, {"method": "decomfl"}, {"adjust_perturb": ",".join(str(r) for r in range(2, 14))})
    assert get_method("decomfl")(cfg).opts.adjust_perturb  # 12 doublings from 1: P = 4096 is allowed
    for text in (",".join(str(r) for r in range(2, 15)), "2:4097"):
        with pytest.raises(ConfigError, match="4096"):
            get_method("decomfl")(build_config(None, {"method": "decomfl"}, {"adjust_perturb": text}))


def test_adjust_perturb_payloads_grow_with_P_and_replay_stays_exact(task):
    """K = 2, P = 1 doubling at rounds 3 and 5: every message's exact size, and a stale client's replay."""
    m = make(
        "decomfl", task, rounds=6, local_steps=2, clients=3, params="head", warm_start_rounds=1, warm_start_steps=2, adjust_perturb="3,5"
    )
    head = m.head_elements * 2  # the warm-started head in float16, sent once to a client that lacks it
    state, clients = m.init_server(), {}
    # client 0 every round; client 1 in the warm round and again in round 6; client 2 never (history is kept)
    plan = {1: [0, 1], 2: [0], 3: [0], 4: [0], 5: [0], 6: [0, 1]}
    # uplink = tag + round + 4·K·P + CRC-32: P = 1, 2, 2, 4, 4 in rounds 2..6
    up_bytes = {2: 14, 3: 22, 4: 22, 5: 38, 6: 38}
    # client 0's downlink = tag, round, head flag, 3 varints of the record run, 4·K·P of round r − 1, CRC
    down_bytes = {2: head + 8, 3: 18, 4: 26, 5: 26, 6: 42}
    server_after = {}
    for r, who in plan.items():
        state, down, up = play(m, state, clients, r, who)
        server_after[r] = {n: a.copy() for n, a in state["weights"].items()}
        if r > 1:
            assert len(up[0]) == up_bytes[r] == 4 * 2 * m.p_at(r) + 6, r
            assert len(down[0]) == down_bytes[r], r
    # client 1 missed rounds 2..5: the head + records of K·P = 2, 4, 4, 8 scalars
    assert len(down[1]) == head + 4 * (2 + 4 + 4 + 8) + 10
    msg = decode_downlink(down[1], m.wire, 6)
    assert msg.rounds == [2, 3, 4, 5] and [g.shape for g in msg.scalars] == [(2, 1), (2, 2), (2, 2), (2, 4)]
    for n in m.names:
        assert torch.equal(torch.from_numpy(clients[1]["weights"][n]), torch.from_numpy(server_after[5][n])), n
    # an upload with round 4's P in round 5 is refused
    with pytest.raises(PayloadError, match="truncated"):
        m.decode_update(compact_frame("decomfl-up", 5, [], np.ones(4, "<f4").tobytes()), 0, state, RoundContext(5, 6, 0))


def test_adjust_perturb_bytes_in_a_cli_run(tiny_cfg):
    """The run's byte counts (real payloads) follow P: uplink per client = 4·K·P(round) + 6; the moments
    ride along in the (checkpointed) states."""
    options = {"params": "head", "adjust_perturb": "3:3,4", "momentum": 0.9, "adam_beta2": 0.99}
    cfg = tiny_cfg(method="decomfl", rounds=4, local_steps=2, threads=1, options=options)
    res = run_local(cfg, show_progress=False)
    assert_accuracy_is_real(cfg, res)  # the checkpointed final state (with m, v, t) evaluates to the reported accuracy
    per_client = [r["uplink_bytes"] / r["clients_uploaded"] for r in res["rounds"][1:]]
    assert per_client == [4 * 2 * 1 + 6, 4 * 2 * 3 + 6, 4 * 2 * 6 + 6]
    assert [r["zo_perturbations"] for r in res["rounds"][1:]] == [1, 3, 6]


# ---- momentum -----------------------------------------------------------------------------------


def test_momentum_local_steps_follow_the_recursion():
    """Two local steps on a linear loss: m ← β m + (1 − β)/P Σ g_i z_i, w ← w − lr m, with g = <c, z_i>."""
    torch.manual_seed(0)
    w = [torch.randn(40, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    c = [torch.randn(40, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    w0 = [t.clone() for t in w]
    pert = Perturber(w)
    mom = Momentum(pert, 0.75)
    loss = lambda: float(sum((ci * wi).sum() for ci, wi in zip(c, w)))
    lr, beta, perts = 0.1, 0.75, 3
    grads = [estimate_step(pert, loss, seed=s, perturbations=perts, mu=1e-3, difference="central", lr=lr, momentum=mom) for s in (11, 12)]
    m_exp = [torch.zeros_like(t) for t in w]
    w_exp = [t.clone() for t in w0]
    for s, g in zip((11, 12), grads):
        z = []
        for i in range(perts):
            probe = [torch.zeros_like(t) for t in w]
            Perturber(probe).add(seed=s, index=i, alpha=1.0)
            z.append(probe)
            # the estimate of a linear loss's directional derivative is <c, z> (float32 upload)
            assert g[i] == pytest.approx(float(sum((ci * zi).sum() for ci, zi in zip(c, probe))), rel=1e-5)
        for j in range(len(w)):
            m_exp[j] = beta * m_exp[j] + (1 - beta) / perts * sum(float(g[i]) * z[i][j] for i in range(perts))
            w_exp[j] = w_exp[j] - lr * m_exp[j]
    for j in range(len(w)):
        torch.testing.assert_close(mom.buffers[j], m_exp[j], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(w[j], w_exp[j], rtol=1e-9, atol=1e-12)


def test_decomfl_momentum_server_update_is_the_recursion_on_hand_made_scalars(task):
    beta, lr, k, p = 0.5, 0.05, 3, 2
    m = make("decomfl", task, params="head", warm_start_rounds=0, perturbations=p, local_steps=k, momentum=beta, lr=lr)
    state = m.init_server()
    w = {n: a.astype(np.float64) for n, a in state["weights"].items()}
    mom = {n: np.zeros_like(a) for n, a in w.items()}
    for r in (1, 2):  # the moving average carries over from round 1 to round 2
        ctx = RoundContext(r, 10, 0)
        g = {c: (np.arange(k * p).reshape(k, p) * (c + 1) - 2.5 * r).astype(np.float32) for c in (0, 1)}
        ups = {c: m.decode_update(compact_frame("decomfl-up", r, [], v.astype("<f4").tobytes()), c, state, ctx) for c, v in g.items()}
        state, _ = m.aggregate(state, ups, ctx)
        mean = (g[0].astype(np.float64) + g[1]) / 2
        seeds = np_rng(0, r, SERVER, "decomfl-seeds").integers(0, 1 << 63, size=k, dtype=np.uint64)  # our own derivation
        for kk, s in enumerate(seeds):
            zs = [z_of(m, s, i) for i in range(p)]
            for n in m.names:
                mom[n] = beta * mom[n] + (1 - beta) / p * sum(mean[kk, i] * zs[i][n] for i in range(p))
                w[n] = w[n] - lr * mom[n]
        for n in m.names:
            np.testing.assert_allclose(state["momentum"][n], mom[n], rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(state["weights"][n], w[n], rtol=1e-5, atol=1e-6)
    assert any(np.abs(state["momentum"][n]).max() > 0 for n in m.names)


def test_decomfl_adam_server_update_is_the_recursion_on_hand_made_scalars(task):
    """ZO-AdaMM on the aggregated scalars: ĝ, m, v, bias corrections with the global step count t."""
    b1, b2, eps, lr, k, p = 0.9, 0.99, 1e-8, 1e-3, 2, 2
    m = make("decomfl", task, params="head", warm_start_rounds=0, perturbations=p, local_steps=k, momentum=b1, adam_beta2=b2, lr=lr)
    state = m.init_server()
    w = {n: a.astype(np.float64) for n, a in state["weights"].items()}
    mom = {n: np.zeros_like(a) for n, a in w.items()}
    sec = {n: np.zeros_like(a) for n, a in w.items()}
    t = 0
    for r in (1, 2):
        ctx = RoundContext(r, 10, 0)
        g = {c: (np.array([[1.0, -2.0], [0.5, 3.0]]) * (c + 1) * r).astype(np.float32) for c in (0, 1)}
        ups = {c: m.decode_update(compact_frame("decomfl-up", r, [], v.astype("<f4").tobytes()), c, state, ctx) for c, v in g.items()}
        state, _ = m.aggregate(state, ups, ctx)
        mean = (g[0].astype(np.float64) + g[1]) / 2
        seeds = np_rng(0, r, SERVER, "decomfl-seeds").integers(0, 1 << 63, size=k, dtype=np.uint64)
        for kk, s in enumerate(seeds):
            t += 1
            zs = [z_of(m, s, i) for i in range(p)]
            for n in m.names:
                ghat = sum(mean[kk, i] * zs[i][n] for i in range(p)) / p
                mom[n] = b1 * mom[n] + (1 - b1) * ghat
                sec[n] = b2 * sec[n] + (1 - b2) * ghat**2
                w[n] = w[n] - lr * (mom[n] / (1 - b1**t)) / (np.sqrt(sec[n] / (1 - b2**t)) + eps)
        assert state["zo_steps"] == t == 2 * r
        for n in m.names:
            np.testing.assert_allclose(state["momentum"][n], mom[n], rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(state["second_moment"][n], sec[n], rtol=1e-5, atol=1e-9)
            np.testing.assert_allclose(state["weights"][n], w[n], rtol=1e-5, atol=1e-6)
    # the first Adam step moves every coordinate by about lr (m̂ / √v̂ = ±1 when ĝ has one term)
    assert any(np.abs(state["weights"][n] - m.initial[n]).max() > lr / 2 for n in m.names)


def test_feedsign_momentum_server_update_is_the_recursion_on_hand_made_votes(task):
    beta, lr = 0.9, 0.01
    m = make("feedsign", task, params="head", warm_start_rounds=0, local_steps=4, momentum=beta, lr=lr)
    state = m.init_server()
    w = {n: a.astype(np.float64) for n, a in state["weights"].items()}
    mom = {n: np.zeros_like(a) for n, a in w.items()}
    votes = {0: [1, 1, -1, 1], 1: [1, -1, -1, 1], 2: [1, 1, -1, -1]}  # majority: +1, +1, −1, +1
    bits = {c: bytes([sum(1 << i for i, v in enumerate(vs) if v > 0)]) for c, vs in votes.items()}
    ctx = RoundContext(1, 10, 0)
    ups = {c: m.decode_update(compact_frame("feedsign-up", 1, [], b), c, state, ctx) for c, b in bits.items()}
    state, _ = m.aggregate(state, ups, ctx)
    seeds = np_rng(0, 1, SERVER, "feedsign-seeds").integers(0, 1 << 63, size=4, dtype=np.uint64)
    for v, s in zip([1, 1, -1, 1], seeds):
        z = z_of(m, s)
        for n in m.names:
            mom[n] = beta * mom[n] + (1 - beta) * v * z[n]
            w[n] = w[n] - lr * mom[n]
    for n in m.names:
        np.testing.assert_allclose(state["momentum"][n], mom[n], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(state["weights"][n], w[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "name,options",
    [
        ("decomfl", {"perturbations": 2, "adjust_perturb": "4", "momentum": 0.9}),
        ("feedsign", {"momentum": 0.8}),
        ("decomfl", {"momentum": 0.9, "adam_beta2": 0.99, "perturbations": 2}),
    ],
)
def test_momentum_stale_client_replays_to_the_live_model_bit_for_bit(task, name, options):
    m = make(
        name, task, rounds=7, local_steps=5, params="head", warm_start_rounds=1, warm_start_steps=2, lr=1e-2, zo_batch_size=-1, **options
    )
    state, clients = m.init_server(), {}
    plan = {1: [0, 1], 2: [0, 2], 3: [0, 2], 4: [0, 2], 5: [0, 2], 6: [0, 1, 2]}  # client 1 away for rounds 2..5
    for r, who in plan.items():
        if r == 6:
            live = {key: {n: a.copy() for n, a in state[key].items()} for key in ("weights", "momentum", "second_moment") if key in state}
            steps = state["zo_steps"]
        state, _, _ = play(m, state, clients, r, who)
    keys = [key for key in ("weights", "momentum", "second_moment") if key in state]
    for key in keys:  # clients keep the model they trained from: the server's after round 5
        for n in m.names:
            for c in (0, 1, 2):
                assert torch.equal(torch.from_numpy(clients[c][key][n]), torch.from_numpy(live[key][n])), (key, n, c)
    assert all(clients[c]["zo_steps"] == steps == 4 * 5 for c in (0, 1, 2))  # 4 ZO rounds of K = 5 steps
    assert any(np.abs(live["momentum"][n]).max() > 0 for n in m.names)  # the average really moved
    assert any(not np.array_equal(live["weights"][n], m.initial[n]) for n in m.names)


def test_fedkseed_refuses_momentum():
    for sets in ({"momentum": 0.9}, {"adam_beta2": 0.99}):
        with pytest.raises(ConfigError, match="is not offered for fedkseed"):
            get_method("fedkseed")(build_config(None, {"method": "fedkseed"}, sets))
    assert get_method("fedkseed")(build_config(None, {"method": "fedkseed"}, {"momentum": 0.0})).opts.momentum == 0.0
