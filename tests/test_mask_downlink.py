"""The mask methods' θ-delta downlink (``downlink=delta``, their default): bytes, views, catch-up, hostile messages.

The server's half (``downlink_for``) and the client's (``receive_downlink``) run by hand on the tiny
model with θ set by hand, so every view is known exactly; a CLI run closes it (the same training as
``downlink=full``, and the views through the checkpoint).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from handmade import build, frame_size, shared_task

from fedsqueeze.codecs import frame, unframe
from fedsqueeze.codecs.sideinfo import pack_counts
from fedsqueeze.errors import PayloadError
from fedsqueeze.methods.base import RoundContext
from fedsqueeze.methods.downlink import VIEW_KEY
from fedsqueeze.methods.mask_downlink import (
    STEP_KIND,
    THETA_KIND,
    MaskDeltaDownlink,
    SideInfo,
    apply_step,
    change_contexts,
    decode_theta,
    encode_packed_symbols,
    encode_step,
    encode_theta,
    theta_digest,
)
from fedsqueeze.methods.mask_method import delta_symbols
from fedsqueeze.runtime.engine import load_resume

ROUNDS = 6
REST = 250  # θ0 = 0.98 at 255 levels (deltamask's start)


@pytest.fixture(scope="module")
def task():
    return shared_task()


def ctx(round_: int) -> RoundContext:
    return RoundContext(round=round_, rounds=ROUNDS, seed=0)


# ---- exact bytes on a hand-made case ----------------------------------------------------------------


def test_a_step_costs_exactly_its_gamma_counts_when_nothing_is_left_to_chance():
    # 4 positions at 250 (context 62) stay, 4 at 100 (context 25) all move by +51: every context is
    # all-or-nothing and every value the same, so no ANS word is needed, only the counts
    old = np.array([REST] * 4 + [100] * 4, dtype=np.uint8)
    new = np.array([REST] * 4 + [151] * 4, dtype=np.uint8)
    assert change_contexts(old, 255).tolist() == [62] * 4 + [25] * 4
    part = encode_step(old, new, 255)
    # change counts: context 25 holds 4 (γ(5) = 00101), context 62 none (γ(1) = 1): 6 bits, 1 byte;
    # values: 4 × 51 (γ(5), 5 bits) and 255 unused values (1 bit each): 260 bits, 33 bytes
    assert pack_counts(np.array([4, 0]), np.array([4, 4])) == bytes([0b00101100])
    meta = {"levels": 255, "sections": [1, 33]}
    assert len(part) == frame_size(STEP_KIND, meta, 34)
    assert unframe(part)[1] == meta
    assert np.array_equal(apply_step(old, 255, part), new)
    # the refresh of a constant θ: 8 × 250 (γ(9), 7 bits) and 255 unused values: 262 bits, 33 bytes
    const = np.full(8, REST, dtype=np.uint8)
    assert len(encode_theta(const, 255)) == frame_size(THETA_KIND, {"levels": 255}, 33)
    assert decode_theta(encode_theta(const, 255), 8, 255)[1] == 255


def test_the_message_is_the_catch_up_header_its_parts_and_the_head(task):
    m = build("deltamask", task)
    state = m.init_server()
    msg = m.downlink_for(state, ctx(1), 0, None)  # round 1: θ has not moved, the step is empty
    step = state[VIEW_KEY]["steps"][0]["bytes"]
    # every position at 250: one non-empty context, γ(1) = 1 bit, 1 byte; no value, so no histogram
    assert step.size == frame_size(STEP_KIND, {"levels": 255, "sections": [1, 0]}, 1)
    kind, meta, body = unframe(msg)
    head_meta, head_body = m.wire.encode_head(state["head"])
    assert kind == "mask-delta-down"
    assert meta == {
        "base": 0,
        "target": 1,
        "mode": "replay",
        "rounds": [1],
        "lengths": [int(step.size)],
        "digest": theta_digest(state["theta_sym"], 255),
        "head": head_meta,
        "sections": [int(step.size), len(head_body)],
    }
    assert len(msg) == frame_size(kind, meta, int(step.size) + len(head_body))


# ---- views: every client lands on the server's θ, bit for bit ----------------------------------------


def moved(rng: np.random.Generator, sym: np.ndarray, frac: float) -> np.ndarray:
    """θ with a fraction of its positions moved by a multiple of 51 (the delta rule's 1/K steps), in range."""
    out = sym.copy()
    where = rng.random(sym.size) < frac
    out[where] = np.clip(out[where].astype(np.int64) + 51 * rng.choice([-2, -1, 1], size=int(where.sum())), 0, 255)
    return out


def test_every_client_holds_the_servers_theta_over_rounds_with_stale_clients(task):
    m = build("deltamask", task)
    state = m.init_server()
    rng = np.random.default_rng(1)
    clients: dict[int, dict | None] = {c: None for c in range(4)}
    held: dict[int, tuple[int, int]] = {}
    seen = {1: (0, 1, 2, 3), 2: (0, 1), 3: (0,), 4: (0, 2), 5: (0, 1), 6: (0, 1, 2, 3)}
    modes: dict[tuple[int, int], str] = {}
    for r in range(1, ROUNDS + 1):
        # round 4 moves half of θ: a replay over it costs more than a refresh
        state["theta_sym"] = moved(rng, state["theta_sym"], 0.5 if r == 4 else 0.01)
        for c in seen[r]:
            msg = m.downlink_for(state, ctx(r), c, held.get(c))
            meta = unframe(msg)[1]
            modes[(r, c)] = meta["mode"]
            sym, levels, head, _, clients[c] = m.receive_downlink(msg, clients[c], r)
            assert np.array_equal(sym, state["theta_sym"]) and sym.dtype == np.uint8 and levels == 255
            assert clients[c][VIEW_KEY]["round"] == r
            held[c] = (r, 0)
    sizes = {int(s["round"]): int(s["bytes"].size) for s in state[VIEW_KEY]["steps"]}
    refresh = int(state[VIEW_KEY]["refresh_bytes"])
    # round 6: client 2 holds round 4's view (replay of 5 and 6), client 3 round 1's (refresh: round
    # 4's step is bigger than a refresh, so the server no longer keeps it)
    assert 4 not in sizes and sizes[5] + sizes[6] <= refresh
    assert modes[(6, 2)] == "replay" and modes[(6, 3)] == "refresh" and modes[(6, 0)] == "replay"


def test_a_change_of_levels_sends_everyone_a_refresh_and_the_views_follow(task):
    m = build("fedpm", task)  # the Beta rule: θ = Σm/K, K + 1 levels after round 1
    state = m.init_server()
    cstate = None
    for r, (sym, levels) in enumerate([(state["theta_sym"], 255), (np.arange(m.n) % 3, 2), ((np.arange(m.n) + 1) % 3, 2)], 1):
        state["theta_sym"], state["levels"] = sym.astype(np.uint8), levels
        msg = m.downlink_for(state, ctx(r), 0, None if r == 1 else (r - 1, 0))
        got, got_levels, _, _, cstate = m.receive_downlink(msg, cstate, r)
        assert np.array_equal(got, state["theta_sym"]) and got_levels == levels
        assert unframe(msg)[1]["mode"] == ("refresh" if r == 2 else "replay")


def test_a_retried_round_finds_the_client_on_its_view(task):
    m = build("deltamask", task)
    state = m.init_server()
    state["theta_sym"] = moved(np.random.default_rng(2), state["theta_sym"], 0.02)
    _, _, _, _, cstate = m.receive_downlink(m.downlink_for(state, ctx(1), 0, None), None, 1)
    retry = m.downlink_for(state, ctx(1), 0, (1, 0))  # it replied in attempt 0, the round was retried
    assert unframe(retry)[1]["rounds"] == []
    sym, *_ = m.receive_downlink(retry, cstate, 1)
    assert np.array_equal(sym, state["theta_sym"])


def voted(rng: np.random.Generator, m, sym: np.ndarray, k: int, frac: float) -> np.ndarray:
    """θ as the delta rule makes it from ``sym`` with ``k`` clients, a fraction of positions voted ±1 or ±2."""
    counts = np.where(rng.random(sym.size) < frac, rng.choice([-2, -1, 1, 2], size=sym.size), 0).astype(np.int32)
    return delta_symbols(m.start_theta(m.theta_of(sym, 255)), counts, k)


@pytest.mark.parametrize("stratify", [False, True])
def test_a_step_coded_against_the_aggregated_clients_draws_lands_on_the_view(task, stratify):
    m = build("deltamask", task, stratify=stratify)
    state = m.init_server()
    rng = np.random.default_rng(4)
    _, _, _, _, cstate = m.receive_downlink(m.downlink_for(state, ctx(1), 0, None), None, 1)
    state["theta_sym"] = moved(rng, state["theta_sym"], 0.02)
    _, _, _, _, cstate = m.receive_downlink(m.downlink_for(state, ctx(2), 0, (1, 0)), cstate, 2)
    # what round 2's aggregation of clients 1 and 3 records (their strata among participants 1, 2, 3)
    strata = {"strata": [[0, 3], [2, 3]]} if stratify else {}
    state["aggregated"] = {"round": 2, "clients": [1, 3], **strata}
    held = state["theta_sym"].copy()
    held[:5] = 255  # the clip moves these back to 250 next round: contexts of their own
    state["theta_sym"] = held
    _, _, _, _, cstate = m.receive_downlink(m.downlink_for(state, ctx(2), 0, (1, 0)), cstate, 2)
    state["theta_sym"] = voted(rng, m, held, 2, 0.003)  # what the delta rule makes of 2 clients' votes
    msg = m.downlink_for(state, ctx(3), 0, (2, 0))
    assert unframe(msg)[1]["mode"] == "replay"
    step = state[VIEW_KEY]["steps"][-1]["bytes"].tobytes()
    sections = unframe(step)[1]["sections"]
    assert unframe(step)[1] == {"levels": 255, "clients": [1, 3], **strata, "values": "outcome", "sections": sections}
    assert len(sections) == 6  # the change bits, then the vote counts in 5 groups
    sym, *_ = m.receive_downlink(msg, cstate, 3)
    assert np.array_equal(sym, state["theta_sym"])
    side = m.step_side(2, [1, 3], [(0, 3), (2, 3)] if stratify else None, np.full(m.n, REST, np.uint8), 255)
    assert side.contexts.max() <= 61 and side.groups is not None and set(np.unique(side.groups)) <= {0, 1, 2, 3}  # nothing clipped
    assert side.outcomes is not None and side.outcomes.shape == (256, 5)


def test_the_outcomes_are_the_delta_rules_symbols_for_each_vote_count(task):
    m = build("deltamask", task)
    table = m.step_outcomes(255, 5)
    # counts 0, +1, −1, +2, −2, ...: θ_start + c/5 (θ_start = θ clipped to [0.02, 0.98]), clipped to [0, 1]
    assert table[100].tolist() == [100, 151, 49, 202, 0, 253, 0, 255, 0, 255, 0]
    assert table[250].tolist() == [250, 255, 199, 255, 148, 255, 97, 255, 46, 255, 0]
    assert table[255].tolist() == [250, 255, 199, 255, 148, 255, 97, 255, 46, 255, 0]  # held 1.0 starts from 0.98
    counts = np.array([[0, 1, -1, 2, -2, 3, -3, 4, -4, 5, -5]] * 256, dtype=np.int32)
    direct = delta_symbols(m.start_theta(m.theta_of(np.repeat(np.arange(256), 11).astype(np.uint8), 255)), counts.ravel(), 5)
    assert np.array_equal(direct.reshape(256, 11), table)  # the aggregation's own 1-D path, bit for bit
    assert build("fedpm", task).step_outcomes(255, 5) is None  # the Beta rule: differences


def test_a_step_coded_as_outcomes_costs_exactly_its_counts():
    # 2 positions at 100 go to 151 and 2 at 240 saturate at 255: the same outcome (index 1) for all 4
    outcomes = np.stack([np.arange(256), np.minimum(np.arange(256) + 51, 255), np.maximum(np.arange(256) - 51, 0)], axis=1)
    old = np.array([100, 100, 240, 240, REST, REST], dtype=np.uint8)
    new = np.array([151, 151, 255, 255, REST, REST], dtype=np.uint8)
    side = SideInfo(change_contexts(old, 255), None, outcomes)
    part = encode_step(old, new, 255, side)
    # change counts: contexts 25 and 60 all changed (γ(3) = 011 each), 62 none (γ(1) = 1): 7 bits, 1 byte;
    # values: index 1 four times (γ(5) = 00101), indices 0 and 2 unused (1 bit each): 7 bits, 1 byte, no ANS word
    meta = {"levels": 255, "values": "outcome", "sections": [1, 1]}
    assert unframe(part)[1] == meta and len(part) == frame_size(STEP_KIND, meta, 2)
    assert np.array_equal(apply_step(old, 255, part, side_for=lambda *_: side), new)
    # as differences the values take 51 and 15: the histogram of 256 values (γ(3) twice, 254 unused:
    # 260 bits, 33 bytes), then one 4-byte ANS word
    assert unframe(encode_step(old, new, 255))[1]["sections"] == [1, 37]
    # a change no outcome gives: the step falls back to differences
    odd = new.copy()
    odd[0] = 7
    assert "values" not in unframe(encode_step(old, odd, 255, side))[1]
    assert np.array_equal(apply_step(old, 255, encode_step(old, odd, 255, side), side_for=lambda *_: side), odd)
    # refused: outcome values where the side information gives none, and an unknown value code
    for bad, reason in ((part, "codes its values as 'outcome'"), (frame(STEP_KIND, {**meta, "values": "x"}, b"\0\0"), "as 'x'")):
        with pytest.raises(PayloadError, match=reason):
            apply_step(old, 255, bad)


# ---- hostile messages: refused with a reason -------------------------------------------------------------


def reframe(message: bytes, **changes) -> bytes:
    kind, meta, body = unframe(message)
    return frame(kind, {**meta, **changes}, body)


def with_part(message: bytes, part: bytes) -> bytes:
    """``message`` with its one part replaced."""
    kind, meta, body = unframe(message)
    head = bytes(body[meta["sections"][0] :])
    return frame(kind, {**meta, "lengths": [len(part)], "sections": [len(part), len(head)]}, part + head)


def test_a_client_refuses_a_delta_that_does_not_fit_its_view(task):
    m = build("deltamask", task)
    state = m.init_server()
    rng = np.random.default_rng(3)
    state["theta_sym"] = moved(rng, state["theta_sym"], 0.02)
    _, _, _, _, held = m.receive_downlink(m.downlink_for(state, ctx(1), 0, None), None, 1)
    old = state["theta_sym"].copy()
    state["theta_sym"] = moved(rng, old, 0.02)
    good = m.downlink_for(state, ctx(2), 0, (1, 0))
    step = bytes(unframe(good)[2][: unframe(good)[1]["lengths"][0]])
    _, smeta, sbody = unframe(step)
    changes = bytes(sbody[: smeta["sections"][0]])
    # a step whose every change is by 0: the same counts, values coded as all zeros
    count = int((old != state["theta_sym"]).sum())
    zeros = encode_packed_symbols(np.zeros(count, dtype=np.int64), 256)
    zero_move = frame(STEP_KIND, {**smeta, "sections": [len(changes), len(zeros)]}, changes + zeros)
    too_few = encode_packed_symbols(np.ones(count - 1, dtype=np.int64), 256)
    short_values = frame(STEP_KIND, {**smeta, "sections": [len(changes), len(too_few)]}, changes + too_few)
    all_changed = pack_counts(np.full(64, 10**6), np.full(64, 10**6))
    cases = {
        "round": (good, ctx(3), "is for round 2, this is round 3"),
        "base": (reframe(good, base=0), ctx(2), "replays from the view of round 0, this client holds round 1"),
        "digest": (reframe(good, digest="0" * 40), ctx(2), "digest .* differs from the server's"),
        "rounds": (reframe(good, rounds=[1, 2]), ctx(2), "not increasing rounds after 1 up to 2"),
        "parts": (reframe(good, lengths=[3]), ctx(2), "add up to 3 bytes"),
        "mode": (reframe(good, mode="anything"), ctx(2), "malformed header"),
        "truncated": (good[:-9], ctx(2), "payload body length"),
        "huge header": (reframe(good, pad="x" * 4096), ctx(2), "meta length"),
        "levels": (with_part(good, frame(STEP_KIND, {**smeta, "levels": 2}, sbody)), ctx(2), "at 2 levels, this client's view at 255"),
        "part kind": (with_part(good, frame("raw", smeta, sbody)), ctx(2), "kind 'raw'"),
        "zero move": (with_part(good, zero_move), ctx(2), "changes a position to the value it holds"),
        "value count": (with_part(good, short_values), ctx(2), "histogram counts .* symbols, expected"),
        "counts": (
            with_part(good, frame(STEP_KIND, {**smeta, "sections": [len(all_changed), 0]}, all_changed)),
            ctx(2),
            "larger than their contexts|in a context of",
        ),
        "refresh levels": (
            reframe(with_part(good, frame(THETA_KIND, {"levels": 300}, b"")), mode="refresh", rounds=[2]),
            ctx(2),
            "invalid level count 300 \\(at most 255\\)",
        ),
    }
    theta2 = state["theta_sym"].copy()
    # a step with side information whose header names other clients than a server could
    state["aggregated"] = {"round": 2, "clients": [0, 1]}
    state["theta_sym"] = moved(rng, state["theta_sym"], 0.02)
    good3 = m.downlink_for(state, ctx(3), 0, (2, 0))
    _, meta3, body3 = unframe(bytes(unframe(good3)[2][: unframe(good3)[1]["lengths"][0]]))
    for bad_meta, reason in (
        ({"clients": [0, 99]}, "invalid aggregated clients"),
        ({"clients": [1, 0]}, "invalid aggregated clients"),
        ({"clients": [0, 1], "strata": [[0, 2], [1, 2]]}, "not stratified"),
    ):
        bad = with_part(good3, frame(STEP_KIND, {**meta3, **bad_meta}, body3))
        cases[str(bad_meta)] = (reframe(bad, base=2, target=3, rounds=[3]), ctx(3), reason)
    for name, (bad, c, reason) in cases.items():
        if c.round == 3 and "clients" in name:
            held3 = m.receive_downlink(good, held, 2)[4]
            with pytest.raises(PayloadError, match=reason):
                m.receive_downlink(bad, held3, 3)
            continue
        with pytest.raises(PayloadError, match=reason):
            m.receive_downlink(bad, held, c.round)
        assert held[VIEW_KEY]["round"] == 1, name  # a refused message leaves the client's state as it was
    sym, *_ = m.receive_downlink(good, held, 2)
    assert np.array_equal(sym, theta2)


def test_a_refresh_is_decoded_into_the_models_positions_only():
    dl = MaskDeltaDownlink(16, 255)
    part = encode_theta(np.full(32, REST, dtype=np.uint8), 255)  # a refresh for a 32-position mask
    meta = {"base": 0, "target": 1, "mode": "refresh", "rounds": [1], "lengths": [len(part)], "digest": "x"}
    with pytest.raises(PayloadError, match="larger than their contexts"):
        dl.receive(meta, [memoryview(part)], 0, np.full(16, REST, dtype=np.uint8), 255, 1)


# ---- end to end ----------------------------------------------------------------------------------------


SMALL = "--model tiny --rounds 3 --clients 4 --clients-per-round 2 --set train_size=100 --set test_size=50 --set threads=1".split()


def _run(tmp_path, name, *extra):
    from typer.testing import CliRunner

    from fedsqueeze.cli import app

    out = tmp_path / name
    result = CliRunner().invoke(app, ["run", "--quiet", "--method", "deltamask", *SMALL, *extra, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "results.json").read_text())["rounds"]


def test_the_delta_downlink_trains_exactly_as_the_full_one_and_its_views_survive_a_checkpoint(tmp_path):
    out, delta = _run(tmp_path, "delta")
    _, full = _run(tmp_path, "full", "--set", "downlink=full")
    # the same θ every round on both sides: the same masks, uploads and accuracy
    assert [(r["accuracy"], r["uplink_bytes"]) for r in delta] == [(r["accuracy"], r["uplink_bytes"]) for r in full]
    assert all(r["theta_refresh_bytes"] > 0 for r in delta)
    cfg, ckpt = load_resume(out)
    view = ckpt.server_state[VIEW_KEY]
    assert view["round"] == 3 and view["digest"] == theta_digest(view["sym"], view["levels"])
    assert view["steps"] and all(s["bytes"].dtype == np.uint8 for s in view["steps"])
    assert ckpt.state_versions
    for client, (round_, _) in ckpt.state_versions.items():
        own = ckpt.client_states[client][VIEW_KEY]
        assert own["round"] == round_
        if round_ == 3:  # a client of the last round holds the server's view
            assert theta_digest(own["sym"], own["levels"]) == view["digest"]
