"""Hostile clients against the server's decoding (issue 15, "Server memory and model integrity").

Each test is one finding: it failed on the code before the fix and passes now.

- a payload in a codec (or with codec options) the server did not configure is refused, and a
  qsgd header's bucket size no longer multiplies what the decoder allocates;
- dtypes and shapes must be the server's own (float32), values finite after the cast;
- an optional bound on an update's norm stops huge finite updates;
- a client's example count is bounded by its partition.
"""

from __future__ import annotations

import numpy as np
import pytest
from fuzzing import traced_peak
from handmade import build, fresh, hand_deltas, hand_head, mask_payload, shared_task, zeros_zstd

from fedsqueeze.codecs import CodecContext, RawCodec, decode_tensors, encode_tensors, expect_tensors, frame, get_codec, unframe
from fedsqueeze.codecs.base import all_finite
from fedsqueeze.codecs.qsgd import QSGDCodec
from fedsqueeze.errors import PayloadError
from fedsqueeze.methods.base import RoundContext

CTX = RoundContext(round=1, rounds=2, seed=0)


@pytest.fixture(scope="module")
def task():
    return shared_task()


def bucket_bomb(tensors: int = 30, bucket: int = 1 << 20, levels: int = 300) -> bytes:
    """A small qsgd payload of ``tensors`` one-element tensors whose declared bucket made the old
    decoder allocate ``tensors`` × bucket × 2 bytes (levels > 127 are int16) before any check."""
    need = tensors * (4 + 2 * bucket)
    q = zeros_zstd(need)
    table = [[f"t{i}", "float32", [1]] for i in range(tensors)]
    meta = {"quantized": table, "exact": [], "levels": levels, "bucket": bucket, "lengths": [len(q), 0], "extra": {"n": 3}}
    return frame("qsgd", meta, q)


# ---- the codec and its options are the server's own ---------------------------------------------


def test_a_qsgd_bomb_sent_to_a_raw_server_is_refused_before_it_allocates(task):
    m = build("fedavg", task)  # raw uplink
    payload = bucket_bomb()
    assert len(payload) < 64_000  # a small payload...
    legit = 4 * m.max_elements  # ...the float32 size of what this server legitimately receives
    peak, err = traced_peak(lambda: m.decode_update(payload, 1, m.init_server(), CTX))
    assert isinstance(err, PayloadError) and "kind" in str(err)
    assert peak < 2 * legit, f"peak {peak} bytes while refusing a {len(payload)}-byte payload"


def test_the_qsgd_decoder_allocates_by_tensor_size_not_by_the_declared_bucket():
    # straight to the codec (no server options to compare against): the bucket of 2**20 applies
    # to 30 one-element tensors; the old decoder held 30 × 2 MiB of levels, the new one streams
    payload_meta = {"quantized": [[f"t{i}", "float32", [1]] for i in range(30)], "exact": [], "levels": 300, "bucket": 1 << 20}
    q = zeros_zstd(30 * (4 + 2 * (1 << 20)))
    payload_meta["lengths"] = [len(q), 0]
    out: dict = {}
    peak, err = traced_peak(lambda: out.update(QSGDCodec().decode(payload_meta, memoryview(q), CodecContext(max_elements=1000))))
    assert err is None and len(out) == 30 and all(a.shape == (1,) and a[0] == 0 for a in out.values())
    assert peak < 4 << 20, f"peak {peak} bytes to decode 30 floats"


def test_a_qsgd_server_refuses_another_bucket_or_level_count(task):
    m = build("qsgd", task)
    state = m.init_server()
    deltas = hand_deltas(m, 0)
    good = encode_tensors(m.up_codec, deltas, CodecContext(seed=1), n=4)
    assert m.decode_update(good, 1, state, CTX).n == 4
    for options in ({"bucket": 7}, {"levels": 300}):
        other = encode_tensors(get_codec("qsgd", **options), deltas, CodecContext(seed=1), n=4)
        with pytest.raises(PayloadError, match="bucket|levels"):
            m.decode_update(other, 1, state, CTX)


