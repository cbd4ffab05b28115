"""Property tests of the codec library: stated error bounds, exact lossless paths, typed errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedsqueeze.codecs import CODECS, CodecContext, decode_tensors, encode_tensors, frame, get_codec, unframe
from fedsqueeze.errors import ConfigError, PayloadError

# 25 fixed examples per property in CI; HYPOTHESIS_PROFILE=explore: 500 random ones
FAST = settings(
    max_examples=500 if os.environ.get("HYPOTHESIS_PROFILE") == "explore" else 25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
LOSSY = ["sz3", "fp16", "qsgd", "topk", "sign", "eden"]


def roundtrip(codec, tensors, ctx=None, dctx=None):
    payload = encode_tensors(codec, tensors, ctx or CodecContext(seed=7))
    out, _ = decode_tensors(payload, dctx or CodecContext(max_elements=10**7))
    return out, payload


floats32 = hnp.arrays(
    np.float32,
    st.integers(1, 3000),
    elements=st.floats(-1e4, 1e4, width=32, allow_nan=False, allow_infinity=False),
)


def all_dtype_tensors():
    dtypes = st.sampled_from(
        ["float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool"]
    )
    shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=9)
    array = st.tuples(dtypes, shapes).flatmap(lambda ds: hnp.arrays(np.dtype(ds[0]), ds[1]))
    return st.dictionaries(st.text("abcxyz._", min_size=1, max_size=8), array, min_size=1, max_size=4)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# ---- lossless paths are exact ------------------------------------------------------------------


@FAST
@given(all_dtype_tensors(), st.sampled_from(["raw", "zstd"]))
def test_lossless_codecs_are_exact_for_every_dtype(tensors, cid):
    out, _ = roundtrip(get_codec(cid), tensors)
    assert set(out) == set(tensors)
    assert all(same(out[n], tensors[n]) for n in tensors)


@pytest.mark.parametrize("cid", LOSSY)
def test_lossy_codecs_keep_integer_and_small_tensors_exact(cid):
    big = np.random.default_rng(0).standard_normal((64, 40)).astype(np.float32)
    ints = np.array([-(2**63), -1, 0, 2**62 + 12345, 2**63 - 1], dtype=np.int64)
    flags = np.array([True, False, True])
    out, _ = roundtrip(get_codec(cid), {"w.weight": big, "step": ints, "mask": flags})
    assert same(out["step"], ints) and same(out["mask"], flags)
    assert out["w.weight"].dtype == np.float32 and out["w.weight"].shape == big.shape


# ---- lossy codecs respect their stated bounds ---------------------------------------------------


@FAST
@given(floats32, st.sampled_from([1e-1, 1e-2, 1e-3]))
def test_sz3_abs_bound(x, bound):
    out, _ = roundtrip(get_codec("sz3", mode="abs", bound=bound, threshold=0), {"x": x})
    assert np.abs(out["x"].astype(np.float64) - x).max() <= bound * (1 + 1e-6)


@FAST
@given(floats32, st.sampled_from([1e-1, 1e-2, 1e-3]), st.sampled_from(["interp_lorenzo", "lorenzo_reg", "interp", "nopred"]))
def test_sz3_rel_bound_is_per_tensor_range(x, bound, algo):
    small = (x * 1e-6).astype(np.float32)  # a tensor a million times smaller keeps its own bound
    out, _ = roundtrip(get_codec("sz3", mode="rel", bound=bound, threshold=0, algo=algo), {"x": x, "small": small})
    for name, a in (("x", x), ("small", small)):
        span = float(a.max()) - float(a.min())
        assert np.abs(out[name].astype(np.float64) - a).max() <= bound * span * (1 + 1e-5)


@FAST
@given(st.integers(2, 60), st.integers(1, 40), st.floats(0.0, 0.5), st.sampled_from(["rel", "abs"]), st.integers(0, 2**32 - 1))
def test_sz3_row_sparse_tensors_keep_zero_rows_exact_and_the_bound(rows, cols, density, mode, seed):
    rng = np.random.default_rng(seed)
    x = np.zeros((rows, cols), dtype=np.float32)
    live = rng.random(rows) < density
    x[live] = rng.standard_normal((int(live.sum()), cols)).astype(np.float32)
    out, payload = roundtrip(get_codec("sz3", mode=mode, bound=1e-2, threshold=0), {"emb": x})
    span = float(x.max()) - float(x.min())
    bound = 1e-2 if mode == "abs" else 1e-2 * span
    assert np.abs(out["emb"].astype(np.float64) - x).max() <= bound * (1 + 1e-5)
    meta = unframe(payload)[1]
    sparse = 0 < live.sum() <= rows // 2
    if meta["lossy"]:  # an all-zero tensor has no range and goes lossless
        assert meta["rows"] == [int(live.sum()) if sparse else 0]
    if sparse:  # the rows left out come back as exact zeros
        assert np.all(out["emb"][~live] == 0)


def test_sz3_row_sparse_header_is_checked():
    x = np.zeros((64, 8), dtype=np.float32)
    x[3] = np.arange(8)
    payload = encode_tensors(get_codec("sz3", threshold=0), {"emb": x}, CodecContext())
    assert unframe(payload)[1]["rows"] == [1]
    dense = encode_tensors(get_codec("sz3", threshold=0, sparse_rows=False), {"emb": x}, CodecContext())
    assert unframe(dense)[1]["rows"] == [0] and len(dense) > len(payload)
    _, meta, body = unframe(payload)
    for bad_rows in ([2], [-1], ["1"], [0]):
        with pytest.raises(PayloadError):
            decode_tensors(frame("sz3", {**meta, "rows": bad_rows}, bytes(body)), CodecContext(max_elements=10**6))


def test_sz3_partition_follows_threshold_and_name_filter():
    rng = np.random.default_rng(1)
    t = {
        "l.weight": rng.standard_normal(2000).astype(np.float32),
        "l.bias": rng.standard_normal(2000).astype(np.float32),
        "tiny.weight": rng.standard_normal(100).astype(np.float32),
    }
    codec = get_codec("sz3", bound=1e-2, name_filter="weight")
    out, payload = roundtrip(codec, t)
    meta = unframe(payload)[1]
    assert [row[0] for row in meta["lossy"]] == ["l.weight"]
    assert same(out["l.bias"], t["l.bias"]) and same(out["tiny.weight"], t["tiny.weight"])
    assert not same(out["l.weight"], t["l.weight"])


@FAST
@given(floats32)
def test_fp16_bound(x):
    out, _ = roundtrip(get_codec("fp16"), {"x": x})
    err = np.abs(out["x"].astype(np.float64) - x)
    assert (err <= np.maximum(np.abs(x) * 2.0**-11, 2.0**-25)).all()


@FAST
@given(floats32, st.sampled_from([1, 4, 16, 200]), st.sampled_from([8, 64, 512]))
@example(np.array([8.939e-42, 8.939e-42], dtype=np.float32), 4, 8)  # subnormal norm: s / r overflowed
@example(np.array([3.1e-44], dtype=np.float32), 200, 8)  # subnormal norm: r / s underflowed
def test_qsgd_bound_per_bucket(x, levels, bucket):
    out, _ = roundtrip(get_codec("qsgd", levels=levels, bucket=bucket), {"x": x})
    pad = (-x.size) % bucket
    norms = np.linalg.norm(np.concatenate([x, np.zeros(pad, np.float32)]).astype(np.float64).reshape(-1, bucket), axis=1)
    limit = np.repeat(norms / levels, bucket)[: x.size]
    # up to float32's subnormal resolution (norms are sent as float32)
    assert (np.abs(out["x"].astype(np.float64) - x) <= limit * (1 + 1e-4) + 1e-44).all()


def test_qsgd_is_unbiased_and_seeded():
    x = np.random.default_rng(2).standard_normal(4096).astype(np.float32)
    codec = get_codec("qsgd", levels=2)
    outs = [roundtrip(codec, {"x": x}, CodecContext(seed=s))[0]["x"] for s in range(200)]
    one_error = np.abs(outs[0] - x).mean()
    # unbiased: averaging 200 draws shrinks the error about sqrt(200) ≈ 14 times
    assert np.abs(np.mean(outs, axis=0) - x).mean() < 0.15 * one_error
    a = encode_tensors(codec, {"x": x}, CodecContext(seed=5))
    assert a == encode_tensors(codec, {"x": x}, CodecContext(seed=5)) != encode_tensors(codec, {"x": x}, CodecContext(seed=6))


@FAST
@given(floats32, st.sampled_from([0.001, 0.05, 0.5, 1.0]))
def test_topk_sends_the_largest_and_feeds_back_the_rest(x, k):
    codec = get_codec("topk", k=k)
    ctx = CodecContext(seed=0)
    old = np.zeros_like(x)
    for _ in range(2):  # the second round adds the first round's residual
        out, _ = roundtrip(codec, {"x": x}, ctx)
        sent = out["x"].reshape(-1)
        new = ctx.state["ef:topk"]["x"]
        p = (x + old).astype(np.float32)
        np.testing.assert_array_equal(sent + new, p)
        kept = np.flatnonzero(new == 0) if np.count_nonzero(sent) == 0 else np.flatnonzero(sent != 0)
        assert np.count_nonzero(sent) <= max(1, int(np.ceil(k * x.size)))
        rest = np.delete(np.abs(p), kept)
        if rest.size and np.count_nonzero(sent):
            assert np.abs(sent[kept]).min() >= rest.max()
        old = new.copy()


@FAST
@given(floats32)
def test_sign_scale_and_error_feedback(x):
    ctx = CodecContext()
    out, payload = roundtrip(get_codec("sign"), {"x": x}, ctx)
    scale = np.float32(np.abs(x).mean(dtype=np.float64))
    np.testing.assert_allclose(np.abs(out["x"]), scale, rtol=1e-6)
    np.testing.assert_allclose(out["x"] + ctx.state["ef:sign"]["x"], x, rtol=1e-5, atol=1e-5 * float(scale) + 1e-30)
    assert len(unframe(payload)[2]) <= 4 + (x.size + 7) // 8 + 16  # one bit per value, one scale


@FAST
@given(floats32, st.integers(0, 2**62), st.sampled_from([16, 4096]))
def test_eden_projection_is_exact(x, seed, chunk):
    out, _ = roundtrip(get_codec("eden", chunk=chunk), {"x": x}, CodecContext(seed=seed))
    xd = x.astype(np.float64)
    assert np.dot(xd, out["x"].astype(np.float64)) == pytest.approx(np.dot(xd, xd), rel=1e-3, abs=1e-20)


def test_eden_error_is_that_of_a_gaussian_sign():
    x = (np.random.default_rng(3).standard_normal(8192) ** 3).astype(np.float32)  # heavy-tailed input
    nmse = []
    for seed in range(5):
        out, _ = roundtrip(get_codec("eden"), {"x": x}, CodecContext(seed=seed))
        nmse.append(np.sum((out["x"] - x) ** 2) / np.sum(x**2))
    assert 0.5 < np.mean(nmse) < 0.65  # π/2 - 1 ≈ 0.571 for any input, thanks to the rotation


# ---- corrupt bytes raise PayloadError and nothing else ------------------------------------------

SAMPLE = {
    "enc.weight": np.random.default_rng(4).standard_normal((48, 40)).astype(np.float32),
    "enc.bias": np.linspace(-1, 1, 40, dtype=np.float32),
    "steps": np.arange(6, dtype=np.int64),
}
json_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**65), 2**65),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=4),
    st.lists(st.integers(-3, 5000), max_size=4),
    st.lists(st.lists(st.one_of(st.text(max_size=3), st.integers(-2, 99)), max_size=3), max_size=3),
)


def mutations():
    flip = st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255))
    cut = st.tuples(st.just("cut"), st.integers(0, 10**6), st.just(0))
    meta = st.tuples(st.just("meta"), st.integers(0, 50), json_values)
    return st.lists(st.one_of(flip, cut, meta), min_size=1, max_size=3)


def mutate(payload: bytes, edits) -> bytes:
    """Corrupt a payload *behind* its checksum (re-framed), so each decoder sees the damage."""
    kind, meta, body = unframe(payload)
    body = bytearray(body)
    for op, a, b in edits:
        if op == "flip" and body:
            body[a % len(body)] ^= b
        elif op == "cut":
            body = body[: a % (len(body) + 1)]
        elif op == "meta":
            key = sorted(meta)[a % len(meta)]
            meta[key] = b
    return frame(kind, json.loads(json.dumps(meta)), bytes(body))


@pytest.mark.parametrize("cid", sorted(CODECS))
def test_corrupt_payloads_raise_only_payload_error(cid):
    payload = encode_tensors(get_codec(cid), SAMPLE, CodecContext(seed=1))

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(mutations())
    def check(edits):
        try:
            decode_tensors(mutate(payload, edits), CodecContext(max_elements=10**5))
        except PayloadError:
            pass

    check()
    with pytest.raises(PayloadError):  # flipped bits on the wire: the checksum catches them
        decode_tensors(payload[:20] + bytes([payload[20] ^ 1]) + payload[21:])
    with pytest.raises(PayloadError):
        decode_tensors(payload[:-5])


# ---- options --------------------------------------------------------------------------------------


def test_codec_options_are_validated_and_json_safe():
    with pytest.raises(ConfigError, match="sz3 algo must be one of"):
        get_codec("sz3", algo="lorenzo")
    codec = get_codec("sz3", bound="1e-3", mode="abs")
    assert codec.get_config() == {"id": "sz3", **codec.config} and codec.opts.bound == 1e-3
    assert get_codec(codec.get_config()).config == codec.config
    json.dumps(codec.get_config())
    with pytest.raises(ConfigError, match="did you mean 'bound'"):
        get_codec("sz3", bund=1e-2)
    with pytest.raises(ConfigError):
        get_codec("sz3", mode="psnr")
    with pytest.raises(ConfigError):
        get_codec("topk", k=0)
    with pytest.raises(ConfigError):
        get_codec("eden", chunk=1000)
    with pytest.raises(ConfigError):
        get_codec("qsgd", levels="many")
