"""Pinned algorithms: every method's server rule recomputed by hand on small, hand-chosen cases.

Each test builds real payloads (the method's own codec and frame) from tensors chosen here, runs
``decode_update`` and ``aggregate``, and compares the resulting *server state* with an independent
recomputation (float64 numpy, tight tolerances). Nothing here reads the keys of a decoded update,
so the tests survive decoded updates becoming typed objects.
"""

from __future__ import annotations

import copy
import math
import zlib

import numpy as np
import pytest
import torch
from conftest import tiny_config
from handmade import build, frame_size, fresh, hand_deltas, hand_head, mask_payload, parse_frame, shared_task

from fedsqueeze.codecs import CodecContext, decode_tensors, encode_tensors, frame, get_codec, unframe
from fedsqueeze.codecs.fusefilter import contain_c, parse_filter
from fedsqueeze.codecs.positions import encode_positions, entropy_bound_bits
from fedsqueeze.errors import PayloadError
from fedsqueeze.masking import MaskedModel, select_masked, train_masked
from fedsqueeze.methods import get_method
from fedsqueeze.methods.base import RoundContext
from fedsqueeze.methods.head import head_names
from fedsqueeze.methods.zo import Perturber
from fedsqueeze.methods.zo_wire import compact_frame
from fedsqueeze.privacy import dp_epsilon
from fedsqueeze.seeding import SERVER, np_rng, seed_int, torch_gen
from fedsqueeze.task import build_task
from fedsqueeze.training import Encoded, batch_inputs, evaluate, num_local_steps, train_local

TENSOR_METHODS = ["fedavg", "head", "topk", "qsgd", "signsgd", "eden", "fedsz", "bitfit", "lora", "adapter", "prompt", "ia3"]
PEFT = {"bitfit", "lora", "adapter", "prompt", "ia3"}


@pytest.fixture(scope="module")
def task():
    return shared_task()


# ---- tensor methods: weighted FedAvg rule, server_lr, every uplink codec ------------------------


@pytest.mark.parametrize("name", TENSOR_METHODS)
def test_tensor_method_server_update_is_the_example_weighted_mean(task, name):
    m = build(name, fresh(task) if name in PEFT else task, server_lr=0.5)
    state = m.init_server()
    w0 = {n: a.astype(np.float64) for n, a in state["weights"].items()}
    ctx = RoundContext(round=1, rounds=2, seed=3)
    sizes = {0: 3, 2: 13}  # unequal clients: weights 3/16 and 13/16
    decoded = {}
    updates = {}
    for c, n in sizes.items():
        delta = hand_deltas(m, seed=10 + c)
        payload = encode_tensors(m.up_codec, delta, CodecContext(seed=ctx.seed_for(c, "uplink")), n=n)
        sent, extra = decode_tensors(payload, CodecContext(max_elements=m.max_elements))
        assert extra == {"n": n}
        decoded[c] = {k: v.astype(np.float64) for k, v in sent.items()}
        if m.up_codec.codec_id == "raw":
            assert all(np.array_equal(sent[k], delta[k]) for k in m.names)
        updates[c] = m.decode_update(payload, c, state, ctx)
    state, _ = m.aggregate(state, updates, ctx)
    total = sum(sizes.values())
    for k in m.names:
        expected = w0[k] + 0.5 * sum(decoded[c][k] * sizes[c] / total for c in sizes)
        assert state["weights"][k].dtype == np.float32
        np.testing.assert_allclose(state["weights"][k], expected, rtol=1e-6, atol=1e-8, err_msg=f"{name}: {k}")


def test_fedavg_uniform_weights_would_be_wrong(task):
    """A case where the example weights matter a lot: one client of 1 example, one of 49."""
    m = build("head", task)
    state = m.init_server()
    w0 = {n: a.copy() for n, a in state["weights"].items()}
    ctx = RoundContext(round=1, rounds=1, seed=0)
    ones = {n: np.ones(m.shapes[n], np.float32) for n in m.names}
    zeros = {n: np.zeros(m.shapes[n], np.float32) for n in m.names}
    ups = {
        1: m.decode_update(encode_tensors(m.up_codec, ones, n=1), 1, state, ctx),
        3: m.decode_update(encode_tensors(m.up_codec, zeros, n=49), 3, state, ctx),
    }
    state, _ = m.aggregate(state, ups, ctx)
    for n in m.names:
        np.testing.assert_allclose(state["weights"][n], w0[n].astype(np.float64) + 0.02, rtol=1e-6, atol=1e-6)


def test_empty_round_keeps_the_state(task):
    m = build("head", task, server_lr=2.0)
    state = m.init_server()
    before = {n: a.copy() for n, a in state["weights"].items()}
    state, metrics = m.aggregate(state, {}, RoundContext(1, 1, 0))
    assert metrics == {} and all(np.array_equal(state["weights"][n], before[n]) for n in m.names)


def test_fedsz_compress_weights_turns_sent_weights_into_a_delta(task):
    m = build("fedsz", task, compress_weights=True, sz3_mode="abs", sz3_bound=1e-3)
    state = m.init_server()
    w0 = {n: a.astype(np.float64) for n, a in state["weights"].items()}
    ctx = RoundContext(1, 1, 0)
    d = hand_deltas(m, 5)
    trained = {n: (state["weights"][n] + d[n]).astype(np.float32) for n in m.names}
    payload = encode_tensors(m.up_codec, trained, n=4)
    sent, _ = decode_tensors(payload)
    state, _ = m.aggregate(state, {0: m.decode_update(payload, 0, state, ctx)}, ctx)
    for n in m.names:  # one client: the new weights are what it sent (up to float32 rounding)
        np.testing.assert_allclose(state["weights"][n], sent[n].astype(np.float64), rtol=1e-6, atol=1e-7)
        assert np.abs(sent[n] - trained[n]).max() <= 1e-3 * (1 + 1e-5)
        np.testing.assert_allclose(state["weights"][n], w0[n] + d[n], atol=1.01e-3)


