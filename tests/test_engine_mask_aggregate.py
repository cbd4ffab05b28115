"""MaskMethod.aggregate with its transient memory cut: the same state and metrics, bit for bit, as
the whole-mask implementation it replaced (kept here as the reference), for every server rule; and
a bound on what it allocates per masked weight."""

from __future__ import annotations

import copy
import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest
from torch import nn

from fedsqueeze.config import RunConfig
from fedsqueeze.methods import RoundContext, get_method
from fedsqueeze.methods.mask_method import AGGREGATED_KEY
from fedsqueeze.methods.robust import cap_flips, trimmed_votes
from fedsqueeze.methods.updates import stepped, weighted_mean
from fedsqueeze.models import Classifier

CLIENTS = 4


def mask_method(name: str, size: int, **options):
    """``name`` over a layout of ``size`` masked weights (a meta-device model: shapes only)."""
    backbone = nn.Sequential(nn.Linear(size, 1, bias=False, device="meta"))
    task = SimpleNamespace(model=Classifier(backbone, 1, 2, "text"), client_sizes=lambda: [100] * CLIENTS)
    cfg = RunConfig(method=name, clients=CLIENTS, clients_per_round=CLIENTS, model="tiny", options=options)
    m = get_method(name)(cfg)
    m.setup(task)
    return m


def round_updates(m, seed: int = 0):
    """The server state and the decoded uploads of CLIENTS clients that moved 3% of their probabilities."""
    state = m.init_server()
    ctx = RoundContext(round=1, rounds=3, seed=seed, participants=tuple(range(CLIENTS)))
    sym, levels, head, _ = m.decode_downlink(m.downlink(state, ctx, 0))
    theta_start = m.start_theta(m.theta_of(sym, levels))
    updates = {}
    for client in range(CLIENTS):
        rng = np.random.default_rng(100 * seed + client)
        moved = rng.random(m.n, dtype=np.float32) < 0.03
        target = np.float32(0.9) if client % 2 else np.float32(0.05)  # clients pull opposite ways
        theta_client = np.where(moved, target, theta_start).astype(np.float32)
        stratum = m.stratum(ctx, client) if m.opts.stratify else None
        meta, body, _ = m.encode_mask(m.uniforms(ctx, client, stratum), theta_client, theta_start, sym, levels, ctx)
        head_delta = {n: (rng.standard_normal(v.shape) * 1e-2).astype(np.float32) for n, v in head.items()}
        payload = m.wire.encode_uplink(m.uplink_kind, 10 + client, meta, body, head_delta)
        updates[client] = m.decode_update(payload, client, state, ctx)
    return state, updates, ctx


def whole_mask_aggregate(m, state, updates, ctx):
    """MaskMethod.aggregate as it was (whole-mask uniforms, int32 votes), less its timing metric."""
    theta_start = m.start_theta(m.theta_of(state["theta_sym"], state["levels"]))
    delta = m.opts.aggregate == "delta"
    counts = np.zeros(m.n, dtype=np.int32)
    extra: dict[str, list[float]] = {}
    cap, trim = m.opts.client_flip_cap, m.opts.vote_trim
    votes = []
    for client, upd in updates.items():
        ref = m.server_uniforms(ctx, client) < theta_start if (delta or m.needs_reference() or cap > 0) else None
        mask, stats = m.rebuild_mask(upd, theta_start, ref, client, ctx)
        if cap > 0:
            mask, capped = cap_flips(mask, ref.astype(mask.dtype), cap)
            stats = {**stats, "flip_capped": float(capped)}
        vote = mask - ref if delta else mask
        if trim > 0:
            votes.append(vote.astype(np.int8))
        else:
            counts += vote
        for k, v in stats.items():
            extra.setdefault(k, []).append(v)
    if trim > 0:
        counts = np.rint(trimmed_votes(np.stack(votes), trim)).astype(np.int32)
    m._update_theta(state, counts, theta_start, len(updates))
    if m.delta_downlink is not None:
        strata = [list(m.stratum(ctx, c)) for c in sorted(updates)] if m.opts.stratify else None
        state[AGGREGATED_KEY] = {"round": ctx.round, "clients": sorted(updates), **({"strata": strata} if strata else {})}
    weights = [u.n for u in updates.values()]
    for name in m.head_names:
        state["head"][name] = stepped(state["head"][name], weighted_mean([u.head_delta[name] for u in updates.values()], weights))
    theta = m.theta_of(state["theta_sym"], state["levels"])
    metrics = {key: float(np.mean(v)) for key, v in extra.items()}
    metrics.update(m.downlink_metrics(state, ctx))
    metrics.update({"mask_keep_frac": float((theta > 0.5).mean()), "theta_mean": float(theta.mean())})
    return state, metrics


def assert_same(got, want, where="state"):
    """The same tree: dicts with the same keys, arrays of the same dtype and bits, equal scalars."""
    assert type(got) is type(want), where
    if isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for key in want:
            assert_same(got[key], want[key], f"{where}[{key!r}]")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, np.ndarray):
        np.testing.assert_array_equal(got, want, strict=True, err_msg=where)
    else:
        assert got == want, where


CASES = [
    ("fedpm", {}),
    ("fedpm", {"carry_priors": True}),
    ("fedpm", {"aggregate": "delta"}),
    ("fedpm", {"stratify": True, "aggregate": "delta"}),
    ("deltamask", {}),
    ("deltamask", {"client_flip_cap": 0.02}),
    ("deltamask", {"vote_trim": 0.25, "aggregate": "delta"}),
    ("deltamask-exact", {"stratify": True}),
]


@pytest.mark.parametrize("name, options", CASES, ids=[f"{n}-{','.join(o) or 'default'}" for n, o in CASES])
def test_mask_aggregate_gives_the_whole_mask_implementations_bits(name, options):
    m = mask_method(name, 5000, **options)
    state, updates, ctx = round_updates(m)
    want_state, want_metrics = whole_mask_aggregate(m, copy.deepcopy(state), updates, ctx)
    got_state, got_metrics = m.aggregate(copy.deepcopy(state), updates, ctx)
    assert_same(got_state, want_state)
    got_metrics.pop("aggregate_s")
    assert got_metrics == want_metrics


def test_mask_aggregate_allocates_far_less_than_the_whole_mask_implementation():
    m = mask_method("deltamask", 200_000, aggregate="delta")  # a reference mask and a vote per client
    state, updates, ctx = round_updates(m)

    def peak(fn) -> float:
        s = copy.deepcopy(state)
        tracemalloc.start()
        fn(m, s, updates, ctx) if fn is whole_mask_aggregate else m.aggregate(s, updates, ctx)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top / m.n

    new, old = peak(None), peak(whole_mask_aggregate)
    # the old one held θ_start, int32 counts, float32 uniforms, the reference and an int32 vote (≥ 17 B);
    # now θ_start, int16 counts and the reference, besides what rebuild_mask itself makes
    assert old >= 17 and new <= old - 6, (new, old)
