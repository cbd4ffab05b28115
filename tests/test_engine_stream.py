"""The streamed server path: each decoded update is folded into a running sum, then dropped.

Pinned on hand-made cases over a synthetic tensor method (one weight tensor and a 2-class head,
no data): the streamed mean is ``Σ n_i·δ_i / Σ n_i`` exactly, in client order; it gives the bits
of the list path's blocked mean and server step for every server optimizer, norm bounding,
SCAFFOLD and DP-FedAvg; a dropped or hostile client mid-stream leaves the others' mean exact and
its reason in the record; the integrity guard decides as it does on the list; and the server holds
at most one decoded update at a time, in the local runtime and over Flower alike.
"""

from __future__ import annotations

import copy
import dataclasses
import weakref
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from fedsqueeze.codecs import CodecContext, encode_tensors
from fedsqueeze.config import RunConfig
from fedsqueeze.methods import RoundContext, get_method, scaffold
from fedsqueeze.methods.updates import TensorUpdate, WeightedSum, weighted_mean, weighted_mean_f32
from fedsqueeze.models import Classifier
from fedsqueeze.privacy import private_mean
from fedsqueeze.runtime.engine import ClientReply, Engine, Transport, stream_guard
from fedsqueeze.runtime.integrity import StreamGuard, aggregate_finite
from fedsqueeze.seeding import SERVER

SIZE = 40
CTX = RoundContext(round=1, rounds=2, seed=5)


def synthetic(clients: int = 4, size: int = SIZE, method: str = "fedavg", **options):
    """``method`` over a model of one ``size``-value weight and a 2-class head (seeded values, no data)."""
    backbone = nn.Sequential(nn.Linear(size, 1, bias=False))
    model = Classifier(backbone, 1, 2, "text")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    task = SimpleNamespace(model=model, client_sizes=lambda: [100] * clients, model_params=size + 4, zero_shot=None)
    cfg = RunConfig(method=method, clients=clients, clients_per_round=clients, model="tiny", min_clients=1, options=options)
    m = get_method(method)(cfg)
    m.setup(task)
    m.evaluate = lambda state: (0.0, 0.0)  # no test data: the round's model is what is checked
    return m


def deltas(m, seed: int, scale: float = 1e-2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: (rng.standard_normal(s) * scale).astype(np.float32) for n, s in m.shapes.items()}


def payload(m, delta, n: int, client: int) -> bytes:
    return encode_tensors(m.up_codec, delta, CodecContext(seed=client), n=n)


class Scripted(Transport):
    """Replies from a script: bytes (a payload), a str (the client's error) or None (no reply)."""

    def __init__(self, script):
        self.script = script

    def exchange(self, calls):
        out = {}
        for call in calls:
            got = self.script.get(call.client)
            if isinstance(got, bytes):
                out[call.client] = ClientReply(payload=got)
            elif isinstance(got, str):
                out[call.client] = ClientReply(error=got)
        return out


def play(m, script, state=None):
    engine = Engine(m.cfg, m, m.task, Scripted(script), runtime="local", show_progress=False)
    return engine.play_round(m.init_server() if state is None else state, CTX)


def list_reference(m, state, updates):
    """The list path as it stands for the rules that need every update: the blocked mean (or DP's
    clipped sum), the server step and SCAFFOLD's rule, over every update at once in client order."""
    state = copy.deepcopy(state)
    ordered = [u for _, u in sorted(updates.items())]
    if m.opts.dp_clip > 0:
        rng = CTX.rng(SERVER, "dp-noise")
        o = m.opts
        combined, _ = private_mean([u.delta for u in ordered], state["weights"], o.dp_clip, o.dp_noise, m.cfg.clients_per_round, rng)
    else:
        combined, _ = m.rule.combine([u.delta for u in ordered], [u.n for u in ordered])
    opt_state = state["server_opt"] if m.server_opt.rule != "none" else {}
    m.server_opt.step(state["weights"], combined, opt_state)
    if m.opts.scaffold:
        state["scaffold_c"] = scaffold.server_control(state["scaffold_c"], [u.control for u in ordered], m.cfg.clients)
    return state


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_same_state(a[key], b[key])
        else:
            np.testing.assert_array_equal(a[key], b[key], strict=True)


# ---- the formula ----------------------------------------------------------------------------------