def test_decode_update_rejects_a_missing_or_bad_example_count(task):
    m = build("head", task)
    state, ctx = m.init_server(), RoundContext(1, 1, 0)
    d = hand_deltas(m, 1)
    for extra in ({}, {"n": 0}, {"n": -3}, {"n": 2.5}, {"n": "7"}):
        with pytest.raises(PayloadError, match="example count"):
            m.decode_update(encode_tensors(m.up_codec, d, **extra), 0, state, ctx)
    bad = dict(d)
    bad[m.names[0]] = bad[m.names[0]].copy()
    bad[m.names[0]].flat[3] = np.nan
    with pytest.raises(PayloadError, match="NaN"):
        m.decode_update(encode_tensors(m.up_codec, bad, n=2), 0, state, ctx)
    with pytest.raises(PayloadError, match="wrong tensors"):
        m.decode_update(encode_tensors(m.up_codec, {m.names[0]: d[m.names[0]]}, n=2), 0, state, ctx)
    with pytest.raises(PayloadError, match="shape"):
        m.decode_update(encode_tensors(m.up_codec, {n: a.reshape(-1) for n, a in d.items()}, n=2), 0, state, ctx)


# ---- DP-FedAvg (privacy.py) ---------------------------------------------------------------------


def test_dp_aggregate_clips_sums_adds_noise_and_divides_by_clients_per_round(task):
    clip, sigma, lr = 0.05, 0.7, 0.5
    m = build("head", task, dp_clip=clip, dp_noise=sigma, server_lr=lr, dp_delta=1e-4)
    state = m.init_server()
    w0 = {n: a.astype(np.float64) for n, a in state["weights"].items()}
    ctx = RoundContext(round=2, rounds=3, seed=4)
    raw = {0: hand_deltas(m, 0, scale=1e-1), 1: hand_deltas(m, 1, scale=1e-4)}  # one clipped, one not
    ups = {c: m.decode_update(encode_tensors(m.up_codec, d, n=5 + 40 * c), c, state, ctx) for c, d in raw.items()}
    state, metrics = m.aggregate(state, ups, ctx)
    total = {n: np.zeros(m.shapes[n]) for n in m.names}
    norms = []
    for d in raw.values():
        norm = math.sqrt(sum(float((d[n].astype(np.float64) ** 2).sum()) for n in m.names))
        norms.append(norm)
        for n in m.names:
            total[n] += d[n].astype(np.float64) * min(1.0, clip / norm)  # uniform weights: no example counts
    assert norms[0] > clip > norms[1]
    rng = np_rng(4, 2, SERVER, "dp-noise")
    for n in m.names:  # noise σ·C on the sum, drawn tensor by tensor in the state's order
        expected = w0[n] + lr * (total[n] + rng.normal(0.0, sigma * clip, size=m.shapes[n])) / 2
        np.testing.assert_allclose(state["weights"][n], expected, rtol=1e-5, atol=1e-7)
    assert metrics["dp_clipped_fraction"] == 0.5
    assert metrics["dp_mean_update_norm"] == pytest.approx(np.mean(norms), rel=1e-9)
    assert metrics["dp_epsilon"] == dp_epsilon(2 / 4, sigma, 2, 1e-4) and metrics["dp_delta"] == 1e-4


def test_dp_without_noise_is_the_clipped_sum_over_k(task):
    m = build("head", task, dp_clip=1e-3)
    state = m.init_server()
    w0 = {n: a.astype(np.float64) for n, a in state["weights"].items()}
    ctx = RoundContext(1, 1, 0)
    d = hand_deltas(m, 2)
    state, metrics = m.aggregate(state, {0: m.decode_update(encode_tensors(m.up_codec, d, n=9), 0, state, ctx)}, ctx)
    norm = math.sqrt(sum(float((d[n].astype(np.float64) ** 2).sum()) for n in m.names))
    for n in m.names:  # one client of the two expected: its clipped update over K = 2
        np.testing.assert_allclose(state["weights"][n], w0[n] + d[n] * (1e-3 / norm) / 2, rtol=1e-5, atol=1e-9)
    assert metrics["dp_epsilon"] is None


# ---- byte counts against our own recount of the frames -------------------------------------------


def test_raw_payload_bytes_recount(task):
    m = build("head", task)
    d = hand_deltas(m, 0)
    payload = encode_tensors(m.up_codec, d, n=17)
    kind, meta, body = parse_frame(payload)
    table = [[n, "float32", list(m.shapes[n])] for n in m.names]
    assert kind == "raw" and meta == {"tensors": table, "extra": {"n": 17}}
    assert body == b"".join(d[n].astype("<f4").tobytes() for n in m.names)
    numel = sum(int(np.prod(s)) for s in m.shapes.values())
    assert len(payload) == frame_size("raw", meta, 4 * numel)


def test_round_record_bytes_and_accuracy_recount(tmp_path):
    """A whole simulator run: every round's byte counts equal our recount of the frames it sent,
    and the final accuracy is what evaluating the checkpointed final state gives."""
    from fedsqueeze.runtime import run_local
    from fedsqueeze.runtime.checkpoint import load_checkpoint

    cfg = tiny_config(method="head", out=str(tmp_path / "run"), rounds=2, clients=3, clients_per_round=2, train_size=90)
    res = run_local(cfg, show_progress=False)
    t = build_task(cfg)
    m = get_method("head")(cfg)
    m.setup(t)
    numel = sum(int(np.prod(s)) for s in m.shapes.values())
    table = [[n, "float32", list(m.shapes[n])] for n in m.names]
    down = frame_size("raw", {"tensors": table}, 4 * numel)
    sizes = {len(ix) for ix in t.client_indices}
    ups = {n: frame_size("raw", {"tensors": table, "extra": {"n": n}}, 4 * numel) for n in sizes}
    for r in res["rounds"]:
        assert r["clients_aggregated"] == 2 and r["downlink_bytes"] == 2 * down
        assert r["uplink_bytes"] in {a + b for a in ups.values() for b in ups.values()}
    ckpt = load_checkpoint(cfg.out)
    acc, loss = m.evaluate(ckpt.server_state)
    assert res["final"]["accuracy"] == res["rounds"][-1]["accuracy"] == acc
    assert res["rounds"][-1]["loss"] == pytest.approx(loss, rel=1e-9)


