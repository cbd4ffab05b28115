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