@pytest.mark.parametrize("codec", ["zstd", "fp16", "qsgd", "sign"])
def test_a_raw_server_refuses_every_other_codec(task, codec):
    m = build("fedavg", task)
    payload = encode_tensors(get_codec(codec), hand_deltas(m, 0), CodecContext(seed=1), n=4)
    with pytest.raises(PayloadError, match="kind"):
        m.decode_update(payload, 1, m.init_server(), CTX)


@pytest.mark.parametrize(
    "method, options, other, match",
    [
        ("eden", {}, get_codec("eden", chunk=8), "chunk"),
        ("topk", {}, get_codec("topk", k=0.5), "count"),
        ("fedavg", {"uplink_codec": "zstd"}, get_codec("zstd", shuffle=False), "shuffle"),
        ("fedsz", {}, get_codec("sz3", bound=0.5), "bound"),
    ],
    ids=["eden-chunk", "topk-k", "zstd-shuffle", "sz3-bound"],
)
def test_a_server_decodes_only_with_its_own_codec_options(task, method, options, other, match):
    m = build(method, task, **options)
    payload = encode_tensors(other, hand_deltas(m, 0), CodecContext(seed=1), n=4)
    with pytest.raises(PayloadError, match=match):
        m.decode_update(payload, 1, m.init_server(), CTX)
    assert m.decode_update(encode_tensors(m.up_codec, hand_deltas(m, 0), CodecContext(seed=1), n=4), 1, m.init_server(), CTX).n == 4


def test_a_client_refuses_a_downlink_in_another_codec(task):
    m = build("head", task, downlink_codec="fp16")
    state = m.init_server()
    message = encode_tensors(get_codec("raw"), state["weights"])
    with pytest.raises(PayloadError, match="kind"):
        m.client_update(message, 0, None, CTX)


# ---- dtypes, shapes and values ------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda shape: np.full(shape, 1e300, np.float64),  # finite as float64, inf as float32
        lambda shape: np.ones(shape, np.float64),  # float64 at all
        lambda shape: np.ones(shape, np.int64),
        lambda shape: np.ones(shape, np.bool_),
        lambda shape: np.ones(shape, np.float16),
    ],
    ids=["float64-1e300", "float64", "int64", "bool", "float16"],
)
def test_a_float32_server_refuses_other_dtypes(task, make):
    m = build("fedavg", task)
    payload = encode_tensors(m.up_codec, {n: make(m.shapes[n]) for n in m.names}, n=4)
    with pytest.raises(PayloadError, match="dtype|float32"):
        m.decode_update(payload, 1, m.init_server(), CTX)


def test_a_wrong_shape_is_refused_before_decoding(task):
    m = build("fedavg", task)
    d = hand_deltas(m, 0)
    name = m.names[0]
    d[name] = d[name].reshape(-1)
    with pytest.raises(PayloadError, match="shape"):
        m.decode_update(encode_tensors(m.up_codec, d, n=4), 1, m.init_server(), CTX)


def test_an_update_norm_bound_stops_huge_finite_updates(task):
    m = build("fedavg", task, max_update_norm=100.0)
    state = m.init_server()
    huge = {n: np.full(m.shapes[n], 3e38, np.float32) for n in m.names}  # finite float32
    with pytest.raises(PayloadError, match="norm"):
        m.decode_update(encode_tensors(m.up_codec, huge, n=4), 1, state, CTX)
    assert m.decode_update(encode_tensors(m.up_codec, hand_deltas(m, 0), n=4), 1, state, CTX).n == 4


# ---- what an honest decode costs: views into the payload, no copies, no per-value temporaries -----