# ---- head: each client trains on its own cached features ------------------------------------------


def test_head_client_trains_on_its_own_features(task):
    m = build("head", task)
    state = m.init_server()
    ctx = RoundContext(round=1, rounds=1, seed=0)
    msg = m.downlink(state, ctx, 0)
    for client in (1, 3):
        update = m.decode_update(m.client_update(msg, client, None, ctx).payload, client, state, ctx)
        new, _ = m.aggregate({"weights": {n: a.copy() for n, a in state["weights"].items()}}, {client: update}, ctx)
        # independent: this client's features from the backbone itself, then the same local training
        data = task.client_data(client)
        with torch.no_grad():
            task.model.eval()
            feats = task.model.features(**batch_inputs(data, torch.arange(len(data))))
        head = copy.deepcopy(task.model.head)
        with torch.no_grad():
            head.weight.copy_(torch.from_numpy(state["weights"]["head.weight"]))
            head.bias.copy_(torch.from_numpy(state["weights"]["head.bias"]))
        steps = max(1, m.cfg.local_steps)
        train_local(
            head,
            list(head.parameters()),
            Encoded({"x": feats}, data.labels),
            steps=steps,
            batch_size=m.cfg.batch_size,
            lr=m.lr,
            generator=torch_gen(0, 1, client, "batches"),
            optimizer=m.opts.optimizer,
            forward=lambda inputs: head(inputs["x"]),
        )
        np.testing.assert_allclose(new["weights"]["head.weight"], head.weight.detach().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(new["weights"]["head.bias"], head.bias.detach().numpy(), rtol=1e-5, atol=1e-6)


# ---- mask methods: Beta rule, carried priors, delta rule, κ schedule -------------------------------


def reference(m, state, ctx, client):
    """``u < θ_start`` recomputed from the seeds (independent of the method's helpers)."""
    theta = np.clip(state["theta_sym"].astype(np.float32) / np.float32(state["levels"]), m.opts.clip_eps, 1 - m.opts.clip_eps)
    u = np_rng(ctx.seed, ctx.round, client, "mask-draw").random(m.n, dtype=np.float32)
    return u < theta.astype(np.float32), theta.astype(np.float32)


def check_head(m, state, head0, heads, sizes):
    total = sum(sizes.values())
    for n in m.head_names:
        expected = head0[n].astype(np.float64) + sum(heads[c][n].astype(np.float64) * sizes[c] / total for c in sizes)
        np.testing.assert_allclose(state["head"][n], expected, rtol=1e-6, atol=1e-8)


def test_fedpm_beta_rule_counts_the_masks(task):
    m = build("fedpm", task)
    state = m.init_server()
    head0 = {n: a.copy() for n, a in state["head"].items()}
    ctx = RoundContext(round=1, rounds=3, seed=2)
    rng = np.random.default_rng(0)
    keeps = {c: rng.random(m.n) < p for c, p in ((0, 0.9), (1, 0.5), (3, 0.2))}
    heads = {c: hand_head(m, c) for c in keeps}
    sizes = {0: 2, 1: 30, 3: 7}
    ups = {c: m.decode_update(mask_payload(m, state, ctx, c, keeps[c], heads[c], sizes[c]), c, state, ctx) for c in keeps}
    state, metrics = m.aggregate(state, ups, ctx)
    count = sum(k.astype(np.int64) for k in keeps.values())
    assert state["levels"] == 3
    np.testing.assert_array_equal(state["theta_sym"].astype(np.int64), count)  # θ = Σm / K exactly
    assert metrics["theta_mean"] == pytest.approx(count.mean() / 3, rel=1e-6)
    assert metrics["mask_keep_frac"] == pytest.approx((count / 3 > 0.5).mean())
    check_head(m, state, head0, heads, sizes)
    # the next downlink carries θ as K + 1 levels and the new head, exactly
    sym, levels, head, _ = m.decode_downlink(m.downlink(state, RoundContext(2, 3, 2), 0))
    assert levels == 3 and np.array_equal(sym.astype(np.int64), count)
    assert all(np.array_equal(head[n], state["head"][n]) for n in m.head_names)


def test_fedpm_carried_priors_accumulate_over_rounds(task):
    m = build("fedpm", task, carry_priors=True)
    state = m.init_server()
    rng = np.random.default_rng(1)
    total = np.zeros(m.n)
    for r in (1, 2):
        ctx = RoundContext(round=r, rounds=2, seed=0)
        keeps = {c: rng.random(m.n) < 0.6 for c in (0, 2)}
        total += sum(k.astype(np.float64) for k in keeps.values())
        ups = {c: m.decode_update(mask_payload(m, state, ctx, c, keeps[c], hand_head(m, c), 4), c, state, ctx) for c in keeps}
        state, _ = m.aggregate(state, ups, ctx)
        alpha, beta = 1 + total, 1 + 2 * r - total
        np.testing.assert_array_equal(state["alpha"], alpha)
        np.testing.assert_array_equal(state["beta"], beta)
        theta = (alpha - 1) / (alpha + beta - 2)
        assert state["levels"] == 255
        np.testing.assert_array_equal(state["theta_sym"], np.rint(theta * 255).astype(np.uint8))


@pytest.mark.parametrize(
    "name, opts",
    [("fedpm", {"aggregate": "delta"}), ("deltamask", {}), ("deltamask", {"filter": "fuse8"}), ("deltamask-exact", {"coder": "rice"})],
)
def test_delta_rule_moves_theta_by_the_mean_flip(task, name, opts):
    m = build(name, task, **opts)
    state = m.init_server()
    head0 = {n: a.copy() for n, a in state["head"].items()}
    ctx = RoundContext(round=1, rounds=4, seed=6)
    rng = np.random.default_rng(2)
    counts = np.zeros(m.n, np.int64)
    heads, sizes, ups, fps = {}, {0: 5, 2: 1}, {}, []
    for c in sizes:
        ref, theta_start = reference(m, state, ctx, c)
        flip = rng.choice(m.n, size=40, replace=False)  # well under the κ cap
        keep = ref.copy()
        keep[flip] ^= True
        heads[c] = hand_head(m, c)
        ups[c] = m.decode_update(mask_payload(m, state, ctx, c, keep, heads[c], sizes[c]), c, state, ctx)
        rebuilt = keep.copy()
        if opts.get("filter"):  # the filter's false positives flip too: ask the C library which
            _, meta, body = unframe(mask_payload(m, state, ctx, c, keep, heads[c], sizes[c]))
            mask_body = body[: meta["sections"][0]]
            hits = contain_c(parse_filter(meta["mask"], mask_body, m.n), np.arange(m.n, dtype=np.uint64))
            assert hits[flip].all()
            rebuilt = ref ^ hits
            fps.append(int(hits.sum()) - 40)
        counts += rebuilt.astype(np.int64) - ref.astype(np.int64)
    state, metrics = m.aggregate(state, ups, ctx)
    theta = np.clip(theta_start + counts.astype(np.float32) / np.float32(2), 0, 1)  # float32, as sent
    assert state["levels"] == 255
    np.testing.assert_array_equal(state["theta_sym"], np.rint(theta * 255).astype(np.uint8))
    check_head(m, state, head0, heads, sizes)
    if name != "fedpm":
        assert metrics["keys"] == 40
        assert metrics["fp_flips"] == (np.mean(fps) if opts.get("filter") else 0.0)


def test_deltamask_filter_stats_are_exact(task):
    m = build("deltamask", task, filter="fuse8")
    state = m.init_server()
    ctx = RoundContext(round=1, rounds=2, seed=1)
    ref, _ = reference(m, state, ctx, 0)
    keep = ref.copy()
    flip = np.arange(3, m.n, 97)
    keep[flip] ^= True
    payload = mask_payload(m, state, ctx, 0, keep, hand_head(m, 0), 3)
    _, meta, body = parse_frame(payload)
    fp_bytes = body[: meta["sections"][0]]
    hits = contain_c(parse_filter(meta["mask"], fp_bytes, m.n), np.arange(m.n, dtype=np.uint64))
    _, metrics = m.aggregate(state, {0: m.decode_update(payload, 0, state, ctx)}, ctx)
    assert meta["mask"]["size"] == flip.size == metrics["keys"]
    assert metrics["fp_flips"] == hits.sum() - flip.size
    assert metrics["mask_bits_per_key"] == 8 * len(fp_bytes) / flip.size


def kappa(schedule, start, end, r, rounds):
    t = (r - 1) / max(rounds - 1, 1)
    return start + t * (end - start) if schedule == "linear" else start * (end / start) ** t


@pytest.mark.parametrize("schedule", ["linear", "geometric"])
def test_kappa_schedule_caps_the_positions_sent(task, schedule):
    start, end, rounds = 0.03, 0.004, 5
    m = build("deltamask-exact", task, kappa_start=start, kappa_end=end, kappa_schedule=schedule)
    state = m.init_server()
    for r in (1, 2, 4, 5):
        ctx = RoundContext(round=r, rounds=rounds, seed=0)
        ref, theta_start = reference(m, state, ctx, 1)
        u = np_rng(0, r, 1, "mask-draw").random(m.n, dtype=np.float32)
        # θc = u/2 on every kept position flips it off with |θc − θg| = θg − u/2 (distinct), θc = 0 on
        # a few flips them off with the largest move of all: those must always be sent
        theta_c = np.where(ref, u / 2, theta_start).astype(np.float32)
        strong = np.flatnonzero(ref)[:5]
        theta_c[strong] = 0.0
        sym, levels = state["theta_sym"], int(state["levels"])
        meta, body, stats = m.encode_mask(u, theta_c, theta_start, sym, levels, ctx)
        cap = int(kappa(schedule, start, end, r, rounds) * m.n)
        flips = np.flatnonzero(ref)
        assert stats["flips_total"] == flips.size > cap
        moved = theta_start[flips].astype(np.float64) - np.where(np.isin(flips, strong), 0.0, u[flips] / 2)
        expected = np.sort(flips[np.argsort(-moved, kind="stable")[:cap]])
        head_meta, head_body = m.wire.encode_head(hand_head(m, 0))
        payload = frame(m.uplink_kind, {"n": 2, "mask": meta, "head": head_meta, "sections": [len(body), len(head_body)]}, body + head_body)
        new, metrics = m.aggregate(copy.deepcopy(state), {1: m.decode_update(payload, 1, state, ctx)}, ctx)
        assert metrics["keys"] == cap and set(strong) <= set(expected)
        theta = np.clip(theta_start - np.isin(np.arange(m.n), expected).astype(np.float32), 0, 1)
        np.testing.assert_array_equal(new["theta_sym"], np.rint(theta * 255).astype(np.uint8))


def test_stratified_uniforms_follow_the_participants(task):
    m = build("fedpm", task, stratify=True)
    state = m.init_server()
    ctx = RoundContext(round=2, rounds=3, seed=5, participants=(0, 3))
    for c in (3, 0):  # the call order does not matter: the strata are the indices among the participants
        m.downlink(state, ctx, c)
    v = np_rng(5, 2, SERVER, "mask-draw").random(m.n, dtype=np.float32)
    for c, k in ((0, 0), (3, 1)):
        _, _, _, stratum = m.decode_downlink(m.downlink(state, ctx, c))
        assert stratum == (k, 2)
        expected = v + np.float32(k / 2)
        expected[expected >= 1] -= 1
        np.testing.assert_array_equal(m.server_uniforms(ctx, c), expected)
    with pytest.raises(PayloadError, match="stratum"):
        m.server_uniforms(ctx, 1)  # no downlink, no stratum


# ---- DeComFL: mean vs median, replay, warm start, lr schedule -------------------------------------


def zo_expected(m, w0, seeds, scalars, lr):
    z = {}
    out = {n: a.astype(np.float64).copy() for n, a in w0.items()}
    for k, seed in enumerate(seeds):
        for i in range(scalars.shape[1]):
            probe = [torch.zeros_like(m.named[n]) for n in m.names]
            Perturber(probe).add(int(seed), i, 1.0)
            for n, zi in zip(m.names, probe):
                z[n] = zi.numpy().astype(np.float64)
                out[n] -= lr * float(scalars[k, i]) / scalars.shape[1] * z[n]
    return out


@pytest.mark.parametrize("aggregation", ["mean", "median"])
def test_decomfl_combines_the_scalars_and_replays_them(task, aggregation):
    m = build("decomfl", task, params="head", warm_start_rounds=0, perturbations=2, aggregate=aggregation)
    state = m.init_server()
    w0 = {n: a.copy() for n, a in state["weights"].items()}
    ctx = RoundContext(round=1, rounds=2, seed=9)
    k, p = m.k, m.p
    scalars = {c: np.arange(k * p, dtype=np.float32).reshape(k, p) * s + s for c, s in ((0, 1.0), (1, 2.0), (3, 30.0))}
    ups = {c: m.decode_update(compact_frame("decomfl-up", 1, [], g.astype("<f4").tobytes()), c, state, ctx) for c, g in scalars.items()}
    state, metrics = m.aggregate(state, ups, ctx)
    stack = np.stack(list(scalars.values())).astype(np.float64)
    combined = np.median(stack, axis=0) if aggregation == "median" else stack.mean(axis=0)
    seeds = np_rng(9, 1, SERVER, "decomfl-seeds").integers(0, 1 << 63, size=k, dtype=np.uint64)
    expected = zo_expected(m, w0, seeds, combined, m.lr)
    for n in m.names:
        np.testing.assert_allclose(state["weights"][n], expected[n], rtol=1e-5, atol=1e-6)
    assert metrics["zo_scalar_abs_mean"] == pytest.approx(np.abs(combined).mean(), rel=1e-6)
    # the next message to a client that missed round 1 carries exactly that record (our own parse):
    # tag (kind 2, version 1), round 2, no head, one run of 1 record ending 0 rounds back, K·P float32, CRC
    msg = m.downlink(state, RoundContext(2, 2, 9), 2)
    assert msg[:6] == bytes([0x21, 2, 0, 1, 0, 1])
    np.testing.assert_array_equal(np.frombuffer(msg[6:-4], "<f4").reshape(k, p), combined.astype(np.float32))
    assert msg[-4:] == zlib.crc32(msg[:-4]).to_bytes(4, "little")
    assert np.array_equal(m.step_seeds(1, 9), seeds)  # the seeds are derived, never sent


def test_decomfl_warm_start_is_weighted_and_rounded_to_the_wire_dtype(task):
    m = build("decomfl", task, params="head", warm_start_rounds=1)
    state = m.init_server()
    w0 = {n: a.astype(np.float64) for n, a in state["weights"].items()}
    ctx = RoundContext(round=1, rounds=3, seed=0)
    raw = get_codec("raw")
    deltas = {c: {n: (np.random.default_rng(c).standard_normal(w0[n].shape) * 1e-2).astype(np.float16) for n in m.head} for c in (0, 1)}
    sizes = {0: 1, 1: 3}
    ups = {c: m.decode_update(encode_tensors(raw, deltas[c], n=sizes[c]), c, state, ctx) for c in deltas}
    state, _ = m.aggregate(state, ups, ctx)
    for n in m.head:
        expected = w0[n] + sum(deltas[c][n].astype(np.float64) * sizes[c] / 4 for c in sizes)
        np.testing.assert_allclose(state["weights"][n], expected.astype(np.float16).astype(np.float32), rtol=2e-3, atol=1e-6)
        assert np.array_equal(state["weights"][n], state["weights"][n].astype(np.float16).astype(np.float32))
        assert np.array_equal(state["warm_head"][n], state["weights"][n].astype(np.float16))


@pytest.mark.parametrize("schedule", ["constant", "cosine", "exp"])
def test_decomfl_lr_schedule(task, schedule):
    m = build("decomfl", task, params="head", warm_start_rounds=1, lr_schedule=schedule, lr_decay=0.7)
    lr, span = m.lr, max(1, m.cfg.rounds - 1)
    for r in (2, 3):
        t = r - 2
        expected = {"constant": lr, "cosine": lr * 0.5 * (1 + math.cos(math.pi * t / span)), "exp": lr * 0.7**t}[schedule]
        assert m.lr_at(r) == pytest.approx(expected, rel=1e-12)


# ---- client side: what a client trains and uploads, recomputed with the training primitives -------


def test_optimizer_groups(task):
    fedavg = build("fedavg", task, head_lr=0.03)
    groups = fedavg.param_groups()
    head_ids = {id(p) for p in task.model.head.parameters()}
    assert [g["lr"] for g in groups] == [fedavg.lr, 0.03]
    assert {id(p) for p in groups[1]["params"]} == head_ids
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in task.model.parameters()} - head_ids
    assert [g["lr"] for g in build("fedavg", task, head_lr=0.0).param_groups()] == [fedavg.lr, fedavg.lr]
    head = build("head", task, head_lr=0.03)  # only the head trains: it takes the method's lr
    assert [(g["lr"], len(g["params"])) for g in head.param_groups()] == [(head.lr, 2)]


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_tensor_client_uploads_its_trained_delta(task, optimizer):
    t = fresh(task)
    m = build("bitfit", t, optimizer=optimizer, head_lr=0.05)
    state = m.init_server()
    ctx = RoundContext(round=2, rounds=3, seed=4)
    client = 3
    start = copy.deepcopy(t.model)  # independent: the same local training on a copy of the model
    out = m.client_update(m.downlink(state, ctx, client), client, None, ctx)
    named = dict(start.named_parameters())
    for n, p in named.items():
        p.requires_grad_(n in m.names)
    rest = [named[n] for n in m.names if not n.startswith("head.")]
    head = [named[n] for n in m.names if n.startswith("head.")]
    data = t.client_data(client)
    steps = num_local_steps(len(data), m.cfg.batch_size, m.cfg.local_steps, m.cfg.local_epochs)
    torch.manual_seed(seed_int(4, 2, client, "dropout-layers"))
    train_local(
        start,
        [{"params": rest, "lr": m.lr}, {"params": head, "lr": 0.05}],
        data,
        steps=steps,
        batch_size=m.cfg.batch_size,
        lr=m.lr,
        generator=torch_gen(4, 2, client, "batches"),
        optimizer=optimizer,
    )
    delta, extra = decode_tensors(out.payload)
    assert extra == {"n": len(data)}
    for n in m.names:
        expected = named[n].detach().numpy() - state["weights"][n]
        np.testing.assert_allclose(delta[n], expected, rtol=1e-5, atol=1e-7, err_msg=n)
        assert np.abs(delta[n]).max() > 0


