"""Fuzz every decoder: only PayloadError may escape (bounded examples; FUZZ_EXAMPLES raises the bound).

A codec registered later is fuzzed automatically with its default options (``test_every_codec``);
a decoder that needs options or another payload plugs in with one ``fuzz_codec``/``fuzz_decoder`` line.
"""

import numpy as np
import pytest
from fuzzing import EXAMPLES, PEAK, REJECTED, TRIED, decode_budget, fuzz_codec, fuzz_decoder, reframe, traced_peak
from handmade import build, fresh, hand_deltas, hand_head, mask_payload, shared_task

from fedsqueeze.codecs import CODECS, CodecContext, decode_tensors, encode_tensors, get_codec, unframe
from fedsqueeze.codecs.ans import bernoulli_bits, decode_grouped_ranks, grouped_bits_cap
from fedsqueeze.codecs.sideinfo import (
    NUM_CONTEXTS,
    context_sizes,
    decode_flips_counted,
    encode_flips,
    flip_bound_bits,
    flip_contexts,
    unpack_counts,
)
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


@pytest.mark.parametrize(
    "name",
    TENSOR_METHODS,
)
def test_tensor_method_header_of_empty_lists_stays_within_budget(task, name):
    """A header of empty lists as long as the method's header cap allows is refused within budget (it
    took head, bitfit and the PEFT methods to 5-8x their budget before the cap on JSON values)."""
    from fedsqueeze.codecs.base import expect_tensors, meta_bound

    m = build(name, fresh(task) if name in {"bitfit", "lora", "adapter", "prompt", "ia3"} else task)
    state, ctx = m.init_server(), RoundContext(round=1, rounds=2, seed=0)
    limit = meta_bound(expect_tensors({n: m.shapes[n] for n in m.names}))
    meta = ('{"n":5,"x":[' + ",".join(["[]"] * ((limit - 13) // 3)) + "]}").encode()
    peak, err = traced_peak(lambda: m.decode_update(reframe(m.up_codec.codec_id.encode(), meta, b""), 1, state, ctx))
    assert isinstance(err, PayloadError) and 0 < peak <= decode_budget(m.max_elements), (peak, err)


def test_head_client_side_decode(task):
    """The client decodes the server's tensors (decode_tensors + the shape/NaN checks) before training."""
    m = build("head", task, downlink_codec="fp16")
    state, ctx = m.init_server(), RoundContext(round=1, rounds=2, seed=0)
    fuzz_decoder("head.client_update", lambda d: m.client_update(d, 0, None, ctx), m.downlink(state, ctx, 0), EXAMPLES // 2)


MASK_METHODS = [
    ("fedpm", {}),
    ("fedpm", {"coder": "levels"}),
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

    # fedpm's levels code decodes the whole mask (~3x a flip code's time): fewer examples keep it near 2 s
    fuzz_decoder(f"{label}.decode_update", decode, payload, EXAMPLES // (4 if options.get("coder") == "levels" else 2))


@pytest.mark.parametrize("name, options", MASK_METHODS, ids=lambda v: str(v))
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


@pytest.mark.parametrize("name, options", MASK_METHODS, ids=lambda v: str(v))
def test_mask_uplink_header_of_empty_lists_stays_within_budget(task, name, options):
    """Parsing JSON takes up to ~25 bytes per byte of text: a header of empty lists as long as the
    uplink allows (it allowed a 17 KiB head table: 400 KB parsed) must stay within the mask's budget."""
    m = build(name, task, **options)
    state, ctx = m.init_server(), RoundContext(round=1, rounds=2, seed=0)
    limit = 256 + m.mask_limits(state, ctx).meta_bytes + m.wire.head_meta_bytes
    meta = ('{"n":5,"x":[' + ",".join(["[]"] * ((limit - 13) // 3)) + "]}").encode()
    assert limit - 3 <= len(meta) <= limit
    budget = decode_budget(m.n + sum(int(np.prod(s)) for s in m.head_shapes.values()))
    peak, err = traced_peak(lambda: m.decode_update(reframe(m.uplink_kind.encode(), meta, b""), 2, state, ctx))
    assert isinstance(err, PayloadError) and 0 < peak <= budget, (peak, budget, err)


def context_upload(m, ones, words: bytes = b"") -> bytes:
    """A mask upload whose context code states per-context flip counts ``ones`` (then ``words``)."""
    from fedsqueeze.codecs import frame
    from fedsqueeze.codecs.sideinfo import pack_counts

    state, ctx = m.init_server(), RoundContext(round=1, rounds=2, seed=0)
    body = pack_counts(np.asarray(ones), context_sizes(m.server_contexts(state, ctx, 2))) + words
    head_meta, head_body = m.wire.encode_head(hand_head(m, 0))
    meta = {"n": 5, "mask": {"coder": "context"}, "head": head_meta, "sections": [len(body), len(head_body)]}
    return frame(m.uplink_kind, meta, body + head_body)


@pytest.mark.parametrize("stratify", [False, True])
def test_context_decoding_is_chunked_and_bit_exact(task, stratify):
    """The server rebuilds the uniforms and contexts chunk by chunk: the same values as one draw, and
    a flip code decodes to exactly its flips, whatever the piece size (several pieces per context)."""
    m = build("fedpm", task, stratify=stratify)
    state, ctx = m.init_server(), RoundContext(round=1, rounds=2, seed=0)
    stratum = m.stratum(ctx, 2) if stratify else None
    u = m.uniforms(ctx, 2, stratum)
    np.testing.assert_array_equal(np.concatenate(list(m.uniform_chunks(ctx, 2, stratum, 1000))), u)
    theta_start = m.start_theta(m.theta_of(state["theta_sym"], state["levels"]))
    contexts = flip_contexts(u, theta_start)
    np.testing.assert_array_equal(m.server_contexts(state, ctx, 2), contexts)
    flips = np.random.default_rng(3).random(m.n) < np.where(np.abs(u - theta_start) < 0.05, 0.3, 0.002)
    meta, body = encode_flips(flips, contexts)
    sizes = context_sizes(contexts)
    ones, start = unpack_counts(body, sizes)
    for piece in (7, 1000, m.n):
        ranks = decode_grouped_ranks(ones, sizes.tolist(), body[start:], piece, np.int32)
        want = np.concatenate([np.flatnonzero(flips[contexts == c]) for c in range(NUM_CONTEXTS)])
        np.testing.assert_array_equal(ranks, want)
    positions, bound = decode_flips_counted(meta, body, contexts, max_flips=m.n)
    np.testing.assert_array_equal(positions, np.flatnonzero(flips))
    assert positions.dtype == np.int32 and bound == flip_bound_bits(flips, contexts)


def test_hostile_context_codes_are_refused_or_decoded_within_budget(task):
    """fedpm's cap on flips is n itself: a code claiming every position flipped (an empty ANS stream)
    decodes, to every position, within budget; oversized counts, a stream longer than the counts
    allow, one that decodes to other counts, a truncated or wrong-kind frame are refused within it."""
    m = build("fedpm", task)
    state, ctx = m.init_server(), RoundContext(round=1, rounds=2, seed=0)
    sizes = context_sizes(m.server_contexts(state, ctx, 2))
    budget = decode_budget(m.n + sum(int(np.prod(s)) for s in m.head_shapes.values()))
    full = context_upload(m, sizes)
    peak, err = traced_peak(lambda: m.decode_update(full, 2, state, ctx))
    assert err is None and 0 < peak <= budget, (peak, budget, err)
    np.testing.assert_array_equal(m.decode_update(full, 2, state, ctx).mask.positions, np.arange(m.n))
    big = int(np.argmax(sizes))
    over = sizes.copy()
    over[big] += 1
    half = np.zeros_like(sizes)
    half[big] = sizes[big] // 2
    longer = grouped_bits_cap(bernoulli_bits(half, sizes), 1) + 4  # one word past what the counts can need
    cases = [
        (context_upload(m, over), "context of"),
        (context_upload(m, half, b"\x01\x00\x00\x00" * (longer // 4)), "longer than its counts"),
        (context_upload(m, half, b"\x01\x00\x00\x00" * 4), "decodes a group to other than"),
        (full[:-9], "checksum|truncated|length"),
        (context_upload(build("deltamask", task), sizes), "kind|expected"),
    ]
    for data, match in cases:
        peak, err = traced_peak(lambda data=data: m.decode_update(data, 2, state, ctx))
        assert isinstance(err, PayloadError) and 0 < peak <= budget, (match, peak, budget, err)
        with pytest.raises(PayloadError, match=match):
            m.decode_update(data, 2, state, ctx)


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


def npy(shape, descr="|u1", data=b"", version=(1, 0)) -> bytes:
    """A ``.npy`` buffer with any header (numpy's own header writer) followed by ``data``."""
    import io

    from numpy.lib import format as npy_format

    buf = io.BytesIO()
    write = npy_format.write_array_header_1_0 if version == (1, 0) else npy_format.write_array_header_2_0
    write(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    head = bytearray(buf.getvalue())
    head[6:8] = bytes(version)  # the magic's version bytes (3.0: a version this reader refuses)
    return bytes(head) + data


def test_flower_payload_array_allocates_only_what_it_carries():
    """A Flower reply's payload record: its .npy header may not make the server allocate what it claims
    (np.load allocated 1 GiB for a 131-byte buffer claiming 2^30 bytes); honest buffers read back exactly."""
    from flwr.app import Array, ArrayRecord, RecordDict

    from fedsqueeze.runtime.flower_wire import PAYLOAD, bytes_record, npy_bytes, record_bytes

    data = bytes(range(256)) * 40
    assert npy_bytes(npy((len(data),), data=data)) == data == npy_bytes(npy((len(data),), data=data, version=(2, 0)))
    assert record_bytes(RecordDict({PAYLOAD: bytes_record(data)})) == data
    cases = [
        npy((1 << 30,), data=b"abc"),  # the header claims far more than the buffer holds
        npy((1 << 62,)),
        npy((len(data) + 1,), data=data),
        npy((len(data) - 1,), data=data),
        npy((len(data) // 4,), "<f4", data),  # another dtype
        npy((2, len(data) // 2), data=data),  # two dimensions
        npy((len(data),), data=data, version=(3, 0)),
        npy((len(data),), data=data)[:9],  # a truncated header
        b"not npy" + data,
    ]
    for bad in cases:
        peak, err = traced_peak(lambda bad=bad: npy_bytes(bad))
        assert isinstance(err, PayloadError) and peak <= decode_budget(len(data)), (bad[:60], peak, err)
        record = ArrayRecord({"bytes": Array(dtype="uint8", shape=(len(data),), stype="numpy.ndarray", data=bad)})
        with pytest.raises(PayloadError, match="malformed|does not match"):
            record_bytes(RecordDict({PAYLOAD: record}))
    other = ArrayRecord({"bytes": Array(dtype="uint8", shape=(3,), stype="pickle", data=b"abc")})
    with pytest.raises(PayloadError, match="serialisation type"):
        record_bytes(RecordDict({PAYLOAD: other}))


@pytest.mark.parametrize(
    "name, options, up_bytes",
    [("fedkseed", {"pool_size": 16}, lambda k: 4 * k), ("feedsign", {}, lambda k: (k + 7) // 8)],
    ids=["fedkseed", "feedsign"],
)
def test_seed_zo_decode_update_peak_memory(task, name, options, up_bytes):
    """FedKSeed's and FeedSign's zeroth-order uplinks (compact frames of K scalars or K sign bits):
    honest, a checksummed 200 KB body, truncated and another kind all stay within 2 x float32 of K."""
    from fedsqueeze.methods.zo_wire import compact_frame

    m = build(name, task, params="head", warm_start_rounds=1, warm_start_steps=1, **options)
    state, zo = m.init_server(), RoundContext(round=2, rounds=4, seed=0)
    kind = f"{name}-up"
    up = compact_frame(kind, 2, [], bytes(up_bytes(m.k)))
    payloads = [up, compact_frame(kind, 2, [], bytes(200_000)), up[:-5], compact_frame(f"{name}-down", 2, [], up)]
    budget = decode_budget(m.k)
    for i, data in enumerate(payloads):
        peak, err = traced_peak(lambda data=data: m.decode_update(data, 0, state, zo))
        assert (err is None) == (i == 0) and (err is None or isinstance(err, PayloadError)), (i, err)
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