def test_raw_decode_returns_read_only_views_into_the_payload():
    tensors = {
        "w": np.arange(20, dtype=np.float32).reshape(4, 5),
        "i": np.array([-3, 7, 9], np.int16),
        "s": np.array(2.5, np.float64),
        "e": np.zeros((0, 3), np.float32),
    }
    payload = encode_tensors(get_codec("raw"), tensors, n=2)
    out, extra = decode_tensors(payload)
    wire = np.frombuffer(payload, np.uint8)
    assert extra == {"n": 2} and list(out) == ["w", "i", "s", "e"]
    for name, a in tensors.items():
        got = out[name]
        assert got.dtype == a.dtype and got.shape == a.shape and np.array_equal(got, a)
        assert got.base is payload and not got.flags.writeable  # the payload's own bytes, not a copy
        assert got.size == 0 or np.shares_memory(got, wire)


def test_raw_decode_allocates_per_tensor_objects_not_values():
    shapes = {f"t{i}": (10, 100) for i in range(30)}  # 30 x 1000 float32: 120,000 bytes of values
    payload = encode_tensors(get_codec("raw"), {n: np.ones(s, np.float32) for n, s in shapes.items()})
    ctx = CodecContext(max_elements=30_000, expect=expect_tensors(shapes))
    _, meta, body = unframe(payload)
    RawCodec().decode(meta, body, ctx)  # warm the dtype cache
    out: dict = {}
    peak, err = traced_peak(lambda: out.update(RawCodec().decode(meta, body, ctx)))
    assert err is None and len(out) == 30 and all(a.sum() == 1000 for a in out.values())
    # one ndarray (~100 B) and one table row per tensor, never a copy of the values (nor, as before,
    # a memoryview, a 1-D array, its reshape and a dtype per tensor: ~630 B each)
    assert peak <= 30 * 256 + 2048, f"{peak} bytes to view 30 tensors"


@pytest.mark.parametrize("name", ["head", "bitfit", "lora"])
def test_an_honest_small_update_decodes_within_twice_its_float32_size(task, name):
    # the benchmark's target (benchmarks/hostile_payloads.py): 2 x the float32 size of what the
    # decoder carries. head (2 tensors) and bitfit (19 tiny biases) once spent more than that on
    # per-tensor objects and on the buffer numpy makes to check unaligned values for finiteness
    m = build(name, fresh(task) if name != "head" else task)
    state = m.init_server()
    payload = encode_tensors(m.up_codec, hand_deltas(m, 0), CodecContext(seed=1), n=4)
    m.decode_update(payload, 1, state, CTX)  # warm lazy imports and caches
    got: list = []
    peak, err = traced_peak(lambda: got.append(m.decode_update(payload, 1, state, CTX)))
    assert err is None and got[0].n == 4
    assert peak <= 2 * 4 * m.max_elements, f"{name}: peak {peak} bytes for {m.max_elements} float32 values"
    # ...and so does refusing a 1000-tensor table or another codec's bucket bomb
    for hostile in (
        frame("raw", {"tensors": [[f"t{i}", "float32", [1]] for i in range(1000)], "extra": {"n": 3}}, bytes(4000)),
        bucket_bomb(),
    ):
        peak, err = traced_peak(lambda hostile=hostile: m.decode_update(hostile, 1, state, CTX))
        assert isinstance(err, PayloadError) and peak <= 2 * 4 * m.max_elements, (name, peak, err)


@pytest.mark.parametrize("offset", [0, 1, 2, 3])
def test_all_finite_finds_every_nonfinite_value_in_aligned_and_unaligned_views(offset):
    n = 10_000  # slices of 157 values: bad values on both sides of slice boundaries
    for bad in (np.nan, np.inf, -np.inf):
        for pos in (0, 156, 157, 5000, n - 1):
            a = np.zeros(n, np.float32)
            a[pos] = bad
            raw = bytes(offset) + a.tobytes()
            view = np.ndarray((n,), np.float32, buffer=raw, offset=offset)
            assert not all_finite(view) and not all_finite(view.reshape(100, 100)), (bad, pos, offset)
        ok = np.ndarray((n,), np.float32, buffer=bytes(offset) + np.full(n, 3e38, np.float32).tobytes(), offset=offset)
        assert all_finite(ok)
    assert all_finite(np.zeros(0, np.float32)) and all_finite(np.array(1.0, np.float32)) and not all_finite(np.array(np.nan))
    strided = np.zeros(10, np.float32)
    strided[3] = np.nan
    assert all_finite(strided[::2]) and not all_finite(strided[1::2])  # not contiguous: checked whole