def test_fedpm_client_draws_its_mask_from_its_trained_probabilities(task):
    m = build("fedpm", task, score_lr=0.5)
    state = m.init_server()
    head0 = {n: a.copy() for n, a in state["head"].items()}
    ctx = RoundContext(round=1, rounds=2, seed=8)
    client = 2
    out = m.client_update(m.downlink(state, ctx, client), client, None, ctx)
    # independent: the same masked training of scores and head on a copy of the head
    theta = np.clip(state["theta_sym"].astype(np.float32) / np.float32(state["levels"]), m.opts.clip_eps, 1 - m.opts.clip_eps)
    scores = torch.from_numpy((np.log(theta) - np.log1p(-theta)).astype(np.float32)).requires_grad_(True)
    named = dict(task.model.named_parameters())
    head_params = [named[n] for n in head_names(task.model)]
    with torch.no_grad():
        for n, p in zip(head_names(task.model), head_params):
            p.copy_(torch.from_numpy(head0[n]))
    data = task.client_data(client)
    torch.manual_seed(seed_int(8, 1, client, "dropout-layers"))
    steps = num_local_steps(len(data), m.cfg.batch_size, m.cfg.local_steps, m.cfg.local_epochs)
    train_masked(
        MaskedModel(task.model, select_masked(task.model)),
        scores,
        head_params,
        data,
        steps=steps,
        batch_size=m.cfg.batch_size,
        score_lr=0.5,
        head_lr=m.opts.head_lr,
        generator=torch_gen(8, 1, client, "batches"),
        mask_generator=torch_gen(8, 1, client, "mask-train"),
        optimizer=m.opts.optimizer,
    )
    u = np_rng(8, 1, client, "mask-draw").random(m.n, dtype=np.float32)
    mask = u < torch.sigmoid(scores.detach()).numpy()
    trained_head = {n: p.detach().numpy().copy() for n, p in zip(head_names(task.model), head_params)}
    assert out.metrics["mask_ones"] == pytest.approx(mask.mean())
    new, _ = m.aggregate(state, {client: m.decode_update(out.payload, client, state, ctx)}, ctx)
    assert new["levels"] == 1
    np.testing.assert_array_equal(new["theta_sym"], mask.astype(np.uint8))  # one client: θ = its mask
    for n in trained_head:
        np.testing.assert_allclose(new["head"][n], trained_head[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("how", ["expected", "threshold", "sample"])
def test_mask_evaluation_uses_the_configured_mask(task, how):
    m = build("fedpm", task, eval_mask=how)
    state = m.init_server()
    rng = np.random.default_rng(3)
    state["theta_sym"] = rng.integers(0, 256, m.n).astype(np.uint8)
    state["head"] = {n: a + hand_head(m, 1)[n] for n, a in state["head"].items()}
    theta = state["theta_sym"].astype(np.float32) / np.float32(255)
    if how == "expected":
        mask = theta
    elif how == "threshold":
        mask = (theta > 0.5).astype(np.float32)
    else:
        u = np_rng(m.cfg.seed, 0, SERVER, "eval-mask").random(m.n, dtype=np.float32)
        mask = (u < np.clip(theta, m.opts.clip_eps, 1 - m.opts.clip_eps)).astype(np.float32)
    acc, loss = m.evaluate(state)
    model = copy.deepcopy(task.model)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for n in m.head_names:
            named[n].copy_(torch.from_numpy(state["head"][n]))
        for name, off in zip(m.layout.names, m.layout.offsets):
            w = named[name]
            w.mul_(torch.from_numpy(mask[off : off + w.numel()]).view(w.shape))
    acc2, loss2 = evaluate(model, task.test, m.cfg.eval_batch_size)
    assert acc == acc2 and loss == pytest.approx(loss2, rel=1e-5)


def test_tensor_evaluation_loads_the_state(task):
    m = build("head", task)
    state = m.init_server()
    state["weights"] = {n: a + hand_deltas(m, 9, scale=1.0)[n] for n, a in state["weights"].items()}
    acc, loss = m.evaluate(state)
    head = copy.deepcopy(task.model.head)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(state["weights"]["head.weight"]))
        head.bias.copy_(torch.from_numpy(state["weights"]["head.bias"]))
        task.model.eval()
        logits = head(task.model.features(**batch_inputs(task.test, torch.arange(len(task.test)))))
    assert acc == pytest.approx(float((logits.argmax(-1) == task.test.labels).double().mean()), abs=1e-12)
    assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, task.test.labels)), rel=1e-5)
    fed = build("bitfit", fresh(task))
    fstate = fed.init_server()
    fstate["weights"] = {n: a + hand_deltas(fed, 2, scale=0.5)[n] for n, a in fstate["weights"].items()}
    facc, floss = fed.evaluate(fstate)
    model = copy.deepcopy(fed.task.model)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for n in fed.names:
            named[n].copy_(torch.from_numpy(fstate["weights"][n]))
    assert (facc, floss) == pytest.approx(evaluate(model, task.test, fed.cfg.eval_batch_size), rel=1e-6)


