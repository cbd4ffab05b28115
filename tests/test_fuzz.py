"""Fuzz every decoder: only PayloadError may escape (bounded examples; FUZZ_EXAMPLES raises the bound).

A codec registered later is fuzzed automatically with its default options (``test_every_codec``);
a decoder that needs options or another payload plugs in with one ``fuzz_codec``/``fuzz_decoder`` line.
"""

import numpy as np
import pytest

from fedsqueeze.codecs import CODECS, CodecContext, decode_tensors, encode_tensors, get_codec, unframe
from fedsqueeze.errors import ConfigError, PayloadError
from fedsqueeze.runtime.checkpoint import decode_checkpoint, encode_checkpoint
from fedsqueeze.treeio import pack_tree, unpack_tree

from fuzzing import REJECTED, TRIED, fuzz_codec, fuzz_decoder, reframe


def sample_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "layer.weight": rng.standard_normal((6, 5)).astype(np.float32),
        "layer.bias": rng.standard_normal(5).astype(np.float32),
        "head.weight": (rng.standard_normal((3, 6)) * 1e-3).astype(np.float32),
    }


def _default_codec(cid):
    try:
        return get_codec(cid)
    except ConfigError:
        return None


@pytest.mark.parametrize("codec_id", sorted(CODECS))
def test_every_codec(codec_id):
    codec = _default_codec(codec_id)
    if codec is None:
        pytest.skip(f"codec {codec_id!r} needs options: add a fuzz_codec line for it")
    try:  # a codec for other inputs (masks, scalars...) gets its own fuzz_codec line
        encode_tensors(codec, sample_tensors(), CodecContext(seed=7), n=3)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"codec {codec_id!r} does not encode float tensors with default options ({exc})")
    fuzz_codec(codec_id, sample_tensors())


def test_unframe():
    fuzz_decoder("unframe", unframe, reframe(b"raw", b'{"a":[1,2],"b":{"c":null}}', b"body bytes"))


def test_unpack_tree():
    tree = {"weights": sample_tensors(), "round": 3, "priors": [np.ones(4), (1.5, "x")], 7: None, "f": float("inf")}
    payload = pack_tree(tree)
    fuzz_decoder("unpack_tree", lambda d: unpack_tree(d, max_elements=100), payload)


def test_checkpoint_decoder():
    payload = encode_checkpoint(
        config={"method": "fedavg", "rounds": 4}, round_=1, server_state={"weights": sample_tensors()},
        client_states={0: None, 3: {"residual": np.zeros(3, np.float32)}}, rounds=[{"round": 1, "accuracy": 0.5}],
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