def test_all_finite_on_an_unaligned_view_allocates_less_than_a_bool_per_value():
    n = 200_000
    view = np.ndarray((n,), np.float32, buffer=b"x" + np.ones(n, np.float32).tobytes(), offset=1)
    assert not view.flags.aligned
    all_finite(view)
    peak, err = traced_peak(lambda: all_finite(view))
    # np.isfinite(view) would hold a bool per value plus a float buffer of 8192 values
    assert err is None and peak < n // 4, peak


# ---- example counts -----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [10**18, 51, 2**63])
def test_a_tensor_client_cannot_claim_more_examples_than_its_partition(task, n):
    m = build("fedavg", task)
    assert task.client_sizes()[1] == 50
    state = m.init_server()
    with pytest.raises(PayloadError, match="partition"):
        m.decode_update(encode_tensors(m.up_codec, hand_deltas(m, 0), n=n), 1, state, CTX)
    assert m.decode_update(encode_tensors(m.up_codec, hand_deltas(m, 0), n=50), 1, state, CTX).n == 50


def test_an_update_from_a_client_without_a_partition_is_refused(task):
    m = build("fedavg", task)
    with pytest.raises(PayloadError, match="partition"):
        m.decode_update(encode_tensors(m.up_codec, hand_deltas(m, 0), n=1), 99, m.init_server(), CTX)


@pytest.mark.parametrize("name", ["fedpm", "deltamask", "deltamask-exact"])
def test_a_mask_client_cannot_claim_more_examples_than_its_partition(task, name):
    m = build(name, task)
    state = m.init_server()
    ref = m.uniforms(CTX, 2, None) < m.start_theta(m.theta_of(state["theta_sym"], state["levels"]))
    assert m.decode_update(mask_payload(m, state, CTX, 2, ref, hand_head(m, 0), 50), 2, state, CTX).n == 50
    with pytest.raises(PayloadError, match="partition"):
        m.decode_update(mask_payload(m, state, CTX, 2, ref, hand_head(m, 0), 10**18), 2, state, CTX)


def test_a_decomfl_warm_start_client_cannot_claim_more_examples_than_its_partition(task):
    m = build("decomfl", task, params="head", warm_start_rounds=1, warm_start_steps=1, perturbations=2)
    state = m.init_server()
    delta = {n: np.full(m.named[n].shape, 1e-3, np.float16) for n in m.head}
    raw = get_codec("raw")
    assert m.decode_update(encode_tensors(raw, delta, n=50), 0, state, CTX).n == 50
    with pytest.raises(PayloadError, match="partition"):
        m.decode_update(encode_tensors(raw, delta, n=10**18), 0, state, CTX)
    with pytest.raises(PayloadError, match="dtype"):  # float32 where the warm start sends float16
        m.decode_update(encode_tensors(raw, {n: a.astype(np.float32) for n, a in delta.items()}, n=5), 0, state, CTX)


# ---- model integrity: the server never adopts a non-finite model (runtime/integrity.py) ---------

F32_MAX = float(np.finfo(np.float32).max)


def test_weighted_mean_is_float64_and_exact_near_float32_max():
    from fedsqueeze.methods.updates import stepped, weighted_mean

    a, b = np.full(3, F32_MAX, np.float32), np.full(3, 3e38, np.float32)
    mean = weighted_mean([a, b], [1, 3])
    assert mean.dtype == np.float64
    np.testing.assert_array_equal(mean, (1 * np.float64(F32_MAX) + 3 * np.float64(np.float32(3e38))) / 4)
    with np.errstate(over="ignore"):
        assert np.all(np.isinf(a + b)) and np.all(np.isfinite(mean))  # a float32 sum of the two is inf
    assert stepped(np.ones(3, np.float32), mean).dtype == np.float32
    assert np.all(np.isinf(stepped(np.ones(3, np.float32), 2 * mean)))  # beyond float32: inf, not a warning


