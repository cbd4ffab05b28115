"""Coverage-guided fuzzing of every payload decoder with atheris (optional; not part of `make test`).

    pip install atheris==3.0.0
    PYTHONPATH=src python fuzz/fuzz_decoders.py --write-seeds /tmp/fsqz-corpus   # valid payloads to start from
    PYTHONPATH=src python fuzz/fuzz_decoders.py /tmp/fsqz-corpus -runs=200000 -max_len=4096

The first input byte picks a decoder, the second whether the rest is sent as-is or wrapped in a
frame with a *correct* checksum (so the fuzzer reaches past the CRC into JSON headers and codec bodies). Any
exception other than PayloadError is a crash that libFuzzer reports with the input that caused it.
Every registered codec is included, so codecs added later are fuzzed without changes here.
"""

from __future__ import annotations

import struct
import sys
import zlib

import atheris

with atheris.instrument_imports(include=["fedsqueeze.codecs", "fedsqueeze.treeio", "fedsqueeze.runtime.checkpoint", "json"]):
    import numpy as np

    from fedsqueeze.codecs import CODECS, CodecContext, decode_tensors, unframe
    from fedsqueeze.codecs.framing import FORMAT_VERSION, MAGIC
    from fedsqueeze.errors import PayloadError
    from fedsqueeze.runtime.checkpoint import decode_checkpoint
    from fedsqueeze.treeio import unpack_tree

CAP = 4096  # the element cap a server would derive from its model size


def _codec_decoder(codec_id: str):
    def decode(data: bytes) -> object:
        kind, meta, body = unframe(data)
        config = meta.get("config", {})
        if kind != codec_id or not isinstance(config, dict):
            raise PayloadError("not this codec's frame")
        try:
            codec = CODECS[codec_id].from_config(config)
        except Exception as exc:  # building from a hostile config is guarded by decode_tensors
            raise PayloadError(str(exc)) from exc
        return codec.decode(meta, body, CodecContext(seed=7, max_elements=CAP))

    return decode


DECODERS = [
    ("unframe", unframe),
    ("decode_tensors", lambda d: decode_tensors(d, CodecContext(seed=7, max_elements=CAP))),
    ("unpack_tree", lambda d: unpack_tree(d, max_elements=CAP)),
    ("checkpoint", decode_checkpoint),
    *[(f"{cid}.decode", _codec_decoder(cid)) for cid in sorted(CODECS)],
]


def _frame(kind: bytes, meta: bytes, body: bytes) -> bytes:
    head = struct.pack("<4sBH", MAGIC, FORMAT_VERSION, len(kind)) + kind + struct.pack("<I", len(meta)) + meta
    head += struct.pack("<Q", len(body))
    return head + body + struct.pack("<I", zlib.crc32(body, zlib.crc32(head)))


def split_input(data: bytes) -> tuple[int, bytes]:
    """Input layout: decoder byte, mode byte, then either the payload as-is (mode even) or
    ``u16 meta length, meta, body`` wrapped in a frame with a valid checksum (mode odd; kind from
    the mode byte's upper bits)."""
    if len(data) < 2:
        return 0, data
    which, mode, rest = data[0] % len(DECODERS), data[1], data[2:]
    if mode % 2 == 0 or len(rest) < 2:
        return which, rest
    kinds = [b"raw", b"tree", *[c.encode() for c in sorted(CODECS)]]
    kind = kinds[(mode >> 1) % len(kinds)]
    meta_len = min(int.from_bytes(rest[:2], "little"), len(rest) - 2)
    return which, _frame(kind, rest[2 : 2 + meta_len], rest[2 + meta_len :])


def seed_inputs() -> list[bytes]:
    """Valid payloads for every decoder, in the input layout above: a corpus to start from."""
    from fedsqueeze.codecs import encode_tensors, get_codec
    from fedsqueeze.runtime.checkpoint import encode_checkpoint
    from fedsqueeze.treeio import pack_tree

    tensors = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(3, np.float32)}
    payloads = [pack_tree({"weights": tensors, "n": [1, 2.5, None, "x"]}),
                encode_checkpoint(config={"seed": 0}, round_=1, server_state={"weights": tensors},
                                  client_states={0: None}, rounds=[{"round": 1}])]
    for cid in sorted(CODECS):
        try:
            payloads.append(encode_tensors(get_codec(cid), tensors, CodecContext(seed=7), n=3))
        except Exception:  # a codec that needs options gets no seed; the fuzzer still reaches it
            continue
    seeds = []
    for i in range(len(DECODERS)):
        for p in payloads:
            seeds.append(bytes([i, 0]) + p)
            _, meta, body = unframe(p)
            kind_index = ([b"raw", b"tree", *[c.encode() for c in sorted(CODECS)]]).index(unframe(p)[0].encode())
            import json

            meta_b = json.dumps(meta).encode()
            seeds.append(bytes([i, 1 | (kind_index << 1)]) + len(meta_b).to_bytes(2, "little") + meta_b + bytes(body))
    return seeds


def test_one_input(data: bytes) -> None:
    which, payload = split_input(data)
    try:
        DECODERS[which][1](payload)
    except PayloadError:
        pass


def main() -> None:
    np.seterr(all="ignore")
    if len(sys.argv) == 3 and sys.argv[1] == "--write-seeds":
        from pathlib import Path

        out = Path(sys.argv[2])
        out.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(seed_inputs()):
            (out / f"seed-{i:03d}").write_bytes(seed)
        return
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
