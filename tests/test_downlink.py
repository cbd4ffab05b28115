"""The delta downlink (``downlink=delta``): server-side error feedback, catch-up, codecs, hostile messages.

Most tests run the method's two halves by hand on a hand-made two-tensor model (no data, no
training): the server's ``downlink_for`` and the client's ``receive_downlink``, so every value is
known exactly. Two end-to-end runs (local CLI, and the engine with stale clients) close it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from test_cli import _cli

from fedsqueeze.codecs import CODECS, CodecContext, RawCodec, decode_tensors, encode_tensors, frame, unframe
from fedsqueeze.errors import ConfigError, PayloadError
from fedsqueeze.methods import get_method
from fedsqueeze.methods.base import RoundContext
from fedsqueeze.methods.downlink import VIEW_KEY, keep_steps, plan_catch_up, refresh_size, view_digest
from fedsqueeze.runtime.engine import ClientCall, Engine, check_resume, load_resume, prepare
from fedsqueeze.runtime.local import LocalTransport
from fedsqueeze.seeding import SERVER, seed_int

ROUNDS = 6
SHAPES = {"a.weight": (32, 64), "b.bias": (64,)}  # 2048 values: over sz3's lossless threshold


class TwoTensors(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Module()
        self.a.weight = torch.nn.Parameter(torch.zeros(SHAPES["a.weight"]))
        self.b = torch.nn.Module()
        self.b.bias = torch.nn.Parameter(torch.zeros(SHAPES["b.bias"]))


@dataclass
class FakeTask:
    model: torch.nn.Module


def delta_method(codec: str = "qsgd", **options):
    """FedAvg with ``downlink=delta`` over the hand-made model (initial view: all zeros)."""
    cfg = tiny_config(method="fedavg", rounds=ROUNDS, options={"downlink": "delta", "downlink_codec": codec, **options})
    m = get_method("fedavg")(cfg)
    m.setup(FakeTask(TwoTensors()))
    return m


def eighths(rng: np.random.Generator, round_: int) -> dict[str, np.ndarray]:
    """Global weights of eighths of small integers: every sum and difference below is exact in float32."""
    return {n: (rng.integers(-64, 64, size=s) / 8.0 * round_).astype(np.float32) for n, s in SHAPES.items()}


def ctx(round_: int) -> RoundContext:
    return RoundContext(round=round_, rounds=ROUNDS, seed=0)


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return set(a) == set(b) and all(a[n].dtype == b[n].dtype and np.array_equal(a[n], b[n]) for n in a)


# ---- error feedback: the server's client view is every client's view, bit for bit ---------------------


def test_error_feedback_keeps_every_client_on_the_servers_view():
    m = delta_method("sign")  # scaled sign: very lossy, so the residual is never zero
    state = m.init_server()
    rng = np.random.default_rng(1)
    clients: dict[int, dict] = {}  # client: its state (what it made of the messages it got)
    seen = {0: (0, 1, 2, 3), 1: (0, 1), 2: (2, 3), 3: (0, 2, 3), 4: (1,), 5: (0, 1, 2, 3)}  # who takes part
    held: dict[int, tuple[int, int]] = {}
    for r in range(1, ROUNDS + 1):
        prev = {n: a.copy() for n, a in state[VIEW_KEY]["tensors"].items()}
        state["weights"] = eighths(rng, r)
        for c in seen[r - 1]:
            msg = m.downlink_for(state, ctx(r), c, held.get(c))
            view, clients[c] = m.receive_downlink(msg, clients.get(c), ctx(r))
            held[c] = (r, 0)
            assert same(view, state[VIEW_KEY]["tensors"])  # bit for bit, whatever the client had missed
        server_view = state[VIEW_KEY]["tensors"]
        # the broadcast codes exactly (global − previous view), with the round's seed and no codec memory
        want = encode_tensors(
            m.down_codec,
            {n: state["weights"][n] - prev[n] for n in prev},
            CodecContext(seed=seed_int(0, r, SERVER, "downlink")),
        )
        assert state[VIEW_KEY]["steps"][-1]["bytes"].tobytes() == want
        decoded, _ = decode_tensors(want, CodecContext(seed=seed_int(0, r, SERVER, "downlink")), codec=m.down_codec)
        # the view moved by exactly what was decoded, so the residual carried is global − view
        assert same(server_view, {n: prev[n] + decoded[n] for n in prev})
        assert state[VIEW_KEY]["digest"] == view_digest(server_view)
    assert len(clients) == 4


def test_the_residual_is_sent_until_the_view_reaches_the_global_model():
    m = delta_method("topk", topk_k=0.5)  # half the entries per round: two rounds move the view all the way
    state = m.init_server()
    state["weights"] = eighths(np.random.default_rng(2), 1)
    views = []
    cstate = None
    for r in (1, 2):
        view, cstate = m.receive_downlink(m.downlink_for(state, ctx(r), 0, (r - 1, 0) if r > 1 else None), cstate, ctx(r))
        views.append(view)
    gaps = [sum(int(np.count_nonzero(state["weights"][n] != v[n])) for n in v) for v in views]
    assert 0 < gaps[0] and gaps[1] == 0  # what round 1 left out (the residual) came in round 2, exactly


# ---- catch-up: replay or refresh, whichever is smaller --------------------------------------------------


def test_plan_catch_up_picks_the_smaller_of_replay_and_refresh():
    steps = [(0, 1, 100), (1, 2, 50), (2, 3, 70)]
    assert plan_catch_up(3, 3, steps, 200) == ()  # already there
    assert plan_catch_up(2, 3, steps, 200) == (3,)
    assert plan_catch_up(1, 3, steps, 200) == (2, 3)  # 120 B of replay against 200 of refresh
    assert plan_catch_up(1, 3, steps, 119) is None  # 120 > 119: refresh
    assert plan_catch_up(0, 3, steps, 220) == (1, 2, 3)  # a tie goes to the replay
    assert plan_catch_up(0, 3, steps, 219) is None
    assert plan_catch_up(0, 3, steps[1:], 10**6) is None  # round 1's broadcast is no longer kept
    assert plan_catch_up(1, 4, steps, 10**6) is None  # nothing reaches round 4


def test_the_server_keeps_only_broadcasts_a_replay_could_use():
    steps = [{"round": r, "bytes": np.zeros(n, np.uint8)} for r, n in ((1, 100), (2, 50), (3, 70))]
    assert [s["round"] for s in keep_steps(steps, 130)] == [2, 3]  # 70 + 50 <= 130 < 70 + 50 + 100
    assert [s["round"] for s in keep_steps(steps, 220)] == [1, 2, 3]
    assert keep_steps(steps, 69) == []


def test_refresh_size_is_the_refresh_parts_real_length():
    m = delta_method()
    view = m.init_server()[VIEW_KEY]["tensors"]
    assert refresh_size(view) == len(encode_tensors(RawCodec(), view))


@pytest.mark.parametrize("codec, stale_gets", [("raw", "refresh"), ("qsgd", "replay")])
def test_a_stale_client_gets_the_smaller_catch_up_and_lands_on_the_view(codec, stale_gets):
    m = delta_method(codec)
    state = m.init_server()
    rng = np.random.default_rng(3)
    stale_state, sizes = None, {}
    for r in (1, 2, 3):
        state["weights"] = eighths(rng, r)
        msg = m.downlink_for(state, ctx(r), 0, (r - 1, 0) if r > 1 else None)  # client 0 takes part every round
        sizes[r] = int(state[VIEW_KEY]["steps"][-1]["bytes"].size)
        if r == 1:
            _, stale_state = m.receive_downlink(msg, None, ctx(1))  # client 1 only in round 1
    stale = m.downlink_for(state, ctx(3), 1, (1, 0))
    _, meta, _ = unframe(stale)
    replay = sizes[2] + sizes[3]
    refresh = refresh_size(state[VIEW_KEY]["tensors"])
    assert meta["mode"] == stale_gets == ("replay" if replay <= refresh else "refresh")
    assert meta["rounds"] == ([2, 3] if stale_gets == "replay" else [3])
    # the parts are the broadcasts (or the raw view) themselves; the message adds one small header
    assert sum(meta["lengths"]) == (replay if stale_gets == "replay" else refresh) < len(stale) < sum(meta["lengths"]) + 512
    view, after = m.receive_downlink(stale, stale_state, ctx(3))
    assert same(view, state[VIEW_KEY]["tensors"]) and after[VIEW_KEY]["round"] == 3


# ---- every codec codes the downlink ---------------------------------------------------------------------


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_every_codec_round_trips_on_the_delta_downlink(codec):
    m = delta_method(codec)
    state = m.init_server()
    state["weights"] = eighths(np.random.default_rng(4), 1)  # the global model stays put from round 1 on
    cstate = None
    gaps = []
    for r in (1, 2, 3):
        msg = m.downlink_for(state, ctx(r), 0, (r - 1, 0) if r > 1 else None)
        view, cstate = m.receive_downlink(msg, cstate, ctx(r))
        assert same(view, state[VIEW_KEY]["tensors"])
        gaps.append(np.sqrt(sum(float(np.sum((state["weights"][n] - view[n]) ** 2.0)) for n in view)))
    start = np.sqrt(sum(float(np.sum(a**2.0)) for a in state["weights"].values()))
    if CODECS[codec].lossless:
        assert gaps == [0.0, 0.0, 0.0]
    else:
        assert gaps[-1] < start  # the view moved towards the global model and error feedback kept it there


# ---- hostile messages: refused with a reason, nothing allocated beyond the model -----------------------


def reframe(message: bytes, **changes) -> bytes:
    kind, meta, body = unframe(message)
    return frame(kind, {**meta, **changes}, body)


def test_a_client_refuses_a_message_that_does_not_fit_its_view():
    m = delta_method("qsgd")
    state = m.init_server()
    state["weights"] = eighths(np.random.default_rng(5), 1)
    msg = m.downlink_for(state, ctx(1), 0, None)
    _, held = m.receive_downlink(msg, None, ctx(1))
    state["weights"] = eighths(np.random.default_rng(6), 2)
    good = m.downlink_for(state, ctx(2), 0, (1, 0))
    cases = {
        "kind": (encode_tensors(RawCodec(), state["weights"]), "kind 'raw' where"),
        "round": (good, "is for round 2, this is round 3"),
        "base": (m.downlink_for(state, ctx(2), 1, None), "replays from the view of round 0, this client holds round 1"),
        "digest": (reframe(good, digest="0" * 40), "digest .* differs from the server's"),
        "rounds": (reframe(good, rounds=[1, 2]), "not increasing rounds after 1 up to 2"),
        "lengths": (reframe(good, lengths=[3]), "add up to 3 bytes"),
        "mode": (reframe(good, mode="anything"), "malformed header"),
        "truncated": (good[:-9], "payload body length"),
        "huge header": (reframe(good, pad="x" * 4096), "meta length"),
    }
    for name, (bad, reason) in cases.items():
        ctx_r = ctx(3) if name == "round" else ctx(2)
        with pytest.raises(PayloadError, match=reason):
            m.receive_downlink(bad, held, ctx_r)
        assert held[VIEW_KEY]["round"] == 1, name  # a refused message leaves the client's state as it was


def test_a_part_for_another_model_is_refused_before_anything_is_allocated():
    m = delta_method("raw")
    state = m.init_server()
    state["weights"] = eighths(np.random.default_rng(7), 1)
    good = m.downlink_for(state, ctx(1), 0, None)
    kind, meta, _ = unframe(good)
    # a raw part that declares a 10^9-value tensor (and holds 4 bytes): the table is checked first
    part = frame("raw", {"tensors": [["a.weight", "float32", [10**9]], ["b.bias", "float32", [64]]]}, b"\0" * 4)
    bad = frame(kind, {**meta, "lengths": [len(part)]}, part)
    with pytest.raises(PayloadError, match="expected float32 and \\(32, 64\\)|over the cap"):
        m.receive_downlink(bad, None, ctx(1))


# ---- options -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, match",
    [
        ({"downlink_codec": "topk"}, "meant for updates, not model weights.*downlink=delta"),
        ({"downlink": "deltas"}, "option 'downlink' .* must be one of: full, delta"),
        ({"downlink": "delta", "downlink_topk_k": 0.1}, "which the downlink does not use"),
    ],
)
def test_unsupported_downlink_options_are_config_errors(options, match):
    with pytest.raises(ConfigError, match=match):
        get_method("fedavg")(tiny_config(method="fedavg", options=options))


def test_fedsz_uploading_weights_on_a_delta_downlink_refuses_attacks():
    opts = {"downlink": "delta", "compress_weights": True}
    with pytest.raises(ConfigError, match="does not support attack"):
        get_method("fedsz")(tiny_config(method="fedsz", attack="scale", options=opts))
    get_method("fedsz")(tiny_config(method="fedsz", options=opts))  # without an attack it runs


# ---- end to end ------------------------------------------------------------------------------------------


class Spy(LocalTransport):
    """The local transport, recording every message it delivers."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.sent: list[list[ClientCall]] = []

    def replies(self, calls):  # what the engine asks (each client runs when its reply is taken)
        self.sent.append(list(calls))
        return super().replies(calls)