def fedavg_step(weights, mean64, lr=1.0):
    """FedAvg's server step on a float64 mean: the mean in float32, times lr, added in float32."""
    return (weights + np.float32(lr) * mean64.astype(np.float32)).astype(np.float32)


def _updates(m, deltas_and_counts):
    from fedsqueeze.methods.updates import TensorUpdate

    return {c: TensorUpdate(d, n) for c, (d, n) in deltas_and_counts.items()}


def test_a_client_whose_update_alone_overflows_the_model_is_dropped(task):
    from fedsqueeze.runtime.integrity import aggregate_finite

    m = build("fedavg", task, server_lr=4.0)
    state = m.init_server()
    before = {n: a.copy() for n, a in state["weights"].items()}
    honest, huge = hand_deltas(m, 0), {n: np.full(m.shapes[n], 3e38, np.float32) for n in m.names}
    out = aggregate_finite(m, state, _updates(m, {0: (honest, 10), 3: (huge, 30), 2: (hand_deltas(m, 1), 30)}), CTX)
    assert set(out.dropped) == {3} and "non-finite" in out.dropped[3] and "weights" in out.dropped[3]
    assert out.rejected is None and out.aggregated == 2
    d1 = hand_deltas(m, 1)
    for n in m.names:  # the weighted mean of the two others, 10:30, as if client 3 never replied
        mean = honest[n].astype(np.float64) * (10 / 40) + d1[n].astype(np.float64) * (30 / 40)
        np.testing.assert_array_equal(out.state["weights"][n], fedavg_step(before[n], mean, 4.0))
        np.testing.assert_array_equal(state["weights"][n], before[n])  # the previous state is untouched


class SumMethod:
    """A stand-in server rule that sums updates (no mean): two finite updates can overflow together."""

    def aggregate(self, state, updates, ctx):
        for u in updates.values():
            state["w"] = (state["w"].astype(np.float64) + u).astype(np.float32)
        return state, {"summed": len(updates)}


def test_an_overflow_no_single_client_causes_keeps_the_previous_model():
    from fedsqueeze.runtime.integrity import aggregate_finite

    state = {"w": np.zeros(2, np.float32)}
    two = {0: np.full(2, 2e38), 1: np.full(2, 2e38)}
    with np.errstate(over="ignore"):
        out = aggregate_finite(SumMethod(), state, two, CTX)
    assert out.dropped == {} and out.aggregated == 0 and out.metrics == {}
    assert out.state is state and np.all(state["w"] == 0)
    assert "each update alone is" in out.rejected and "state['w']" in out.rejected
    fine = aggregate_finite(SumMethod(), state, {0: np.full(2, 2e38), 1: np.full(2, -1e38)}, CTX)
    assert fine.rejected is None and fine.aggregated == 2 and fine.metrics == {"summed": 2}
    np.testing.assert_array_equal(fine.state["w"], np.float32(np.float32(2e38) + np.float32(-1e38)))


def test_too_few_clients_left_after_the_drops_keeps_the_previous_model(task):
    from fedsqueeze.runtime.integrity import aggregate_finite

    m = build("fedavg", task, server_lr=4.0)
    state = m.init_server()
    huge = {n: np.full(m.shapes[n], -3e38, np.float32) for n in m.names}
    out = aggregate_finite(m, state, _updates(m, {0: (hand_deltas(m, 0), 5), 1: (huge, 5)}), CTX, min_clients=2)
    assert set(out.dropped) == {1} and out.aggregated == 0 and out.state is state
    assert "min_clients=2" in out.rejected


def test_nonfinite_part_names_the_first_bad_float_only():
    from fedsqueeze.runtime.integrity import nonfinite_part

    assert nonfinite_part({"a": np.ones(2), "b": [np.int64(7), {"c": np.array([1.0, np.nan])}]}) == "state['b'][1]['c']"
    assert nonfinite_part({"a": np.ones(2, np.float16), "n": 3, "s": "x", "k": np.zeros(2, np.uint8)}) is None
    assert nonfinite_part({"x": float("inf")}) == "state['x']"