# ---- mask messages: every header field of the downlink and the uplink is checked -----------------


def redo(message: bytes, **changes) -> bytes:
    """``message`` re-framed with some meta fields replaced (None: removed)."""
    kind, meta, body = unframe(message)
    meta = {k: v for k, v in {**meta, **changes}.items() if v is not None}
    return frame(kind, meta, bytes(body))


def test_mask_downlink_header_checks(task):
    m = build("fedpm", task, stratify=True, downlink="full")  # the delta downlink's checks: tests/test_mask_downlink.py
    state = m.init_server()
    ctx = RoundContext(round=1, rounds=2, seed=0, participants=(1, 2))
    msg = m.downlink(state, ctx, 2)
    sym, levels, _, stratum = m.decode_downlink(msg)
    assert levels == 255 and sym.dtype == np.uint8 and stratum == (1, 2)
    for bad in ("3", 0, 65536, None):
        with pytest.raises(PayloadError, match="level count"):
            m.decode_downlink(redo(msg, levels=bad if bad is not None else "x"))
    for bad in ([1, 1], [0, (1 << 20) + 1], ["0", 2], [0], "ab", [-1, 2], [True, 2]):
        with pytest.raises(PayloadError, match="stratum"):
            m.decode_downlink(redo(msg, stratum=bad))
    assert m.decode_downlink(redo(msg, stratum=[5, 1 << 20]))[3] == (5, 1 << 20)
    with pytest.raises(PayloadError):
        m.decode_downlink(redo(msg, theta=None))
    with pytest.raises(PayloadError):
        m.decode_downlink(redo(msg, sections=[1, 2, 3]))
    # one client aggregated: θ travels as 2 levels (K = 1); 256+ levels need 16-bit symbols
    one = {**state, "theta_sym": (np.arange(m.n) % 2).astype(np.uint8), "levels": 1}
    sym1, levels1, _, _ = m.decode_downlink(m.downlink(one, RoundContext(2, 2, 0), 0))
    assert levels1 == 1 and np.array_equal(sym1, one["theta_sym"])
    many = {**state, "theta_sym": (np.arange(m.n) % 300).astype(np.uint16), "levels": 300}
    sym2, _, _, _ = m.decode_downlink(m.downlink(many, RoundContext(3, 3, 0), 0))
    assert sym2.dtype == np.uint16 and np.array_equal(sym2, many["theta_sym"])
    bare = RoundContext(round=1, rounds=2, seed=0)  # no participants: K = clients_per_round, k = client mod K
    assert [m.stratum(bare, c) for c in (4, 1, 3)] == [(4 % 2, 2), (1, 2), (3 % 2, 2)]


