"""DeComFL: replay is bit-exact, payloads are tiny and checked, the method runs end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config
from handmade import assert_accuracy_is_real

from fedsqueeze.errors import PayloadError
from fedsqueeze.methods import RoundContext
from fedsqueeze.methods.decomfl_wire import decode_downlink
from fedsqueeze.methods.zo import Perturber, estimate_step
from fedsqueeze.methods.zo_wire import compact_frame
from fedsqueeze.runtime import run_local
from fedsqueeze.runtime.local import prepare

SLACK = 16  # issue 16: a zeroth-order message costs at most its information content + 16 bytes


def _play(method, state, client_states, ctx, clients):
    """One round by hand: downlink, client update, decode, aggregate. Returns the messages."""
    messages, updates = {}, {}
    for c in clients:
        messages[c] = method.downlink(state, ctx, c)
        out = method.client_update(messages[c], c, client_states.get(c), ctx)
        client_states[c] = out.state
        updates[c] = method.decode_update(out.payload, c, state, ctx)
    state, _ = method.aggregate(state, updates, ctx)
    return state, messages


@pytest.fixture(scope="module")
def full_method():
    cfg = tiny_config(
        method="decomfl",
        clients=3,
        rounds=8,
        local_steps=2,
        threads=1,
        lr=1e-3,
        options={"params": "full", "warm_start_rounds": 1, "warm_start_steps": 5, "perturbations": 2},
    )
    method, _ = prepare(cfg)
    return method


def test_absent_client_replays_to_bit_identical_weights(full_method):
    m = full_method
    state = m.init_server()
    clients: dict[int, dict] = {}
    # client 0 takes part every round; client 1 in round 1, then away for rounds 2-6; client 2 from round 2
    plan = {1: [0, 1], 2: [0, 2], 3: [0, 2], 4: [0, 2], 5: [0, 2], 6: [0, 2], 7: [0, 1, 2]}
    server_after = {}
    for r, who in plan.items():
        state, messages = _play(m, state, clients, RoundContext(r, 8, 0), who)
        server_after[r] = {n: a.copy() for n, a in state["weights"].items()}
    # in round 7, client 1 received the 5 records it missed (rounds 2..6) and the warm-started head
    down = decode_downlink(messages[1], m.wire, 7)
    assert down.rounds == [2, 3, 4, 5, 6] and down.head is not None
    info = m.head_elements * 2 + 5 * m.k * m.p * 4  # the head once, and 5 records of K·P float32
    assert info < len(messages[1]) <= info + SLACK
    moved = False
    for n in m.names:
        b = torch.from_numpy(clients[1]["weights"][n])
        assert torch.equal(b, torch.from_numpy(clients[0]["weights"][n])), n
        assert torch.equal(b, torch.from_numpy(server_after[6][n])), n
        moved |= not torch.equal(b, torch.from_numpy(m.initial[n]))
    assert moved  # the replayed model is not trivially the pre-trained one
    # history is kept back to the stalest client only (everyone synced to round 6 now)
    assert [r["round"] for r in state["history"]] == [7]


def test_messages_are_seeds_and_scalars(full_method):
    m = full_method
    state = m.init_server()
    clients: dict[int, dict] = {}
    state, _ = _play(m, state, clients, RoundContext(1, 8, 0), [0])
    ctx = RoundContext(2, 8, 0)
    msg = m.downlink(state, ctx, 0)
    out = m.client_update(msg, 0, clients[0], ctx)
    assert m.k * m.p * 4 < len(out.payload) <= m.k * m.p * 4 + SLACK
    assert np.all(np.isfinite(m.decode_update(out.payload, 0, state, ctx).scalars))
    # a message for another round, a truncated one, or NaN scalars are refused
    with pytest.raises(PayloadError):
        m.decode_update(out.payload, 0, state, RoundContext(3, 8, 0))
    with pytest.raises(PayloadError):
        m.decode_update(out.payload[:-5], 0, state, ctx)
    nan = compact_frame("decomfl-up", 2, [], np.full(m.k * m.p, np.nan, dtype="<f4").tobytes())
    with pytest.raises(PayloadError):
        m.decode_update(nan, 0, state, ctx)
    with pytest.raises(PayloadError):
        m.client_update(msg[:-3], 0, clients[0], ctx)


def test_perturb_restore_and_replay_are_deterministic():
    torch.manual_seed(0)
    w = [torch.randn(300, 7), torch.randn(5)]
    start = [t.clone() for t in w]
    pert = Perturber(w, chunk=512)  # several chunks per tensor
    pert.add(seed=123, index=0, alpha=0.5)
    pert.add(seed=123, index=0, alpha=-0.5)
    for a, b in zip(w, start):
        assert torch.allclose(a, b, atol=1e-6)
    # the estimate of a linear loss's directional derivative is exact: g = <c, z>
    c = [torch.randn(300, 7), torch.randn(5)]
    loss = lambda: float(sum((ci * wi).sum() for ci, wi in zip(c, w)))
    z_dot = []
    for i in range(2):
        probe = [torch.zeros_like(t) for t in w]
        Perturber(probe).add(seed=7, index=i, alpha=1.0)
        z_dot.append(float(sum((ci * zi).sum() for ci, zi in zip(c, probe))))
    w64 = [t.double() for t in w]
    w[:] = [t.clone() for t in w64]
    g = estimate_step(Perturber(w), loss, seed=7, perturbations=2, mu=1e-3, difference="central", lr=0.0)
    np.testing.assert_allclose(g, z_dot, rtol=1e-4)


@pytest.mark.parametrize(
    "options",
    [
        {"params": "full", "warm_start_rounds": 1, "perturbations": 2},
        {"params": "head", "warm_start_rounds": 0, "difference": "forward", "aggregate": "median", "lr_schedule": "cosine"},
        {"params": "lora", "warm_start_rounds": 1, "warm_start_steps": 3},
    ],
)
def test_runs_end_to_end_with_tiny_uplink(tiny_cfg, options):
    cfg = tiny_cfg(method="decomfl", rounds=3, local_steps=3, threads=1, options=dict(options))
    res = run_local(cfg, show_progress=False)
    k, p, w = 3, options.get("perturbations", 1), options["warm_start_rounds"]
    assert res["trainable_params"] < res["model_params"] or options.get("params", "full") == "full"
    assert_accuracy_is_real(cfg, res)
    for r in res["rounds"]:
        per_client = r["uplink_bytes"] / r["clients_uploaded"]
        if r["round"] > w:
            assert k * p * 4 < per_client <= k * p * 4 + SLACK
            assert r["downlink_bytes"] / r["clients"] < 3 * 4 * k * p + SLACK + 21_000  # scalars of the missed rounds, head once


def test_resent_records_are_skipped(full_method):
    """A client whose upload was lost is behind in the server's books; re-sent records are not re-applied."""
    m = full_method
    state = m.init_server()
    clients: dict[int, dict] = {}
    for r in (1, 2, 3):
        state, _ = _play(m, state, clients, RoundContext(r, 8, 0), [0])
    state["synced"][0] = 1  # as if round 3's upload never arrived: the server re-sends round 2's record
    ctx = RoundContext(4, 8, 0)
    msg = m.downlink(state, ctx, 0)
    assert decode_downlink(msg, m.wire, 4).rounds == [2, 3]
    out = m.client_update(msg, 0, clients[0], ctx)
    for n in m.names:
        assert torch.equal(torch.from_numpy(out.state["weights"][n]), torch.from_numpy(state["weights"][n])), n