def test_decomfl_averages_scalars_near_float32_max_in_float64(task):
    import copy

    from fedsqueeze.methods.updates import ZOUpdate

    m = build("decomfl", fresh(task), params="head", warm_start_rounds=0, perturbations=2)  # its own model: the step is inf
    state = m.init_server()
    scalars = {c: ZOUpdate(np.full((m.k, m.p), 3e38, np.float32)) for c in (0, 1)}
    new, metrics = m.aggregate(copy.deepcopy(state), scalars, CTX)
    np.testing.assert_array_equal(new["history"][-1]["scalars"], np.float32(3e38))  # a float32 mean: inf
    assert metrics["zo_scalar_abs_mean"] == np.float32(3e38)


# ---- through the CLI: a hostile client in a real `fedsqueeze run` -------------------------------

CLI_TINY = ["--model", "tiny", "--clients", "4", "--clients-per-round", "2", "--rounds", "2", "--quiet"]
CLI_SMALL = ["--set", "train_size=80", "--set", "test_size=20", "--set", "local_steps=1", "--set", "threads=1"]


def run_cli(out, *args: str) -> dict:
    """``fedsqueeze run`` in this process (so a test can make a client hostile); results.json's content."""
    import json
    import sys

    from fedsqueeze.cli import main

    argv = sys.argv
    sys.argv = ["fedsqueeze", "run", *CLI_TINY, *CLI_SMALL, "--out", str(out), *args]
    try:
        main()
    finally:
        sys.argv = argv
    return json.loads((out / "results.json").read_text())


def hostile_round1(monkeypatch, make_payload):
    """Round 1's first client to train sends ``make_payload(method, client)`` instead of its update."""
    from fedsqueeze.methods.tensor import TensorMethod

    honest = TensorMethod.client_update
    hostile: list[int] = []

    def client_update(self, message, client, state, ctx):
        out = honest(self, message, client, state, ctx)
        if ctx.round == 1 and hostile in ([], [client]):
            hostile[:] = [client]
            out.payload = make_payload(self, client)
        return out

    monkeypatch.setattr(TensorMethod, "client_update", client_update)


def test_cli_a_huge_finite_update_never_makes_the_model_non_finite(tmp_path, monkeypatch):
    """Before: FedAvg adopted w + 4·(3e38 / 2) = inf, evaluated NaN, and every later round was skipped."""
    from fedsqueeze.runtime.checkpoint import load_checkpoint

    def huge(m, client):
        return encode_tensors(m.up_codec, {n: np.full(m.shapes[n], 3e38, np.float32) for n in m.names}, n=len(m.task.client_data(client)))

    hostile_round1(monkeypatch, huge)
    res = run_cli(tmp_path / "run", "--method", "fedavg", "--set", "server_lr=4")
    r1, r2 = res["rounds"]
    assert len(r1["dropped"]) == 1 and "non-finite" in r1["dropped"][0]["reason"], r1["dropped"]
    assert r1["clients_aggregated"] == 1 and not r1["skipped"] and "aggregate_rejected" not in r1
    assert r2["clients_aggregated"] == 2 and not r2["skipped"] and r2["dropped"] == []
    assert all(np.isfinite(r["loss"]) for r in (r1, r2))  # before the guard: NaN from round 1 on
    weights = load_checkpoint(tmp_path / "run").server_state["weights"]
    assert all(np.all(np.isfinite(a)) for a in weights.values())


def test_cli_too_few_clients_left_after_the_drop_keep_the_previous_model(tmp_path, monkeypatch):
    def huge(m, client):
        return encode_tensors(m.up_codec, {n: np.full(m.shapes[n], -3e38, np.float32) for n in m.names}, n=_n(m, client))

    hostile_round1(monkeypatch, huge)
    res = run_cli(tmp_path / "run", "--method", "fedavg", "--set", "server_lr=4", "--set", "min_clients=2")
    r1, r2 = res["rounds"]
    assert r1["skipped"] and r1["clients_aggregated"] == 0 and "min_clients=2" in r1["aggregate_rejected"]
    assert len(r1["dropped"]) == 1 and "non-finite" in r1["dropped"][0]["reason"]
    assert not r2["skipped"] and r2["clients_aggregated"] == 2 and np.isfinite(r2["loss"])