def test_engine_counts_the_messages_it_sends_and_stale_clients_catch_up(tmp_path):
    cfg = tiny_config(
        method="fedsz",
        rounds=3,
        train_size=100,
        test_size=50,
        local_steps=2,
        out=str(tmp_path / "r"),
        options={"downlink": "delta", "downlink_codec": "sz3", "compress_weights": True},
    )
    method, task = prepare(cfg)
    spy = Spy(method, cfg)
    engine = Engine(cfg, method, task, spy, runtime="local", show_progress=False)
    state = method.init_server()
    bases = []
    for r in range(1, 4):
        state, record = engine.play_round(state, RoundContext(round=r, rounds=3, seed=0))
        assert record["dropped"] == []
        assert record["downlink_bytes"] == sum(len(c.message) for c in spy.sent[-1])
        for c in spy.sent[-1]:  # every client that took part holds the server's view of this round, bit for bit
            assert spy.states[c.client][VIEW_KEY]["round"] == r
            assert same(spy.states[c.client][VIEW_KEY]["tensors"], state[VIEW_KEY]["tensors"])
            bases.append((r, unframe(c.message)[1]["base"]))
    assert any(base < r - 1 for r, base in bases)  # some client had missed a round and caught up
    full = 4 * method.trainable_params()  # the raw downlink's body
    assert all(len(c.message) < full / 2 for calls in spy.sent for c in calls)