def test_dropped_and_corrupted_clients_do_not_stop_the_run(tiny_cfg):
    cfg = tiny_cfg(
        method="decomfl",
        rounds=5,
        clients=4,
        clients_per_round=2,
        local_steps=2,
        threads=1,
        fault_corrupt=0.3,
        dropout=0.2,
        options={"params": "head", "warm_start_rounds": 1},
    )
    res = run_local(cfg, show_progress=False)
    assert len(res["rounds"]) == 5
    assert any(r["dropped"] for r in res["rounds"])
    assert_accuracy_is_real(cfg, res)


@pytest.mark.parametrize("k,p", [(1, 5), (3, 2)])  # DeComFL's headline setting, and another
def test_every_message_is_its_information_content_plus_16_bytes(k, p):
    """Up: K·P float32. Down: K·P float32 per missed record (+ the warm-start head once); no seeds."""
    options = {"params": "head", "warm_start_rounds": 1, "warm_start_steps": 2, "perturbations": p}
    m, _ = prepare(tiny_config(method="decomfl", clients=4, rounds=7, local_steps=k, threads=1, options=options))
    state, clients = m.init_server(), {}
    plan = {1: [0, 1], 2: [0, 2], 3: [0, 1, 3], 4: [2], 5: [0, 3], 6: [1, 2, 3], 7: [0, 1]}
    seen = dict.fromkeys(range(4), 0)  # the last round each client took part in
    checked = 0
    for r, who in plan.items():
        ctx, updates = RoundContext(r, 7, 0), {}
        for c in who:
            msg = m.downlink(state, ctx, c)
            out = m.client_update(msg, c, clients.get(c), ctx)
            clients[c], updates[c] = out.state, m.decode_update(out.payload, c, state, ctx)
            if r > 1:  # zeroth-order rounds (round 1 is the warm start: raw tensors)
                synced = max(seen[c] - 1, 0)  # it keeps the model it trained from, not its own steps
                records = r - 1 - max(synced, 1)  # every ZO round since then had survivors
                info_down = 4 * k * p * records + (m.head_elements * 2 if synced < 1 else 0)
                assert info_down <= len(msg) <= info_down + SLACK, (r, c)
                assert 4 * k * p < len(out.payload) <= 4 * k * p + SLACK
                checked += 1
            seen[c] = r
        state, _ = m.aggregate(state, updates, ctx)
    assert checked == sum(len(w) for r, w in plan.items() if r > 1)