def _n(m, client):
    return len(m.task.client_data(client))


HOSTILE_UPDATES = {
    # another codec than the server's raw float32 (before: decoded and averaged)
    "qsgd-coded": (lambda m, c: encode_tensors(get_codec("qsgd"), hand_deltas(m, 0), CodecContext(seed=1), n=_n(m, c)), "kind"),
    # bool- and int64-typed tensors (before: cast to float32 and averaged)
    "bool": (lambda m, c: encode_tensors(m.up_codec, {n: np.ones(m.shapes[n], np.bool_) for n in m.names}, n=_n(m, c)), "float32"),
    "int64": (lambda m, c: encode_tensors(m.up_codec, {n: np.ones(m.shapes[n], np.int64) for n in m.names}, n=_n(m, c)), "float32"),
    # finite as float64, inf as float32 (before: the model became inf)
    "float64-1e300": (lambda m, c: encode_tensors(m.up_codec, {n: np.full(m.shapes[n], 1e300) for n in m.names}, n=_n(m, c)), "float32"),
    # 10**18 examples (before: ~100% of the FedAvg weight)
    "n=1e18": (lambda m, c: encode_tensors(m.up_codec, hand_deltas(m, 0), n=10**18), "partition"),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE_UPDATES))
def test_cli_a_hostile_update_is_dropped_with_its_reason(tmp_path, monkeypatch, kind):
    make, needle = HOSTILE_UPDATES[kind]
    hostile_round1(monkeypatch, make)
    res = run_cli(tmp_path / "run", "--method", "fedavg", "--rounds", "1")
    (r1,) = res["rounds"]
    assert len(r1["dropped"]) == 1 and needle in r1["dropped"][0]["reason"], r1["dropped"]
    assert r1["clients_aggregated"] == 1 and np.isfinite(r1["loss"])


def test_cli_example_counts_are_clipped_to_max_client_examples(tmp_path):
    res = run_cli(tmp_path / "run", "--method", "head", "--set", "max_client_examples=7")
    assert res["config"]["max_client_examples"] == 7
    for r in res["rounds"]:
        assert r["clients_aggregated"] == 2
        assert r["clipped_examples"] == [{"client": c["client"], "reported": 20, "used": 7} for c in r["sim_clients"]]
    plain = run_cli(tmp_path / "plain", "--method", "head")
    assert all("clipped_examples" not in r for r in plain["rounds"])


def test_clipped_counts_set_the_fedavg_weights(task):
    from fedsqueeze.methods.updates import TensorUpdate, ZOUpdate
    from fedsqueeze.runtime.integrity import aggregate_finite, clip_examples

    m = build("fedavg", task)
    state = m.init_server()
    d0, d1 = hand_deltas(m, 0), hand_deltas(m, 1)
    big, reported = clip_examples(TensorUpdate(d0, 50), 20)
    small, none = clip_examples(TensorUpdate(d1, 10), 20)
    assert (big.n, reported, small.n, none) == (20, 50, 10, None)
    assert clip_examples(TensorUpdate(d0, 50), 0)[0].n == 50  # 0: no cap
    zo = ZOUpdate(np.zeros((1, 1), np.float32))
    assert clip_examples(zo, 1) == (zo, None)  # unweighted: nothing to clip
    new = aggregate_finite(m, state, {0: big, 1: small}, CTX).state
    for n in m.names:  # weights 20:10, not the reported 50:10
        mean = (d0[n].astype(np.float64) * 20 + d1[n].astype(np.float64) * 10) / 30  # Σ n_i·δ_i / Σ n_i
        np.testing.assert_array_equal(new["weights"][n], fedavg_step(state["weights"][n], mean))