def test_weighted_mean_is_the_weighted_sum_divided_once():
    a = np.array([1.0, 0.1, -3.0], np.float32)
    b = np.array([3.0, 0.7, 5.0], np.float32)
    mean = weighted_mean([a, b], [1, 3])
    want = (np.float64(a) * 1 + np.float64(b) * 3) / 4  # Σ n_i·a_i / Σ n_i, in float64
    np.testing.assert_array_equal(mean, want)
    assert mean[0] == 2.5 and mean[2] == 3.0
    # not Σ a_i·(n_i/Σn): that rounds every weight first (a case where the two differ)
    x, y = np.float32(0.1), np.float32(0.2)
    assert weighted_mean([np.array([x]), np.array([y])], [1, 2])[0] == (np.float64(x) + 2 * np.float64(y)) / 3
    assert (np.float64(x) + 2 * np.float64(y)) / 3 != np.float64(x) * (1 / 3) + np.float64(y) * (2 / 3)


@pytest.mark.parametrize("block", [1, 7, 1 << 18])
def test_weighted_sum_gives_the_blocked_mean_bit_for_bit(block):
    rng = np.random.default_rng(1)
    arrays = [(rng.standard_normal((5, 13)) * 10.0 ** rng.integers(-8, 30)).astype(np.float32) for _ in range(6)]
    counts = [3, 1, 17, 2, 9, 40]
    acc = WeightedSum({"t": (5, 13)}, block=block)
    for a, n in zip(arrays, counts):
        acc.add({"t": a}, n)
    mid = acc.copy()
    got = acc.pop_mean("t")
    np.testing.assert_array_equal(got, weighted_mean_f32(arrays, counts, block=3), strict=True)
    assert mid.count == 6 and mid.total == sum(counts) and "t" in mid.sums and "t" not in acc.sums  # the copy is its own


# ---- the engine's streamed round --------------------------------------------------------------


def test_streamed_round_is_the_hand_mean_with_a_dropped_and_a_hostile_client_mid_stream():
    m = synthetic(clients=5)
    ones = {n: np.ones(s, np.float32) for n, s in m.shapes.items()}
    threes = {n: np.full(s, 3.0, np.float32) for n, s in m.shapes.items()}
    nan = {n: np.full(s, np.nan, np.float32) for n, s in m.shapes.items()}
    script = {
        0: payload(m, ones, 1, 0),
        1: "ValueError: client crashed",  # dropped before its update exists
        2: b"FSQZ garbage",  # hostile: not a frame
        3: payload(m, threes, 3, 3),
        4: payload(m, nan, 50, 4),  # hostile: NaN in a well-formed frame, and a big weight
    }
    before = m.init_server()
    state, record = play(m, script, copy.deepcopy(before))
    for n in m.names:  # w + (1·1 + 3·3) / 4 = w + 2.5, the dropped clients nowhere
        np.testing.assert_array_equal(state["weights"][n], (before["weights"][n] + np.float32(2.5)).astype(np.float32))
    assert record["clients_aggregated"] == 2
    reasons = {d["client"]: d["reason"] for d in record["dropped"]}
    assert reasons[1] == "ValueError: client crashed"
    assert reasons[2].startswith("bad payload (as sent): ") and "NaN" in reasons[4]
    assert sorted(reasons) == [1, 2, 4]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"server_opt": "avgm", "server_lr": 0.7},
        {"server_opt": "adam"},
        {"server_opt": "yogi"},
        {"server_opt": "adagrad"},
        {"norm_bound": 0.05},
        {"scaffold": True},
        {"dp_clip": 0.05, "dp_noise": 0.5},
        {"server_opt": "adam", "norm_bound": 0.05, "scaffold": True},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "fedavg",
)
def test_streamed_round_gives_the_list_paths_bits(options):
    m = synthetic(clients=4, **options)
    counts = {0: 7, 1: 2, 2: 30, 3: 11}
    updates = {}
    for c, n in counts.items():
        d = deltas(m, 10 + c, scale=0.02)
        if m.opts.scaffold:
            updates[c] = scaffold.ScaffoldUpdate(d, n, deltas(m, 50 + c))
        else:
            updates[c] = TensorUpdate(d, n)
    state = m.init_server()
    state["weights"] = {n: a + np.float32(0.5) for n, a in state["weights"].items()}  # not the model's own values
    want = list_reference(m, state, updates)
    guard = stream_guard(m, state, CTX, 1)
    assert guard is not None
    for c, u in updates.items():
        guard.add(c, u)
    got = guard.finish(state)
    assert got.aggregated == 4 and not got.dropped
    assert_same_state(got.state, want)
    # the method's own aggregate over the dict, in any insertion order, is the same: folded in client order
    shuffled = {c: updates[c] for c in (2, 0, 3, 1)}
    assert_same_state(m.aggregate(copy.deepcopy(state), shuffled, CTX)[0], want)
    # and the start state was never touched
    assert np.all(state["weights"]["head.bias"] == m.init_server()["weights"]["head.bias"] + np.float32(0.5))


