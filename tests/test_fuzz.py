"""Fuzz every decoder: only PayloadError may escape (bounded examples; FUZZ_EXAMPLES raises the bound).

A codec registered later is fuzzed automatically with its default options (``test_every_codec``);
a decoder that needs options or another payload plugs in with one ``fuzz_codec``/``fuzz_decoder`` line.
"""

import numpy as np
import pytest
from fuzzing import EXAMPLES, PEAK, REJECTED, TRIED, decode_budget, fuzz_codec, fuzz_decoder, reframe, traced_peak
from handmade import build, fresh, hand_deltas, hand_head, mask_payload, shared_task

from fedsqueeze.codecs import CODECS, CodecContext, decode_tensors, encode_tensors, get_codec, unframe
from fedsqueeze.errors import ConfigError, PayloadError
from fedsqueeze.methods.base import RoundContext
from fedsqueeze.runtime.checkpoint import decode_checkpoint, encode_checkpoint
from fedsqueeze.treeio import pack_tree, unpack_tree


def sample_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "layer.weight": rng.standard_normal((6, 5)).astype(np.float32),
        "layer.bias": rng.standard_normal(5).astype(np.float32),
        "head.weight": (rng.standard_normal((3, 6)) * 1e-3).astype(np.float32),
    }


@pytest.mark.parametrize("codec_id", sorted(CODECS))
def test_every_codec(codec_id):
    # no silent skip: a codec that cannot be built with defaults, or cannot encode float tensors,
    # fails here until it gets its own fuzz_codec line (and is excluded from this loop by name)
    try:
        codec = get_codec(codec_id)
    except ConfigError as exc:
        pytest.fail(f"codec {codec_id!r} needs options ({exc}): give it its own fuzz_codec line")
    try:
        encode_tensors(codec, sample_tensors(), CodecContext(seed=7), n=3)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"codec {codec_id!r} does not encode float tensors with default options ({exc}): give it its own fuzz_codec line")
    fuzz_codec(codec_id, sample_tensors())