@pytest.mark.parametrize(
    "name, options, field",
    [
        ("deltamask", {"filter": "fuse16"}, ("kind", "fuse16")),
        ("deltamask", {"filter": "xor8"}, ("kind", "xor8")),
        ("deltamask-exact", {"coder": "elias-fano"}, ("coder", "elias-fano")),
    ],
)
def test_position_coder_options_reach_the_wire(task, name, options, field):
    m = build(name, task, **options)
    state = m.init_server()
    ctx = RoundContext(round=1, rounds=2, seed=0)
    ref, _ = reference(m, state, ctx, 0)
    keep = ref.copy()
    keep[[5, 50, 500]] ^= True
    payload = mask_payload(m, state, ctx, 0, keep, hand_head(m, 0), 2)
    assert unframe(payload)[1]["mask"][field[0]] == field[1]
    new, metrics = m.aggregate(copy.deepcopy(state), {0: m.decode_update(payload, 0, state, ctx)}, ctx)
    assert metrics["keys"] == 3
    if name == "deltamask-exact":
        assert metrics["bound_bits_per_key"] == pytest.approx(entropy_bound_bits(3, m.n) / 3)
        assert metrics["fp_flips"] == 0
        upd = m.decode_update(payload, 0, state, ctx)
        theta_start = m.start_theta(m.theta_of(state["theta_sym"], state["levels"]))
        mask, _ = m.rebuild_mask(upd, theta_start, None, 0, ctx)  # without a reference: it redraws it
        np.testing.assert_array_equal(mask.astype(bool), keep)


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("fedpm", {}, "no mask header"),
        ("deltamask", {"filter": "fuse8"}, "no filter header"),
        ("deltamask", {}, "no position header"),
        ("deltamask-exact", {"coder": "rice"}, "no position header"),
    ],
)
def test_mask_uplink_header_checks(task, name, options, match):
    m = build(name, task, **options)
    state = m.init_server()
    ctx = RoundContext(round=1, rounds=2, seed=0)
    ref, _ = reference(m, state, ctx, 0)
    payload = mask_payload(m, state, ctx, 0, ref, hand_head(m, 0), 2)
    with pytest.raises(PayloadError, match=match):
        m.decode_update(redo(payload, mask=None), 0, state, ctx)
    for n in (0, -1, 1.5, "2"):
        with pytest.raises(PayloadError, match="example count"):
            m.decode_update(redo(payload, n=n), 0, state, ctx)
    with pytest.raises(PayloadError, match="sections"):
        m.decode_update(redo(payload, sections=[len(unframe(payload)[2])]), 0, state, ctx)
    if name == "deltamask-exact":
        meta = unframe(payload)[1]["mask"]
        positions, body = encode_positions(np.array([1, 2]), m.n - 1)
        _, pmeta, pbody = unframe(payload)
        bad = frame(
            pmeta and unframe(payload)[0],
            {**pmeta, "mask": positions, "sections": [len(body), pmeta["sections"][1]]},
            body + bytes(pbody)[pmeta["sections"][0] :],
        )
        assert meta["universe"] == m.n
        with pytest.raises(PayloadError, match=f"position set is over {m.n - 1} positions, the mask has {m.n}"):
            m.decode_update(bad, 0, state, ctx)