def test_rules_that_need_every_update_keep_the_list_path():
    for rule in ("median", "trimmed_mean", "krum", "multi_krum", "centered_clip"):
        m = synthetic(robust=rule)
        assert m.accumulator(m.init_server(), CTX) is None and stream_guard(m, m.init_server(), CTX, 1) is None
    assert get_method("fedsz").aggregate is not get_method("fedavg").aggregate  # its own aggregate: the list path


# ---- the integrity guard, streamed ----------------------------------------------------------------

BIG = np.float32(3e38)


def _guard_cases():
    """(options, {client: update maker}): each a case of runtime/integrity.py's rule."""

    def d(m, value, name=None, n=10):
        out = {k: np.full(s, 1e-3, np.float32) for k, s in m.shapes.items()}
        if name is not None:
            out[name] = np.full(m.shapes[name], value, np.float32)
        return TensorUpdate(out, n)

    return {
        # one client alone overflows the head bias: dropped, the other two aggregated
        "one-client": ({"server_lr": 1e30}, lambda m: {0: d(m, 0), 1: d(m, 1e10, "head.bias"), 2: d(m, 0)}),
        # it alone overflows, but the mean with the others does not: nothing dropped
        "diluted": ({"server_lr": 2.0}, lambda m: {0: d(m, 0, n=1000), 1: d(m, 3e38, "head.weight", n=1)}),
        # the second moment overflows while the weights stay finite: the path names v
        "adagrad-v": ({"server_opt": "adagrad"}, lambda m: {0: d(m, 0), 1: d(m, 1e20, "backbone.0.weight")}),
        # every client alone breaks the model: too few left
        "all": ({"server_lr": 1e30}, lambda m: {0: d(m, 1e10, "head.bias"), 1: d(m, 1e10, "backbone.0.weight")}),
    }


@pytest.mark.parametrize("case", list(_guard_cases()))
def test_streamed_guard_decides_as_the_list_guard(case):
    options, make = _guard_cases()[case]
    m = synthetic(clients=3, **options)
    state = m.init_server()
    updates = make(m)
    want = aggregate_finite(m, state, updates, CTX, 1)
    guard = StreamGuard(m.accumulator(state, CTX), CTX, 1)
    for c, u in updates.items():
        guard.add(c, u)
    got = guard.finish(state)
    assert (got.aggregated, got.dropped, got.rejected, got.metrics) == (want.aggregated, want.dropped, want.rejected, want.metrics)
    assert_same_state(got.state, want.state)
    if case == "one-client":
        assert got.dropped == {1: "update would make the global model non-finite (at state['weights']['head.bias'])"}
    if case == "adagrad-v":
        assert "state['server_opt']['v']['backbone.0.weight']" in got.dropped[1]
    if case == "diluted":
        assert got.aggregated == 2 and not got.dropped


def test_streamed_guard_rejects_a_combination_no_client_breaks_alone():
    m = synthetic(clients=1, scaffold=True)  # N = 1: c += Σ Δc_i
    state = m.init_server()
    big = {n: np.full(s, BIG, np.float32) for n, s in m.shapes.items()}
    small = {n: np.full(s, 1e-3, np.float32) for n, s in m.shapes.items()}
    updates = {0: scaffold.ScaffoldUpdate(small, 5, big), 1: scaffold.ScaffoldUpdate(small, 5, big)}
    want = aggregate_finite(m, state, updates, CTX, 1)
    guard = stream_guard(m, state, CTX, 1)
    for c, u in updates.items():
        guard.add(c, u)
    got = guard.finish(state)
    assert got.rejected == want.rejected and "though each update alone is" in got.rejected
    assert got.state is state and got.aggregated == 0


# ---- memory: at most one decoded update alive ---------------------------------------------------


def probe_decodes(m):
    """Wrap ``m.decode_update``: returns a list that gets, at each decode, how many decoded updates are alive."""
    live: list[weakref.ref] = []
    seen: list[int] = []
    decode = m.decode_update

    def probed(payload, client, state, ctx):
        update = decode(payload, client, state, ctx)
        live.append(weakref.ref(update))
        seen.append(sum(r() is not None for r in live))
        return update

    m.decode_update = probed
    return seen


