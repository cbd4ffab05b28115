import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsqueeze.codecs import CodecContext, decode_tensors, encode_tensors, frame, get_codec, unframe
from fedsqueeze.errors import ConfigError, PayloadError


def test_frame_roundtrip():
    data = frame("raw", {"a": 1, "b": [1, 2]}, b"hello")
    kind, meta, body = unframe(data)
    assert kind == "raw" and meta == {"a": 1, "b": [1, 2]} and bytes(body) == b"hello"


def test_raw_roundtrip_preserves_dtype_and_shape():
    tensors = {
        "w": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32),
        "count": np.array([1, 2, 3], dtype=np.int64),
        "scalar": np.array(2.5, dtype=np.float64),
        "empty": np.zeros((0, 5), dtype=np.float16),
    }
    data = encode_tensors(get_codec("raw"), tensors, n=7)
    out, extra = decode_tensors(data)
    assert extra == {"n": 7}
    assert list(out) == list(tensors)
    for k, v in tensors.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape
        np.testing.assert_array_equal(out[k], v)


def test_every_truncation_is_rejected():
    data = encode_tensors(get_codec("raw"), {"w": np.arange(10, dtype=np.float32)})
    for cut in range(len(data)):
        with pytest.raises(PayloadError):
            decode_tensors(data[:cut])


def test_bit_flips_are_rejected():
    data = bytearray(encode_tensors(get_codec("raw"), {"w": np.arange(10, dtype=np.float32)}))
    for pos in range(0, len(data), 3):
        bad = bytearray(data)
        bad[pos] ^= 0x40
        with pytest.raises(PayloadError):
            decode_tensors(bytes(bad))


def test_element_cap_rejects_before_allocating():
    data = encode_tensors(get_codec("raw"), {"w": np.zeros(100, dtype=np.float32)})
    with pytest.raises(PayloadError, match="cap"):
        decode_tensors(data, CodecContext(max_elements=99))


def test_unknown_codec_is_config_error():
    with pytest.raises(ConfigError, match="raw"):
        get_codec("nosuch")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_payload_error(blob):
    with pytest.raises(PayloadError):
        decode_tensors(blob)


# ---- header caps: what a receiver that knows its tensors lets a header hold ------------------------
def test_json_values_upper_bound_counts_separators_and_brackets():
    from fedsqueeze.codecs.framing import json_values_upper_bound

    # 1 + one comma + one colon + one '[' + one '{' (the values: the object, the list, 1 and 2)
    assert json_values_upper_bound(b'{"a":[1,2]}') == 5
    assert json_values_upper_bound(b"[[],[],[]]") == 1 + 2 + 4
    assert json_values_upper_bound(b"7") == 1


def test_meta_caps_follow_the_expected_tensors_exactly():
    from fedsqueeze.codecs.base import expect_tensors, meta_bound, meta_values_bound

    expect = expect_tensors({"w": (3, 4), "bias": (4,)})
    # 512 + 2 * (len(name) + len("float32") + 8 * (dims + 1) + 40) per tensor
    assert meta_bound(expect) == 512 + 2 * (1 + 7 + 24 + 40) + 2 * (4 + 7 + 16 + 40)
    # 64 + (16 + dims) per tensor
    assert meta_values_bound(expect) == 64 + (16 + 2) + (16 + 1)


def test_unframe_refuses_a_header_with_more_values_than_expected_before_parsing():
    data = frame("raw", {"x": [0] * 100}, b"")
    # 1 + 99 commas + 1 colon + 1 '[' + 1 '{' = 103
    with pytest.raises(PayloadError, match="more JSON values"):
        unframe(data, max_meta_values=102)
    assert unframe(data, max_meta_values=103)[1] == {"x": [0] * 100}


@pytest.mark.parametrize("codec_id", ["raw", "fp16", "zstd", "qsgd", "sign", "topk", "eden", "sz3"])
def test_every_codecs_honest_header_uses_at_most_half_of_either_cap(codec_id):
    """The caps must never refuse an honest payload: one tensor, many long-named ones, 4-d ones."""
    from fedsqueeze.codecs.base import expect_tensors, meta_bound, meta_values_bound
    from fedsqueeze.codecs.framing import json_values_upper_bound

    rng = np.random.default_rng(0)
    cases = [
        {"w": (3,)},
        {"head.weight": (26, 384), "head.bias": (26,)},
        {f"encoder.layer.{i}.attention.self.{k}.weight": (64, 64) for i in range(6) for k in ("query", "key", "value")},
        {f"b{i}": (4,) for i in range(20)},
        {"conv": (8, 3, 3, 3)},
    ]
    for shapes in cases:
        tensors = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
        data = encode_tensors(get_codec(codec_id), tensors, n=5, round=3)
        meta_len = int.from_bytes(data[7 + len(codec_id) : 11 + len(codec_id)], "little")
        kind, meta, _ = unframe(data)
        text = bytes(data[11 + len(codec_id) : 11 + len(codec_id) + meta_len])
        assert kind == codec_id and len(text) == meta_len
        expect = expect_tensors(shapes)
        assert meta_len <= meta_bound(expect) / 2, (shapes, meta_len)
        assert json_values_upper_bound(text) <= meta_values_bound(expect) / 2, (shapes, text[:200])


# ---- what unframe reads before it refuses -------------------------------------------------------


def _reframed(kind: bytes, meta: bytes, body: bytes = b"") -> bytes:
    """A frame with these raw fields and a correct checksum (its header need not be JSON)."""
    import struct
    import zlib

    head = b"FSQZ\x01" + struct.pack("<H", len(kind)) + kind + struct.pack("<I", len(meta)) + meta + struct.pack("<Q", len(body)) + body
    return head + struct.pack("<I", zlib.crc32(head))


def test_a_frame_of_another_kind_is_refused_before_its_header_is_parsed():
    # the header is not even JSON: the refusal names the kind, so nothing of the header was parsed
    data = _reframed(b"qsgd", b"[[[[ not json")
    with pytest.raises(PayloadError, match=r"payload kind 'qsgd' where \['raw'\] was expected"):
        unframe(data, expect_kind="raw")
    with pytest.raises(PayloadError, match="not valid JSON"):
        unframe(data, expect_kind={"raw", "qsgd"})


def test_a_header_that_is_not_utf8_is_refused_after_the_checksum():
    data = _reframed(b"raw", b'{"a": "\xff"}')
    with pytest.raises(PayloadError, match="not valid JSON: UnicodeDecodeError"):
        unframe(data)
    damaged = data[:-1] + bytes([data[-1] ^ 1])
    with pytest.raises(PayloadError, match="checksum mismatch"):
        unframe(damaged)
    # UTF-8 beyond ASCII is read as it was written
    assert unframe(_reframed(b"raw", '{"é": "ü"}'.encode()))[1] == {"é": "ü"}


def test_json_values_upper_bound_counts_text_and_bytes_alike():
    from fedsqueeze.codecs.framing import json_values_upper_bound

    assert json_values_upper_bound('{"a":[1,2]}') == json_values_upper_bound(b'{"a":[1,2]}') == 5
    assert json_values_upper_bound('["é,", {}]') == 1 + 2 + 2  # a comma inside a string only overcounts