@pytest.mark.parametrize("codec, options", [("qsgd", {"qsgd_levels": 4}), ("topk", {"topk_k": 0.2})])
def test_client_codec_gets_its_seed_and_memory(task, codec, options):
    t = fresh(task)
    m = build("bitfit", t, uplink_codec=codec, **options)
    state = m.init_server()
    ctx = RoundContext(round=1, rounds=2, seed=2)
    client = 1
    before = copy.deepcopy(t.model)
    memory = {"ef:topk": {n: np.full(int(np.prod(m.shapes[n])), 1e-3, np.float32) for n in m.names}} if codec == "topk" else {}
    out = m.client_update(m.downlink(state, ctx, client), client, copy.deepcopy(memory), ctx)
    assert 0 <= out.metrics["train_s"] < 60 and 0 <= out.metrics["codec_s"] < 60
    trained = dict(t.model.named_parameters())
    delta = {n: trained[n].detach().numpy() - state["weights"][n] for n in m.names}
    assert all(np.array_equal(dict(before.named_parameters())[n].detach().numpy(), state["weights"][n]) for n in m.names)
    cctx = CodecContext(seed=seed_int(2, 1, client, "uplink"), state=copy.deepcopy(memory))
    expected, _ = decode_tensors(encode_tensors(m.up_codec, delta, cctx, n=4))
    got, extra = decode_tensors(out.payload)
    assert extra["n"] == len(t.client_indices[client])
    for n in m.names:
        np.testing.assert_allclose(got[n], expected[n], rtol=1e-5, atol=1e-7, err_msg=n)
    if codec == "topk":
        assert set(out.state) == {"ef:topk"}
        for n in m.names:
            np.testing.assert_allclose(out.state["ef:topk"][n], cctx.state["ef:topk"][n], rtol=1e-5, atol=1e-7)
    else:
        assert out.state is None


