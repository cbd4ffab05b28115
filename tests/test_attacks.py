"""Attacks as seeded faults: the attacker set, the data hook, and each rewrite of an attacker's upload."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import tiny_config
from handmade import OUT, fresh, hand_deltas, shared_task

from fedsqueeze.attacks import attacker_count, attackers, poison_labels
from fedsqueeze.codecs import decode_tensors, encode_tensors
from fedsqueeze.errors import ConfigError, PayloadError
from fedsqueeze.methods import ClientOutput, get_method
from fedsqueeze.methods.base import RoundContext
from fedsqueeze.methods.zo_wire import compact_frame
from fedsqueeze.runtime.faults import check_attack, with_injected_faults


@pytest.fixture(scope="module")
def task():
    return shared_task()


def _method(task, name, attack, **options):
    cfg = tiny_config(method=name, out=OUT, attack=attack, attack_fraction=1.0, attack_scale=10.0, options=options)
    m = get_method(name)(cfg)
    m.setup(fresh(task) if name in ("decomfl", "deltamask", "fedpm") else task)
    check_attack(cfg, m)
    return cfg, m


def _attacked(cfg, m, message, payload, client=1, ctx=None):
    """What the client-side wrapper sends for a client whose honest upload is ``payload``."""
    ctx = ctx or RoundContext(round=1, rounds=2, seed=0)
    fn = with_injected_faults(cfg, lambda *_: ClientOutput(payload), m)
    return fn(message, client, None, ctx, threading.Event()).payload


def test_attackers_are_a_fixed_seeded_set():
    cfg = tiny_config(out=OUT, clients=10, clients_per_round=5, attack="scale", attack_fraction=0.2)
    chosen = attackers(cfg)
    assert len(chosen) == attacker_count(0.2, 10) == 2 and chosen <= set(range(10))
    assert attackers(tiny_config(out=OUT, clients=10, clients_per_round=5, attack="scale", attack_fraction=0.2)) == chosen
    other = {frozenset(attackers(tiny_config(out=OUT, clients=10, clients_per_round=5, seed=s, attack="scale"))) for s in range(6)}
    assert len(other) > 1  # the seed decides
    assert attackers(tiny_config(out=OUT)) == frozenset()
    with pytest.raises(ConfigError, match="makes no attacker"):
        tiny_config(out=OUT, attack="scale", attack_fraction=0.1)  # 0.4 of 4 clients rounds to 0


def test_label_flip_poisons_only_the_attackers_labels(task):
    cfg = tiny_config(out=OUT, attack="label_flip", attack_fraction=0.5)
    poisoned = poison_labels(cfg, task.train, task.client_indices, task.num_classes)
    bad = attackers(cfg)
    for c, idx in enumerate(task.client_indices):
        expected = task.num_classes - 1 - task.train.labels[idx] if c in bad else task.train.labels[idx]
        assert np.array_equal(poisoned.labels[idx].numpy(), expected.numpy())
    assert poison_labels(tiny_config(out=OUT), task.train, task.client_indices, task.num_classes) is task.train


@pytest.mark.parametrize("attack", ["sign_flip", "scale", "gaussian"])
def test_tensor_attacks_rewrite_the_delta(task, attack):
    cfg, m = _method(task, "head", attack)
    delta = hand_deltas(m, 3)
    honest = encode_tensors(m.up_codec, delta, n=7)
    sent, extra = decode_tensors(_attacked(cfg, m, b"", honest))
    assert extra == {"n": 7}
    if attack == "sign_flip":
        assert all(np.array_equal(sent[n], -delta[n]) for n in m.names)
    elif attack == "scale":
        assert all(np.allclose(sent[n], 10 * delta[n]) for n in m.names)
    else:  # noise of 10× the update's RMS, seeded: the same bytes again
        rms = np.sqrt(np.mean(np.concatenate([d.ravel() for d in delta.values()]) ** 2))
        got = np.sqrt(np.mean(np.concatenate([s.ravel() for s in sent.values()]) ** 2))
        assert 5 * rms < got < 20 * rms
        assert _attacked(cfg, m, b"", honest) == _attacked(cfg, m, b"", honest)


def test_an_honest_client_is_left_alone(task):
    cfg = tiny_config(out=OUT, attack="sign_flip", attack_fraction=0.25)
    m = get_method("head")(cfg)
    m.setup(task)
    honest = encode_tensors(m.up_codec, hand_deltas(m, 3), n=7)
    good = next(c for c in range(4) if c not in attackers(cfg))
    assert _attacked(cfg, m, b"", honest, client=good) == honest


def test_inflated_count_is_dropped_by_the_server(task):
    cfg, m = _method(task, "head", "inflate_count")
    ctx = RoundContext(round=1, rounds=2, seed=0)
    sent = _attacked(cfg, m, b"", encode_tensors(m.up_codec, hand_deltas(m, 3), n=5), ctx=ctx)
    assert decode_tensors(sent)[1]["n"] == 5000
    with pytest.raises(PayloadError, match="claims n=5000"):
        m.decode_update(sent, 1, m.init_server(), ctx)


@pytest.mark.parametrize("name", ["fedpm", "deltamask"])
def test_mask_all_flips_every_position_it_can_and_the_client_flip_cap_stops_it(task, name):
    cfg, m = _method(task, name, "mask_all", client_flip_cap=0.01, aggregate="delta")
    state = m.init_server()
    ctx = RoundContext(round=1, rounds=2, seed=0)
    message = m.downlink(state, ctx, 1)
    honest = m.client_update(message, 1, None, ctx).payload
    update = m.decode_update(_attacked(cfg, m, message, honest, ctx=ctx), 1, state, ctx)
    theta_start = m.start_theta(m.theta_of(state["theta_sym"], state["levels"]))
    ref = m.server_uniforms(ctx, 1) < theta_start
    mask, _ = m.rebuild_mask(update, theta_start, ref, 1, ctx)
    flips = int(np.count_nonzero(mask != ref))
    assert flips == (m.n if name == "fedpm" else m.flip_cap(ctx))  # deltamask: its κ·n cap, the most a server accepts
    _, metrics = m.aggregate(state, {1: update}, ctx)
    assert metrics["flip_capped"] == 1.0 and metrics["mask_keep_frac"] > 0.9


def test_zo_huge_scalars(task):
    cfg, m = _method(task, "decomfl", "zo_huge", params="head", warm_start_rounds=0, perturbations=2)
    ctx = RoundContext(round=1, rounds=2, seed=0)
    honest = compact_frame("decomfl-up", 1, [], np.ones((m.k, m.p), "<f4").tobytes())
    scalars = m.decode_update(_attacked(cfg, m, b"", honest, ctx=ctx), 1, m.init_server(), ctx).scalars
    assert np.array_equal(np.abs(scalars), np.full((m.k, m.p), 1e4, np.float32))


def test_an_attack_must_fit_the_method(task):
    cfg = tiny_config(out=OUT, attack="mask_all", attack_fraction=0.5)
    with pytest.raises(ConfigError, match="does not apply to method 'fedavg'"):
        check_attack(cfg, get_method("fedavg")(cfg))


def test_the_engine_sends_the_attackers_negated_update(task):
    from fedsqueeze.runtime.local import run_round

    moves = []
    for attack in ("none", "sign_flip"):
        cfg = tiny_config(out=OUT, method="head", attack=attack, attack_fraction=1.0)
        m = get_method("head")(cfg)
        m.setup(fresh(task))  # the same initial head both times (the shared model's head is trained in place)
        state = m.init_server()
        w0 = {n: a.copy() for n, a in state["weights"].items()}
        state, record = run_round(m, m.task, cfg, state, {}, RoundContext(round=1, rounds=1, seed=0))
        assert record["clients_aggregated"] == 2
        moves.append({n: state["weights"][n] - w0[n] for n in m.names})
    for n in moves[0]:
        np.testing.assert_allclose(moves[1][n], -moves[0][n], rtol=1e-5, atol=1e-7)


@pytest.mark.slow  # three tiny runs (~20 s each on a loaded machine)
def test_sign_flip_attack_end_to_end_and_the_median_holds(tiny_cfg):
    from fedsqueeze.runtime.local import run_local

    common = dict(method="head", clients=4, clients_per_round=4, rounds=3, local_steps=20, attack="sign_flip", attack_scale=1.0)
    clean = run_local(tiny_cfg(clients=4, clients_per_round=4, rounds=3, local_steps=20, method="head"), show_progress=False)
    mean = run_local(tiny_cfg(**common, attack_fraction=0.5, options={"robust": "mean"}), show_progress=False)
    assert mean["final"]["accuracy"] < clean["final"]["accuracy"]
    # with one attacker of four (25%), the coordinate median stays near the clean run
    med = run_local(tiny_cfg(**common, attack_fraction=0.25, options={"robust": "median"}), show_progress=False)
    assert med["final"]["accuracy"] >= clean["final"]["accuracy"] - 0.1


def test_decomfl_multi_krum_drops_the_outlying_block_of_scalars(task):
    from fedsqueeze.methods.updates import ZOUpdate

    cfg, m = _method(task, "decomfl", "none", params="head", warm_start_rounds=0, aggregate="multi_krum", krum_f=1)
    ctx = RoundContext(round=1, rounds=2, seed=0)
    state = m.init_server()
    base = np.arange(m.k * m.p, dtype=np.float32).reshape(m.k, m.p)
    # three honest blocks 0.1 apart, one flipped: its distance to every other block is the largest
    blocks = {0: base, 1: base + 0.1, 2: base + 0.2, 3: -base - 50}
    m.zo_aggregate(state, {c: ZOUpdate(b.astype(np.float32)) for c, b in blocks.items()}, ctx)
    # k - f = 3 best-scored: the honest three, unweighted
    np.testing.assert_allclose(state["history"][-1]["scalars"], base + 0.1, rtol=1e-6, atol=1e-6)