@pytest.mark.parametrize(
    "codec_id, options",
    [
        ("qsgd", {"levels": 300, "bucket": 7}),
        ("sign", {"error_feedback": False}),
        ("topk", {"k": 0.3}),
        ("eden", {"chunk": 8}),
        ("zstd", {"shuffle": False}),
        ("sz3", {"mode": "abs", "bound": 1e-3, "threshold": 4, "sparse_rows": True}),
    ],
)
def test_codecs_with_options(codec_id, options):
    tensors = sample_tensors()
    tensors["rows.weight"] = np.zeros((8, 4), np.float32)
    tensors["rows.weight"][2] = 1.5  # a row-sparse tensor (sz3 sends a row bitmap)
    fuzz_codec(codec_id, tensors, options, examples=EXAMPLES // 2)


# ---- every method's server-side decode_update, the mask downlinks, decomfl's client side --------


@pytest.fixture(scope="module")
def task():
    return shared_task()


TENSOR_METHODS = ["fedavg", "head", "topk", "qsgd", "signsgd", "eden", "fedsz", "bitfit", "lora", "adapter", "prompt", "ia3"]


@pytest.mark.parametrize("name", TENSOR_METHODS)
def test_tensor_method_decode_update(task, name):
    m = build(name, fresh(task) if name in {"bitfit", "lora", "adapter", "prompt", "ia3"} else task)
    state, ctx = m.init_server(), RoundContext(round=1, rounds=2, seed=0)
    payload = encode_tensors(m.up_codec, hand_deltas(m, 0), CodecContext(seed=1), n=4)
    # the codecs themselves are fuzzed above; here the method's own checks (tensor set, shapes, NaN, n)
    examples = EXAMPLES if name == "head" else EXAMPLES // 5 if name == "fedavg" else EXAMPLES // 3
    # peak memory held to 2 x the float32 size of the trainable tensors (+ the fixed header allowance)
    budget = decode_budget(m.max_elements)
    fuzz_decoder(f"{name}.decode_update", lambda d: m.decode_update(d, 1, state, ctx), payload, examples, max_peak=budget)
    assert 0 < PEAK[f"{name}.decode_update"] <= budget


def test_head_client_side_decode(task):
    """The client decodes the server's tensors (decode_tensors + the shape/NaN checks) before training."""
    m = build("head", task, downlink_codec="fp16")
    state, ctx = m.init_server(), RoundContext(round=1, rounds=2, seed=0)
    fuzz_decoder("head.client_update", lambda d: m.client_update(d, 0, None, ctx), m.downlink(state, ctx, 0), EXAMPLES // 2)


MASK_METHODS = [
    ("fedpm", {}),
    ("fedpm", {"stratify": True, "head_dtype": "float16"}),
    ("deltamask", {}),
    ("deltamask", {"filter": "xor8"}),
    ("deltamask-exact", {}),
    ("deltamask-exact", {"coder": "elias-fano"}),
]


@pytest.mark.parametrize("name, options", MASK_METHODS, ids=lambda v: str(v))
def test_mask_method_decoders(task, name, options):
    m = build(name, task, **options)
    state, ctx = m.init_server(), RoundContext(round=1, rounds=2, seed=0)
    message = m.downlink(state, ctx, 2)
    label = name + "".join(f",{k}={v}" for k, v in options.items())
    fuzz_decoder(f"{label}.decode_downlink", m.decode_downlink, message)
    ref = m.uniforms(ctx, 2, None) < m.start_theta(m.theta_of(state["theta_sym"], state["levels"]))
    keep = ref.copy()
    keep[::331] ^= True
    payload = mask_payload(m, state, ctx, 2, keep, hand_head(m, 0), 5)

    def decode(data):  # the server's decoding, then its aggregation: both may only raise PayloadError
        update = m.decode_update(data, 2, state, ctx)
        fresh_state = {**state, "theta_sym": state["theta_sym"].copy(), "head": dict(state["head"])}
        m.aggregate(fresh_state, {2: update}, ctx)

    fuzz_decoder(f"{label}.decode_update", decode, payload, EXAMPLES // 2)


MASK_OVER = pytest.mark.xfail(
    strict=True,
    reason="the mask methods' default mask coder ('context', issue 16, helper 'coding') allocates ~345 KiB to decode a "
    "valid 17k-weight mask, over 2x float32 of the masked weights and head (~200 KiB with the header allowance); "
    "the xor8 filter and elias-fano coders stay within it",
)


@pytest.mark.parametrize(
    "name, options",
    [
        (n, o) if o.get("filter") == "xor8" or o.get("coder") == "elias-fano" else pytest.param(n, o, marks=MASK_OVER)
        for n, o in MASK_METHODS
    ],
    ids=lambda v: str(v),
)
def test_mask_method_decode_update_peak_memory(task, name, options):
    """decode_update alone, its peak memory held to 2 x float32 of the masked weights and the head."""
    m = build(name, task, **options)
    state, ctx = m.init_server(), RoundContext(round=1, rounds=2, seed=0)
    ref = m.uniforms(ctx, 2, None) < m.start_theta(m.theta_of(state["theta_sym"], state["levels"]))
    keep = ref.copy()
    keep[::331] ^= True
    payload = mask_payload(m, state, ctx, 2, keep, hand_head(m, 0), 5)
    label = name + "".join(f",{k}={v}" for k, v in options.items()) + ".decode_update[peak]"
    budget = decode_budget(m.n + sum(int(np.prod(s)) for s in m.head_shapes.values()))
    fuzz_decoder(label, lambda d: m.decode_update(d, 2, state, ctx), payload, EXAMPLES // 5, max_peak=budget)
    assert 0 < PEAK[label] <= budget


def test_decomfl_decoders(task):
    from fedsqueeze.codecs import get_codec

    m = build("decomfl", task, params="head", warm_start_rounds=1, warm_start_steps=1, perturbations=2)
    state = m.init_server()
    raw = get_codec("raw")
    warm = RoundContext(round=1, rounds=4, seed=0)
    delta = {n: np.full(m.named[n].shape, 1e-3, np.float16) for n in m.head}
    # server, warm-start round: a raw float16 head delta
    fuzz_decoder(
        "decomfl.decode_update[warm]",
        lambda d: m.decode_update(d, 0, state, warm),
        encode_tensors(raw, delta, n=3),
        max_peak=decode_budget(m.head_elements),
    )
    # client, warm-start round: the head message (decoded, then one cheap probing step)
    fuzz_decoder("decomfl.client_update[warm]", lambda d: m.client_update(d, 2, None, warm), m.downlink(state, warm, 2), EXAMPLES // 2)
    # the zeroth-order rounds use compact frames: fuzzed in tests/test_zo_wire.py


def test_decomfl_zo_decode_update_peak_memory(task):
    """The zeroth-order uplink is a compact frame (no JSON header): its decoding stays within 2 x float32 of K x P."""
    from fedsqueeze.methods.zo_wire import compact_frame

    m = build("decomfl", task, params="head", warm_start_rounds=1, warm_start_steps=1, perturbations=2)
    raw, warm, zo = get_codec("raw"), RoundContext(round=1, rounds=4, seed=0), RoundContext(round=2, rounds=4, seed=0)
    delta = {n: np.full(m.named[n].shape, 1e-3, np.float16) for n in m.head}
    state = m.init_server()
    state, _ = m.aggregate(state, {0: m.decode_update(encode_tensors(raw, delta, n=3), 0, state, warm)}, warm)
    up = compact_frame("decomfl-up", 2, [], np.ones((m.k, m.p), "<f4").tobytes())
    budget = decode_budget(m.k * m.p)
    # the honest upload, a correctly checksummed 200 KB body, a truncated one, and another kind of frame
    payloads = [up, compact_frame("decomfl-up", 2, [], bytes(200_000)), up[:-5], compact_frame("decomfl-down", 2, [], up)]
    for i, data in enumerate(payloads):
        peak, err = traced_peak(lambda data=data: m.decode_update(data, 0, state, zo))
        assert (err is None) == (i == 0) and (err is None or isinstance(err, PayloadError)), err
        assert 0 < peak <= budget, (i, peak, budget)


def test_unframe():
    fuzz_decoder("unframe", unframe, reframe(b"raw", b'{"a":[1,2],"b":{"c":null}}', b"body bytes"))


def test_unpack_tree():
    tree = {"weights": sample_tensors(), "round": 3, "priors": [np.ones(4), (1.5, "x")], 7: None, "f": float("inf")}
    payload = pack_tree(tree)
    fuzz_decoder("unpack_tree", lambda d: unpack_tree(d, max_elements=100), payload)


def test_checkpoint_decoder():
    payload = encode_checkpoint(
        config={"method": "fedavg", "rounds": 4},
        round_=1,
        server_state={"weights": sample_tensors()},
        client_states={0: None, 3: {"residual": np.zeros(3, np.float32)}},
        rounds=[{"round": 1, "accuracy": 0.5}],
    )
    fuzz_decoder("checkpoint", decode_checkpoint, payload)


def test_known_hostile_headers_are_typed_errors():
    # deeply nested JSON behind a valid checksum used to escape as RecursionError
    with pytest.raises(PayloadError):
        unframe(reframe(b"raw", b"[" * 100_000 + b"]" * 100_000, b""))
    # an unhashable dtype used to escape as TypeError
    with pytest.raises(PayloadError):
        get_codec("raw").decode({"tensors": [["w", ["float32"], [2]]]}, memoryview(b"\0" * 8), CodecContext())
    # a header may not make the decoder allocate past the cap
    with pytest.raises(PayloadError, match="cap"):
        get_codec("raw").decode({"tensors": [["w", "float32", [2**30, 2**9]]]}, memoryview(b""), CodecContext(max_elements=10))

    # a payload naming a codec this build lacks, or carrying a non-object config, is refused
    with pytest.raises(PayloadError, match="unknown codec"):
        decode_tensors(reframe(b"nosuch", b"{}", b""))
    with pytest.raises(PayloadError, match="config"):
        decode_tensors(reframe(b"raw", b'{"config": [1], "tensors": []}', b""))


def test_fuzz_counts_every_try():
    before = TRIED["count-check"]
    fuzz_decoder("count-check", unframe, reframe(b"raw", b"{}", b"x"), examples=20)
    assert 0 < TRIED["count-check"] - before <= 20
    assert REJECTED["count-check"] > 0
