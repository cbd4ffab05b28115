"""Hostile clients against the server's decoding (issue 15, "Server memory and model integrity").

Each test is one finding: it failed on the code before the fix and passes now.

- a payload in a codec (or with codec options) the server did not configure is refused, and a
  qsgd header's bucket size no longer multiplies what the decoder allocates;
- dtypes and shapes must be the server's own (float32), values finite after the cast;
- an optional bound on an update's norm stops huge finite updates;
- a client's example count is bounded by its partition.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import zstandard
from handmade import build, hand_deltas, hand_head, mask_payload, shared_task

from fedsqueeze.codecs import CodecContext, encode_tensors, frame, get_codec
from fedsqueeze.codecs.qsgd import QSGDCodec
from fedsqueeze.errors import PayloadError
from fedsqueeze.methods.base import RoundContext

CTX = RoundContext(round=1, rounds=2, seed=0)


@pytest.fixture(scope="module")
def task():
    return shared_task()


def zeros_zstd(size: int, piece: int = 1 << 20) -> bytes:
    """A zstd frame of ``size`` zero bytes (content size written), made without holding them all."""
    cobj = zstandard.ZstdCompressor(level=1, write_content_size=True).compressobj(size=size)
    zero, out, left = bytes(piece), [], size
    while left:
        step = min(piece, left)
        out.append(cobj.compress(zero[:step]))
        left -= step
    out.append(cobj.flush())
    return b"".join(out)


def bucket_bomb(tensors: int = 30, bucket: int = 1 << 20, levels: int = 300) -> bytes:
    """A small qsgd payload of ``tensors`` one-element tensors whose declared bucket made the old
    decoder allocate ``tensors`` × bucket × 2 bytes (levels > 127 are int16) before any check."""
    need = tensors * (4 + 2 * bucket)
    q = zeros_zstd(need)
    table = [[f"t{i}", "float32", [1]] for i in range(tensors)]
    meta = {"quantized": table, "exact": [], "levels": levels, "bucket": bucket, "lengths": [len(q), 0], "extra": {"n": 3}}
    return frame("qsgd", meta, q)


def peak_of(fn) -> tuple[int, BaseException | None]:
    """Peak traced allocation (bytes) while ``fn()`` runs, and the exception it raised, if any."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    err: BaseException | None = None
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001  (returned to the test, which checks its type)
        err = exc
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return peak, err


# ---- the codec and its options are the server's own ---------------------------------------------


def test_a_qsgd_bomb_sent_to_a_raw_server_is_refused_before_it_allocates(task):
    m = build("fedavg", task)  # raw uplink
    payload = bucket_bomb()
    assert len(payload) < 64_000  # a small payload...
    legit = 4 * m.max_elements  # ...the float32 size of what this server legitimately receives
    peak, err = peak_of(lambda: m.decode_update(payload, 1, m.init_server(), CTX))
    assert isinstance(err, PayloadError) and "kind" in str(err)
    assert peak < 2 * legit, f"peak {peak} bytes while refusing a {len(payload)}-byte payload"


def test_the_qsgd_decoder_allocates_by_tensor_size_not_by_the_declared_bucket():
    # straight to the codec (no server options to compare against): the bucket of 2**20 applies
    # to 30 one-element tensors; the old decoder held 30 × 2 MiB of levels, the new one streams
    payload_meta = {"quantized": [[f"t{i}", "float32", [1]] for i in range(30)], "exact": [], "levels": 300, "bucket": 1 << 20}
    q = zeros_zstd(30 * (4 + 2 * (1 << 20)))
    payload_meta["lengths"] = [len(q), 0]
    out: dict = {}
    peak, err = peak_of(lambda: out.update(QSGDCodec().decode(payload_meta, memoryview(q), CodecContext(max_elements=1000))))
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
