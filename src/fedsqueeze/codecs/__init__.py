"""Codecs: named tensors to bytes and back. Importing this package registers every codec."""

from fedsqueeze.codecs import eden, fp16, qsgd, sign, sz3, topk, zstd  # noqa: F401  (registration)
from fedsqueeze.codecs.base import (
    CODECS,
    Codec,
    CodecContext,
    RawCodec,
    decode_tensors,
    encode_tensors,
    expect_tensors,
    get_codec,
    register_codec,
)
from fedsqueeze.codecs.framing import frame, unframe
from fedsqueeze.plugins import CODEC_GROUP, load_group

__all__ = [
    "CODECS",
    "Codec",
    "CodecContext",
    "RawCodec",
    "decode_tensors",
    "encode_tensors",
    "expect_tensors",
    "frame",
    "get_codec",
    "register_codec",
    "unframe",
]

# third-party codecs (entry point group "fedsqueeze.codecs"), after the built-in ones so none is replaced
load_group(CODEC_GROUP, CODECS, Codec, "codec_id")