@pytest.mark.parametrize("robust, most", [("mean", 1), ("median", 6)])
def test_the_server_holds_one_decoded_update_at_a_time(robust, most):
    m = synthetic(clients=6, robust=robust)
    seen = probe_decodes(m)
    play(m, {c: payload(m, deltas(m, c), 10 + c, c) for c in range(6)})
    assert seen == ([1] * 6 if most == 1 else list(range(1, 7)))  # the list path holds them all: the probe sees it


def test_the_local_transport_runs_each_client_only_when_its_reply_is_asked_for():
    from fedsqueeze.methods import ClientOutput
    from fedsqueeze.runtime.local import LocalTransport

    m = synthetic(clients=3)
    events = []

    def client_update(message, client, cstate, ctx):
        events.append(f"train {client}")
        return ClientOutput(payload(m, deltas(m, client), 5, client))

    m.client_update = client_update
    decode = m.decode_update

    def logged(payload_, client, state, ctx):
        events.append(f"decode {client}")
        return decode(payload_, client, state, ctx)

    m.decode_update = logged
    Engine(m.cfg, m, m.task, LocalTransport(m, m.cfg), runtime="local", show_progress=False).play_round(m.init_server(), CTX)
    assert events == ["train 0", "decode 0", "train 1", "decode 1", "train 2", "decode 2"]


def test_flower_transport_streams_the_same_round_as_the_local_path(monkeypatch):
    """FlowerTransport (over a scripted Grid) and a plain transport give the same bits and record,
    and over Flower too the server holds one decoded update at a time."""
    from flwr.app import Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity
    from test_flower_app import ScriptedGrid

    from fedsqueeze.runtime.flower_app import FlowerTransport, ServerSettings
    from fedsqueeze.runtime.flower_wire import CONFIG, reply_update

    for key, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # the identity a Flower process has
        monkeypatch.setattr(TaskIdentity, key, value)
    m = synthetic(clients=4, server_opt="avgm")
    sent = {c: payload(m, deltas(m, 20 + c), 3 + c, c) for c in range(4)}
    sent[2] = b"not a frame"

    def answer(msg):
        client = msg.content.config_records[CONFIG]["client"]
        return reply_update(msg, sent[client], {}) if client != 3 else Message(RecordDict(), reply_to=msg)

    local_state, local_record = play(m, {**sent, 3: "bad reply: message carries no payload record"})
    seen = probe_decodes(m)
    transport = FlowerTransport(ScriptedGrid(answer), {c: 100 + c for c in range(4)}, m.cfg, ServerSettings(reply_timeout_s=5.0))
    engine = Engine(m.cfg, m, m.task, transport, runtime="flower", show_progress=False)
    flower_state, flower_record = engine.play_round(m.init_server(), CTX)
    assert_same_state(flower_state, local_state)
    same = ("clients_aggregated", "dropped", "uplink_bytes")
    assert {k: flower_record[k] for k in same} == {k: local_record[k] for k in same}
    assert seen == [1, 1]  # clients 0 and 1 decoded (2 fails in decode_update, 3 sent none), one alive at a time
    assert [d["client"] for d in flower_record["dropped"]] == [2, 3]


def test_a_failed_attempt_discards_its_stream():
    """min_clients not met: the retry's sample is aggregated alone (the first attempt's sums are gone)."""
    m = synthetic(clients=3)
    m.cfg = dataclasses.replace(m.cfg, min_clients=3, min_clients_policy="retry", max_retries=1)
    attempts = iter([{0: payload(m, deltas(m, 0), 4, 0), 1: "gone", 2: payload(m, deltas(m, 2), 4, 2)}, None])
    updates = {c: TensorUpdate(deltas(m, 30 + c), 1 + c) for c in range(3)}

    class Retry(Scripted):
        def exchange(self, calls):
            first = next(attempts, None)
            if first is not None:
                self.script = first
            else:
                self.script = {c: payload(m, updates[c].delta, updates[c].n, c) for c in range(3)}
            return super().exchange(calls)

    state = m.init_server()
    engine = Engine(m.cfg, m, m.task, Retry({}), runtime="local", show_progress=False)
    new, record = engine.play_round(copy.deepcopy(state), CTX)
    assert record["attempts"] == 2 and record["clients_aggregated"] == 3
    assert_same_state(new, list_reference(m, state, updates))