SMALL = "--model tiny --rounds 2 --clients 4 --clients-per-round 2 --set train_size=100 --set test_size=50".split()


def test_delta_downlink_from_the_cli(tmp_path):
    from typer.testing import CliRunner

    from fedsqueeze.cli import app

    out = tmp_path / "r"
    args = ["run", "--quiet", "--method", "fedsz", *SMALL, "--set", "downlink=delta", "--set", "downlink_codec=qsgd", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    res = json.loads((out / "results.json").read_text())
    assert [r["dropped"] for r in res["rounds"]] == [[], []]
    assert all(r["downlink_bpp"] < 4 for r in res["rounds"])  # against 32 for the full raw downlink
    # the views survive the checkpoint: a resumed run gets the server's and every client's back
    cfg, ckpt = load_resume(out)
    method, _ = prepare(cfg)
    check_resume(ckpt, cfg, method, method.init_server())
    view = ckpt.server_state[VIEW_KEY]
    assert view["round"] == 2 and view["digest"] == view_digest(view["tensors"])
    assert [s["bytes"].dtype for s in view["steps"]] == [np.uint8] * len(view["steps"]) and view["steps"]
    for client, (round_, _) in ckpt.state_versions.items():
        assert ckpt.client_states[client][VIEW_KEY]["round"] == round_


@pytest.mark.slow  # Ray start-up
def test_delta_downlink_on_flower_sim_matches_local(tmp_path):
    Path("/tmp/fsq-downlink").mkdir(exist_ok=True)
    runs = {}
    for runtime in ("flower-sim", "local"):
        out = tmp_path / runtime
        args = ["run", "--quiet", "--runtime", runtime, "--method", "fedavg", *SMALL, "--rounds", "3"]
        p = _cli(*args, "--set", "downlink=delta", "--set", "downlink_codec=sign", "--out", str(out))
        assert p.returncode == 0, p.stderr
        runs[runtime] = json.loads((out / "results.json").read_text())
    for a, b in zip(runs["local"]["rounds"], runs["flower-sim"]["rounds"], strict=True):
        assert (a["downlink_bytes"], a["uplink_bytes"], a["dropped"]) == (b["downlink_bytes"], b["uplink_bytes"], b["dropped"])
        assert b["accuracy"] == pytest.approx(a["accuracy"], abs=1e-6)


def test_scaffold_control_rides_along_the_delta_downlink():
    from fedsqueeze.methods import scaffold

    m = delta_method("qsgd", scaffold=True)
    state = m.init_server()
    state["weights"] = eighths(np.random.default_rng(8), 1)
    state["scaffold_c"] = eighths(np.random.default_rng(9), 1)
    section, control = scaffold.unpack(scaffold.DOWN_KIND, m.downlink_for(state, ctx(1), 0, None))
    view, _ = m.receive_downlink(bytes(section), None, ctx(1))
    assert same(view, state[VIEW_KEY]["tensors"]) and same(m._control(control, "c"), state["scaffold_c"])