def test_client_rejects_a_server_message_over_the_element_cap(task):
    m = build("head", task)
    state = m.init_server()
    ctx = RoundContext(1, 1, 0)
    big = {**state["weights"], "extra": np.zeros(m.max_elements, np.float32)}
    with pytest.raises(PayloadError, match="over the cap"):
        m.client_update(encode_tensors(m.down_codec, big), 0, None, ctx)


def test_mask_state_types_and_timing(task):
    m = build("fedpm", task, carry_priors=True)
    state = m.init_server()
    assert state["theta_sym"].dtype == np.uint8 and state["alpha"].dtype == state["beta"].dtype == np.float32
    ctx = RoundContext(1, 2, 0)
    ref, _ = reference(m, state, ctx, 0)
    payload = mask_payload(m, state, ctx, 0, ref, hand_head(m, 0), 2)
    other = build("deltamask", task)
    with pytest.raises(PayloadError, match="kind|exceeds the cap"):  # a whole mask is over deltamask's limits too
        other.decode_update(payload, 0, other.init_server(), ctx)  # a fedpm upload is not a deltamask one
    new, metrics = m.aggregate(state, {0: m.decode_update(payload, 0, state, ctx)}, ctx)
    assert new["theta_sym"].dtype == np.uint8 and 0 <= metrics["aggregate_s"] < 60
    beta = build("fedpm", task)
    s2, _ = beta.aggregate(beta.init_server(), {0: beta.decode_update(payload, 0, beta.init_server(), ctx)}, ctx)
    assert s2["theta_sym"].dtype == np.uint8 and s2["levels"] == 1
    delta = build("fedpm", task, aggregate="delta")
    s3, _ = delta.aggregate(delta.init_server(), {0: delta.decode_update(payload, 0, delta.init_server(), ctx)}, ctx)
    assert s3["theta_sym"].dtype == np.uint8
    bad_head = {n: np.zeros((2, 2), np.float32) for n in m.head_names}
    with pytest.raises(PayloadError, match="head tensor"):
        m.decode_update(mask_payload(m, state, ctx, 0, ref, bad_head, 2), 0, state, ctx)
    emb = build("fedpm", fresh(task), mask_embeddings=True)
    embeddings = sum(mod.weight.numel() for mod in task.model.backbone.modules() if isinstance(mod, torch.nn.Embedding))
    assert emb.n == m.n + embeddings
