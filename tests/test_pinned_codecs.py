"""Pinned codecs: the decoded value of every codec recomputed independently on small hand-made tensors,
and every byte count checked against our own parse of the frame (codecs/framing.py layout)."""

from __future__ import annotations

import json
import math
import struct
import zlib

import numpy as np
import pytest
import torch
import zstandard

from fedsqueeze.codecs import CodecContext, decode_tensors, encode_tensors, frame, get_codec, unframe
from fedsqueeze.codecs.ans import decode_grouped_bits, decode_symbols, encode_grouped_bits, encode_symbols
from fedsqueeze.codecs.fusefilter import build_filter, contain_c, parse_filter, query_keys, query_universe
from fedsqueeze.codecs.positions import decode_positions, encode_positions, entropy_bound_bits
from fedsqueeze.errors import PayloadError


def parse(data: bytes):
    """Our reading of a frame: magic, u8 version, u16 kind, u32 meta, u64 body, u32 crc (little endian)."""
    assert data[:4] == b"FSQZ" and data[4] == 1
    (kl,) = struct.unpack_from("<H", data, 5)
    kind = data[7 : 7 + kl].decode("ascii")
    pos = 7 + kl
    (ml,) = struct.unpack_from("<I", data, pos)
    meta = json.loads(data[pos + 4 : pos + 4 + ml])
    pos += 4 + ml
    (bl,) = struct.unpack_from("<Q", data, pos)
    body = data[pos + 8 : pos + 8 + bl]
    pos += 8 + bl
    assert len(data) == pos + 4, "the frame's lengths add up to its size"
    assert struct.unpack_from("<I", data, pos)[0] == zlib.crc32(data[:pos])
    return kind, meta, body


def hand(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "a.weight": rng.standard_normal((5, 7)).astype(np.float32),
        "b.bias": rng.standard_normal(3).astype(np.float32),
        "c.count": np.array([1, -2, 2**40], np.int64),
    }


def lengths(meta):
    return meta["lengths"]


# ---- framing ------------------------------------------------------------------------------------


def test_frame_layout_and_checks():
    body = bytes(range(50))
    data = frame("xy", {"k": [1, 2]}, body)
    kind, meta, got = parse(data)
    assert (kind, meta, got) == ("xy", {"k": [1, 2]}, body)
    assert len(data) == 4 + 1 + 2 + 2 + 4 + len(b'{"k":[1,2]}') + 8 + 50 + 4
    k2, m2, b2 = unframe(data)
    assert (k2, m2, bytes(b2)) == ("xy", {"k": [1, 2]}, body)
    bad = bytearray(data)
    bad[20] ^= 1
    with pytest.raises(PayloadError, match="checksum"):
        unframe(bytes(bad))
    with pytest.raises(PayloadError, match="magic"):
        unframe(b"XSQZ" + data[4:])
    with pytest.raises(PayloadError, match="version"):
        unframe(data[:4] + b"\x02" + data[5:])
    with pytest.raises(PayloadError, match="kind"):
        unframe(data, expect_kind="raw")
    with pytest.raises(PayloadError, match="cap"):
        unframe(data, max_body_bytes=49)
    assert bytes(unframe(data, max_body_bytes=50)[2]) == body
    with pytest.raises(PayloadError):
        unframe(data[:-1])
    with pytest.raises(PayloadError, match="short"):
        unframe(data[:20])
    # the smallest frame (empty kind, meta {}, empty body) is 25 bytes and decodes
    assert unframe(frame("", {}, b""))[1] == {} and len(frame("", {}, b"")) == 4 + 1 + 2 + 4 + 2 + 8 + 4


def reframed(kind: bytes, meta: bytes, body: bytes, *, meta_len=None, body_len=None, tail=b"") -> bytes:
    """A frame built by hand (lengths may lie), with a correct checksum over what precedes it."""
    head = b"FSQZ\x01" + struct.pack("<H", len(kind)) + kind + struct.pack("<I", len(meta) if meta_len is None else meta_len)
    head += meta + struct.pack("<Q", len(body) if body_len is None else body_len) + body
    return head + struct.pack("<I", zlib.crc32(head)) + tail


def test_frame_boundaries_each_fail_with_their_own_reason():
    assert len(reframed(b"", b"", b"")) == 23  # the smallest frame: its meta is empty, not JSON
    with pytest.raises(PayloadError, match="not valid JSON: JSONDecodeError"):
        unframe(reframed(b"", b"", b""))
    with pytest.raises(PayloadError, match=r"too short to be a frame \(22 bytes\)"):
        unframe(reframed(b"", b"", b"")[:22])
    # the kind field runs to exactly where the meta length ends: the kind fits, the meta does not
    exact = b"FSQZ\x01" + struct.pack("<H", 12) + b"k" * 12 + struct.pack("<I", 0)
    assert len(exact) == 23
    with pytest.raises(PayloadError, match="meta length 0 does not fit the 23-byte payload"):
        unframe(exact)
    with pytest.raises(PayloadError, match="truncated in its kind field"):
        unframe(b"FSQZ\x01" + struct.pack("<H", 16) + b"k" * 16)
    with pytest.raises(PayloadError, match="kind is not ASCII"):
        unframe(reframed(b"\xff", b"{}", b""))
    # the meta ends exactly where the body length field ends: no room for the checksum
    cut = b"FSQZ\x01" + struct.pack("<H", 1) + b"k" + struct.pack("<I", 4) + b"{}  " + struct.pack("<Q", 0)
    with pytest.raises(PayloadError, match=r"body length 0 disagrees with the payload size \(-4 bytes present\)"):
        unframe(cut)
    with pytest.raises(PayloadError, match=r"body length 5 disagrees with the payload size \(3 bytes present\)"):
        unframe(reframed(b"k", b"{}", b"abc", body_len=5))
    with pytest.raises(PayloadError, match="meta length 4294967280 does not fit"):
        unframe(reframed(b"k", b"{}", b"", meta_len=0xFFFFFFF0))
    with pytest.raises(PayloadError, match="not a JSON object"):
        unframe(reframed(b"k", b"[1]", b""))
    with pytest.raises(PayloadError, match="checksum"):
        unframe(reframed(b"k", b"{}", b"")[:-1] + b"\0")


def test_meta_size_limit_is_inclusive():
    from fedsqueeze.codecs.framing import MAX_META_BYTES

    biggest = {"s": "x" * (MAX_META_BYTES - len('{"s":""}'))}
    data = frame("k", biggest, b"")
    assert unframe(data)[1] == biggest  # exactly 1 MiB of meta is allowed, one byte more is not
    with pytest.raises(ValueError, match="more than"):
        frame("k", {"s": biggest["s"] + "x"}, b"")
    raw = json.dumps({"s": biggest["s"] + "x"}, separators=(",", ":")).encode()
    with pytest.raises(PayloadError, match="meta length"):
        unframe(reframed(b"k", raw, b""))
    with pytest.raises(ValueError):
        frame("k", {"a": float("nan")}, b"")  # the header is strict JSON


def test_expected_kinds():
    data = frame("ra", {}, b"")
    with pytest.raises(PayloadError, match="kind 'ra'"):
        unframe(data, expect_kind="raw")  # a name, not a substring
    assert unframe(data, expect_kind={"raw", "ra"})[0] == "ra"
    with pytest.raises(PayloadError, match="kind 'ra'"):
        unframe(data, expect_kind={"raw", "zstd"})


# ---- lossless codecs ----------------------------------------------------------------------------


def test_raw_body_is_the_little_endian_bytes():
    t = hand()
    data = encode_tensors(get_codec("raw"), t, n=3)
    kind, meta, body = parse(data)
    assert kind == "raw" and meta["extra"] == {"n": 3}
    assert meta["tensors"] == [["a.weight", "float32", [5, 7]], ["b.bias", "float32", [3]], ["c.count", "int64", [3]]]
    assert body == t["a.weight"].tobytes() + t["b.bias"].tobytes() + t["c.count"].astype("<i8").tobytes()
    out, extra = decode_tensors(data)
    assert extra == {"n": 3} and all(np.array_equal(out[n], t[n]) and out[n].dtype == t[n].dtype for n in t)


def test_raw_refuses_a_body_of_the_wrong_size():
    data = encode_tensors(get_codec("raw"), hand())
    _, meta, body = parse(data)
    with pytest.raises(PayloadError, match="raw body"):
        decode_tensors(frame("raw", meta, body[:-1]))
    with pytest.raises(PayloadError, match="cap"):
        decode_tensors(data, CodecContext(max_elements=35 + 3 + 2))
    assert decode_tensors(data, CodecContext(max_elements=35 + 3 + 3))[0]["b.bias"].shape == (3,)


@pytest.mark.parametrize("shuffle", [True, False])
def test_zstd_body_is_the_byte_shuffled_tensors(shuffle):
    t = hand()
    data = encode_tensors(get_codec("zstd", shuffle=shuffle), t)
    _, meta, body = parse(data)
    plain = zstandard.ZstdDecompressor().decompress(body)

    def shuffled(a):  # byte j of every element, then byte j + 1...
        b = np.frombuffer(a.astype(a.dtype.newbyteorder("<")).tobytes(), np.uint8).reshape(-1, a.dtype.itemsize)
        return b.T.tobytes() if shuffle else b.tobytes()

    assert plain == b"".join(shuffled(a) for a in t.values()) and meta["shuffle"] is shuffle
    out, _ = decode_tensors(data)
    assert all(np.array_equal(out[n], t[n]) and out[n].dtype == t[n].dtype for n in t)


# ---- fp16 ---------------------------------------------------------------------------------------


def test_fp16_is_round_to_nearest_half_with_clipping():
    x = np.array([0.0, 1.0, 1 + 2**-11, 1 + 3 * 2**-11, -2.5e-8, 70000.0, -1e9, 65504.0, 1e-3], np.float32)
    t = {"x": x, "d": x.astype(np.float64)[:4], "i": np.array([7, 8], np.int32)}
    data = encode_tensors(get_codec("fp16"), t)
    _, meta, body = parse(data)
    half = np.clip(x, -65504, 65504).astype(np.float16)
    assert lengths(meta) == [2 * (9 + 4), 8] and body[:18] == half.tobytes()
    out, _ = decode_tensors(data)
    np.testing.assert_array_equal(out["x"], half.astype(np.float32))
    assert out["x"][5] == 65504 and out["x"][6] == -65504 and out["x"][2] == 1.0 and out["x"][3] == 1 + 4 * 2**-11
    assert out["d"].dtype == np.float64 and np.array_equal(out["d"], half[:4].astype(np.float64))
    assert np.array_equal(out["i"], t["i"]) and out["i"].dtype == np.int32


# ---- qsgd ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels, bucket", [(4, 8), (1, 5), (200, 16)])
def test_qsgd_levels_recomputed(levels, bucket):
    t = hand(1)
    t["z"] = np.zeros(6, np.float32)  # a zero bucket norm decodes to zeros
    codec = get_codec("qsgd", levels=levels, bucket=bucket)
    data = encode_tensors(codec, t, CodecContext(seed=42))
    out, _ = decode_tensors(data)
    rng = np.random.default_rng(42)
    for name in ("a.weight", "b.bias", "z"):
        flat = t[name].reshape(-1).astype(np.float64)
        nb = -(-flat.size // bucket)
        v = np.zeros(nb * bucket)
        v[: flat.size] = flat
        v = v.reshape(nb, bucket)
        u = rng.random((nb, bucket), dtype=np.float32).astype(np.float64)
        r = np.sqrt((v**2).sum(axis=1))
        level = np.minimum(np.floor(np.abs(v) / np.where(r > 0, r, 1)[:, None] * levels + u), levels)
        expected = (np.sign(v) * level * (r.astype(np.float32).astype(np.float64) / levels)[:, None]).reshape(-1)[: flat.size]
        np.testing.assert_allclose(out[name].reshape(-1), expected, rtol=1e-5, atol=1e-6, err_msg=name)
        bound = np.repeat(r / levels, bucket)[: flat.size]
        assert np.all(np.abs(out[name].reshape(-1) - flat) <= bound * (1 + 1e-5) + 1e-7)
    assert np.array_equal(out["c.count"], t["c.count"])
    _, meta, body = parse(data)
    assert meta["levels"] == levels and meta["bucket"] == bucket and sum(lengths(meta)) == len(body)
    nbuckets = sum(-(-a.size // bucket) for k, a in t.items() if k != "c.count")
    width = 1 if levels <= 127 else 2
    raw = zstandard.ZstdDecompressor().decompress(body[: lengths(meta)[0]])
    assert len(raw) == 4 * nbuckets + width * bucket * nbuckets


def test_qsgd_is_unbiased_on_average():
    x = {"v": np.linspace(-1, 1, 64).astype(np.float32)}
    codec = get_codec("qsgd", levels=2, bucket=64)
    mean = np.mean([decode_tensors(encode_tensors(codec, x, CodecContext(seed=s)))[0]["v"] for s in range(400)], axis=0)
    r = float(np.linalg.norm(x["v"]))
    assert np.abs(mean - x["v"]).max() < 4 * (r / 2) / math.sqrt(400)


# ---- sign and top-k with error feedback ----------------------------------------------------------


def test_sign_scale_signs_and_error_feedback():
    codec = get_codec("sign")
    state: dict = {}
    x = hand(2)
    residual = {n: np.zeros(a.size) for n, a in x.items() if a.dtype == np.float32}
    for step in range(3):
        data = encode_tensors(codec, x, CodecContext(state=state))
        out, _ = decode_tensors(data)
        _, meta, body = parse(data)
        for n, res in residual.items():
            p = x[n].reshape(-1).astype(np.float64) + res
            scale = np.float32(np.abs(p).mean())
            dec = np.where(p >= 0, scale, -scale)
            np.testing.assert_allclose(out[n].reshape(-1), dec, rtol=1e-6, err_msg=f"{n} step {step}")
            residual[n] = p - dec
            np.testing.assert_allclose(state["ef:sign"][n], residual[n], rtol=1e-5, atol=1e-6)
        assert lengths(meta)[:2] == [4 * 2, math.ceil(35 / 8) + 1]
        assert np.array_equal(out["c.count"], x["c.count"])
    # zeros are positive (p >= 0), empty tensors travel exactly, and the scale is a float64 mean
    z = {
        "z": np.array([0.0, -1.0, 0.0, 2.0], np.float32),
        "e": np.zeros((0, 3), np.float32),
        "big": np.array([2.0**24] + [1.0] * 7, np.float32),
    }
    dz, _ = decode_tensors(encode_tensors(get_codec("sign", error_feedback=False), z))
    np.testing.assert_array_equal(dz["z"], np.float32([0.75, -0.75, 0.75, 0.75]))
    assert dz["e"].shape == (0, 3) and dz["big"][1] == np.float32((2.0**24 + 7) / 8)
    no_ef = get_codec("sign", error_feedback=False)
    st: dict = {}
    a = decode_tensors(encode_tensors(no_ef, x, CodecContext(state=st)))[0]
    b = decode_tensors(encode_tensors(no_ef, x, CodecContext(state=st)))[0]
    assert st == {} and all(np.array_equal(a[n], b[n]) for n in x)


@pytest.mark.parametrize("k", [0.1, 0.5, 1.0])
def test_topk_keeps_the_largest_and_feeds_back_the_rest(k):
    codec = get_codec("topk", k=k)
    state: dict = {}
    x = hand(3)
    residual = {n: np.zeros(a.size) for n, a in x.items() if a.dtype == np.float32}
    for step in range(2):
        data = encode_tensors(codec, x, CodecContext(state=state))
        out, _ = decode_tensors(data)
        _, meta, body = parse(data)
        for n, res in residual.items():
            p = x[n].reshape(-1).astype(np.float64) + res
            count = max(1, math.ceil(k * p.size))
            keep = np.argsort(-np.abs(p), kind="stable")[:count]
            dec = np.zeros_like(p)
            dec[keep] = p[keep]
            np.testing.assert_allclose(out[n].reshape(-1), dec, rtol=1e-6, atol=1e-7, err_msg=f"{n} step {step}")
            residual[n] = p - dec
            np.testing.assert_allclose(state["ef:topk"][n], residual[n], rtol=1e-5, atol=1e-6)
        assert meta["counts"] == [max(1, math.ceil(k * 35)), max(1, math.ceil(k * 3))]
        assert lengths(meta)[1] == 4 * sum(meta["counts"]) and sum(lengths(meta)) == len(body)


# ---- eden ---------------------------------------------------------------------------------------


def sylvester(n):
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / math.sqrt(n)


@pytest.mark.parametrize("chunk", [8, 16, 4096])
def test_eden_rotation_sign_and_scale_recomputed(chunk):
    t = hand(4)
    data = encode_tensors(get_codec("eden", chunk=chunk), t, CodecContext(seed=1234))
    out, _ = decode_tensors(data)
    _, meta, _ = parse(data)
    assert meta["seed"] == 1234 and meta["chunk"] == chunk
    gen = torch.Generator().manual_seed(1234)
    for name in ("a.weight", "b.bias"):
        flat = t[name].reshape(-1).astype(np.float64)
        c = min(chunk, 1 << max(3, (flat.size - 1).bit_length()))
        nb = -(-flat.size // c)
        x = np.zeros(nb * c)
        x[: flat.size] = flat
        x = x.reshape(nb, c)
        d = (torch.randint(0, 2, (nb * c,), generator=gen, dtype=torch.int8).double().numpy() * 2 - 1).reshape(nb, c)
        h = sylvester(c)
        r = (x * d) @ h
        scale = (x**2).sum(axis=1) / np.abs(r).sum(axis=1)
        xhat = ((np.where(r >= 0, 1.0, -1.0) * scale[:, None]) @ h) * d
        np.testing.assert_allclose(out[name].reshape(-1), xhat.reshape(-1)[: flat.size], rtol=1e-4, atol=1e-5, err_msg=name)
        # EDEN's scale makes the projection exact: <x, x̂> = ||x||² per chunk
        np.testing.assert_allclose((x * xhat).sum(axis=1), (x**2).sum(axis=1), rtol=1e-5)
    assert np.array_equal(out["c.count"], t["c.count"])


# ---- sz3 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, bound", [("abs", 1e-3), ("rel", 1e-2)])
def test_sz3_bound_partition_and_sparse_rows(mode, bound):
    rng = np.random.default_rng(5)
    sparse = np.zeros((40, 64), np.float32)
    sparse[[3, 17, 30]] = rng.standard_normal((3, 64))
    t = {
        "dense.weight": rng.standard_normal((40, 64)).astype(np.float32),
        "rows.weight": sparse,
        "small.weight": rng.standard_normal(10).astype(np.float32),
        "big.other": rng.standard_normal(2000).astype(np.float32),
    }
    codec = get_codec("sz3", mode=mode, bound=bound, name_filter="weight")
    data = encode_tensors(codec, t)
    out, _ = decode_tensors(data)
    _, meta, body = parse(data)
    assert [r[0] for r in meta["lossy"]] == ["dense.weight", "rows.weight"]  # > 1024 values and 'weight'
    assert [r[0] for r in meta["exact"]] == ["small.weight", "big.other"] and meta["rows"] == [0, 3]
    assert sum(lengths(meta)) == len(body) and lengths(meta)[3] == math.ceil(40 / 8)
    for n in ("small.weight", "big.other"):
        assert np.array_equal(out[n], t[n])
    for n in ("dense.weight", "rows.weight"):
        limit = bound if mode == "abs" else bound * float(t[n].max() - t[n].min())
        assert np.abs(out[n].astype(np.float64) - t[n]).max() <= limit * (1 + 1e-6)
    zero_rows = np.ones(40, bool)
    zero_rows[[3, 17, 30]] = False
    assert np.all(out["rows.weight"][zero_rows] == 0)


# ---- positions (rice, elias-fano) ----------------------------------------------------------------


def rice_bits(p, k):
    gaps = np.diff(np.concatenate([[-1], p])) - 1
    return int((gaps >> k).sum()) + p.size, p.size * k


@pytest.mark.parametrize(
    "positions, universe",
    [([0, 1, 2, 3], 4), ([5], 6), ([0, 9, 10, 500, 900, 999], 1000), (list(range(0, 100_000, 37)), 100_000), ([], 10)],
)
def test_rice_code_length_and_choice_of_k(positions, universe):
    p = np.array(positions, np.int64)
    meta, body = encode_positions(p, universe, "rice")
    assert np.array_equal(decode_positions(meta, body, universe).astype(np.int64), p)
    if p.size == 0:
        assert body == b"" and meta["n"] == 0
        return
    centre = max(0, int(math.log2(max((universe - p.size) / p.size, 1.0))))
    costs = {k: sum(rice_bits(p, k)) for k in range(max(0, centre - 2), centre + 3)}
    assert costs[meta["k"]] == min(costs.values())
    unary, low = rice_bits(p, meta["k"])
    assert meta["unary_bits"] == unary and len(body) == math.ceil(unary / 8) + math.ceil(low / 8)
    assert 8 * len(body) >= entropy_bound_bits(p.size, universe)


@pytest.mark.parametrize(
    "positions, universe", [([0, 1, 2, 3], 4), ([0, 9, 10, 500, 900, 999], 1000), (list(range(3, 50_000, 101)), 50_000)]
)
def test_elias_fano_code_length(positions, universe):
    p = np.array(positions, np.int64)
    meta, body = encode_positions(p, universe, "elias-fano")
    low = max(0, math.floor(math.log2(universe / p.size)))
    assert meta["l"] == low
    upper = p.size + (universe >> low) + 1
    assert len(body) == math.ceil(upper / 8) + math.ceil(p.size * low / 8)
    assert np.array_equal(decode_positions(meta, body, universe).astype(np.int64), p)


def test_position_codes_round_trip_at_every_bit_alignment():
    """Random sets whose bit streams end at every offset inside a byte: lengths and offsets must be exact."""
    rng = np.random.default_rng(11)
    seen = set()
    for _ in range(120):
        universe = int(rng.integers(2, 3000))
        n = int(rng.integers(1, min(universe, 200) + 1))
        p = np.sort(rng.choice(universe, size=n, replace=False))
        for coder in ("rice", "elias-fano"):
            meta, body = encode_positions(p, universe, coder)
            assert np.array_equal(decode_positions(meta, body, universe).astype(np.int64), p)
            with pytest.raises(PayloadError, match="body is|header needs|bad rice header"):
                decode_positions(meta, body + b"\0", universe)
        low = max(0, math.floor(math.log2(universe / n)))
        seen.add((n + (universe >> low) + 1) % 8)
    assert seen == set(range(8))
    meta, body = encode_positions(np.array([1, 5]), 8, "elias-fano")
    with pytest.raises(PayloadError, match="bad elias-fano low-bit count"):
        decode_positions({**meta, "l": 63}, body, 8)
    with pytest.raises(PayloadError, match="out of range or not increasing"):
        decode_positions({**meta, "universe": 5}, body, 8)
    with pytest.raises(PayloadError, match="upper bits hold"):
        decode_positions({**meta, "n": 1}, body, 8)  # same body length for n = 1, but two ones in it


def test_positions_name_the_bad_field():
    with pytest.raises(PayloadError, match="position set n -1 "):
        decode_positions({"coder": "rice", "n": -1, "universe": 4}, b"", 4)
    with pytest.raises(PayloadError, match="position set universe 9 "):
        decode_positions({"coder": "rice", "n": 1, "universe": 9}, b"", 8)


def test_positions_refuse_bad_input():
    with pytest.raises(ValueError):
        encode_positions(np.array([3, 2]), 10)
    with pytest.raises(ValueError):
        encode_positions(np.array([10]), 10)
    meta, body = encode_positions(np.array([1, 5, 7]), 8)
    with pytest.raises(PayloadError):
        decode_positions(meta, body, max_universe=7)
    with pytest.raises(PayloadError):
        decode_positions({**meta, "n": 9}, body, 8)
    with pytest.raises(PayloadError):
        decode_positions({**meta, "coder": "golomb"}, body, 8)
    assert entropy_bound_bits(2, 4) == pytest.approx(math.log2(6))
    assert entropy_bound_bits(0, 4) == 0 == entropy_bound_bits(4, 4)


# ---- ANS ----------------------------------------------------------------------------------------


def test_grouped_bits_round_trip_and_cost():
    rng = np.random.default_rng(6)
    groups = rng.integers(0, 4, 20_000)
    p = np.array([0.0, 1.0, 0.02, 0.5])[groups]  # group 0 all zeros, group 1 all ones: free
    bits = rng.random(groups.size) < p
    meta, body = encode_grouped_bits(bits, groups, 4)
    sizes = np.bincount(groups, minlength=4)
    ones = np.array([bits[groups == g].sum() for g in range(4)])
    assert meta["ones"] == ones.tolist() and ones[0] == 0 and ones[1] == sizes[1]
    assert np.array_equal(decode_grouped_bits(meta, body, groups, 4), bits)

    def h(q):
        return 0.0 if q in (0, 1) else -(q * math.log2(q) + (1 - q) * math.log2(1 - q))

    bound = sum(s * h(o / s) for o, s in zip(ones, sizes))
    assert bound <= 8 * len(body) <= bound + 64 + 0.01 * bound
    # all-zero and all-one groups cost nothing at all
    meta0, body0 = encode_grouped_bits(groups == 1, groups, 4)
    assert 8 * len(body0) <= 64 and np.array_equal(decode_grouped_bits(meta0, body0, groups, 4), groups == 1)
    with pytest.raises(PayloadError):
        decode_grouped_bits({"ones": [0, int(sizes[1]) + 1, 0, 0]}, body, groups, 4)


def test_symbols_round_trip_and_cost():
    rng = np.random.default_rng(7)
    sym = rng.choice(5, size=5000, p=[0.7, 0.1, 0.1, 0.05, 0.05])
    meta, body = encode_symbols(sym, 5)
    hist = np.bincount(sym, minlength=5)
    assert meta["hist"] == hist.tolist()
    assert np.array_equal(decode_symbols(meta, body, 5000, 5), sym)
    q = hist / hist.sum()
    bound = -(hist * np.log2(q)).sum()
    assert bound <= 8 * len(body) <= 1.01 * bound + 64
    one_meta, one_body = encode_symbols(np.full(10, 3), 5)
    assert np.array_equal(decode_symbols(one_meta, one_body, 10, 5), np.full(10, 3))
    with pytest.raises(PayloadError):
        decode_symbols(meta, body, 4999, 5)


# ---- fuse / xor filters --------------------------------------------------------------------------


@pytest.mark.parametrize("kind, bits", [("fuse8", 8), ("fuse16", 16), ("xor8", 8)])
def test_filter_has_no_false_negatives_and_agrees_with_c(kind, bits):
    rng = np.random.default_rng(8)
    universe = 30_000
    keys = np.sort(rng.choice(universe, size=600, replace=False)).astype(np.uint64)
    flt = build_filter(keys, kind)
    again = parse_filter(flt.meta(), flt.body(), max_keys=600)
    hits = query_universe(again, universe)
    assert hits[keys.astype(np.int64)].all()
    probe = np.arange(0, universe, 7, dtype=np.uint64)
    np.testing.assert_array_equal(hits[probe.astype(np.int64)], contain_c(again, probe))
    np.testing.assert_array_equal(query_keys(again, probe), hits[probe.astype(np.int64)])
    fp = (hits.sum() - keys.size) / (universe - keys.size)
    assert fp < 4 * 2.0**-bits + 1e-3
    assert len(flt.body()) == flt.meta()["array_length"] * bits // 8
    with pytest.raises(PayloadError):
        parse_filter(flt.meta(), flt.body()[:-1], max_keys=600)
    with pytest.raises(PayloadError):
        parse_filter({**flt.meta(), "size": 601}, flt.body(), max_keys=600)


def test_empty_filter():
    flt = build_filter(np.zeros(0, np.uint64))
    assert flt.meta()["size"] == 0 and flt.body() == b"" and not query_universe(flt, 100).any()


# ---- edge cases of the lossy codecs: empty, single-value and integer-only payloads, option ranges ----


@pytest.mark.parametrize("codec_id", ["qsgd", "topk", "sign", "eden"])
def test_lossy_codecs_on_edge_tensors(codec_id):
    codec = get_codec(codec_id)
    only_ints = {"i": np.array([3, -4], np.int32)}
    data = encode_tensors(codec, only_ints)
    _, meta, body = parse(data)
    out, _ = decode_tensors(data)
    assert np.array_equal(out["i"], only_ints["i"]) and meta["lengths"][:-1] == [0] * (len(meta["lengths"]) - 1)
    edge = {"e": np.zeros((0, 2), np.float32), "one": np.array([0.5], np.float32), "i": only_ints["i"]}
    data = encode_tensors(codec, edge, CodecContext(seed=3))
    _, meta, _ = parse(data)
    lossy = next(v for k, v in meta.items() if k not in ("exact", "lengths", "counts", "levels", "bucket", "chunk", "seed"))
    assert [r[0] for r in lossy] == ["one"] and [r[0] for r in meta["exact"]] == ["e", "i"]
    out, _ = decode_tensors(data)
    assert out["e"].shape == (0, 2) and np.array_equal(out["i"], edge["i"])
    # the element cap covers the exact part too
    with pytest.raises(PayloadError, match="cap"):
        decode_tensors(data, CodecContext(max_elements=1 + 0 + 1))
    assert decode_tensors(data, CodecContext(max_elements=1 + 0 + 2))[0]["one"].shape == (1,)


def test_qsgd_option_ranges_and_level_width():
    from fedsqueeze.errors import ConfigError

    for ok in ({"levels": 1}, {"levels": 32767}, {"bucket": 1}, {"bucket": 1 << 20}):
        get_codec("qsgd", **ok)
    for bad in ({"levels": 0}, {"levels": 32768}, {"bucket": 0}, {"bucket": (1 << 20) + 1}):
        with pytest.raises(ConfigError):
            get_codec("qsgd", **bad)
    x = {"v": np.linspace(-1, 1, 16).astype(np.float32)}
    for levels, width in ((127, 1), (128, 2)):
        _, meta, body = parse(encode_tensors(get_codec("qsgd", levels=levels, bucket=16), x))
        assert len(zstandard.ZstdDecompressor().decompress(body[: meta["lengths"][0]])) == 4 + width * 16


def test_topk_rejects_repeated_or_outside_positions():
    from fedsqueeze.codecs.zstd import shuffle_bytes, zstd_compress

    def payload(gaps, numel=8):
        i_blob = zstd_compress(shuffle_bytes(np.array(gaps, np.uint32)))
        v = np.ones(len(gaps), "<f4").tobytes()
        meta = {"sparse": [["w", "float32", [numel]]], "counts": [len(gaps)], "exact": [], "lengths": [len(i_blob), len(v), 0]}
        return frame("topk", meta, i_blob + v)

    assert np.array_equal(decode_tensors(payload([1, 2]))[0]["w"], np.float32([0, 1, 0, 1, 0, 0, 0, 0]))
    for gaps in ([1, 0], [3, 5], [8]):
        with pytest.raises(PayloadError, match="not increasing positions inside the tensor"):
            decode_tensors(payload(gaps))
    _, meta, body = parse(payload([1, 2]))
    for counts in ([0], [9], [1, 1], ["2"], 2):
        with pytest.raises(PayloadError, match="counts"):
            decode_tensors(frame("topk", {**meta, "counts": counts}, body))


@pytest.mark.parametrize("codec_id", ["qsgd", "topk", "sign", "eden", "fp16"])
def test_a_wrong_number_of_body_parts_is_a_payload_error(codec_id):
    """Found by the fuzz harness: a 'lengths' list of the wrong size escaped as ValueError from the codec's own decode."""
    codec = get_codec(codec_id)
    _, meta, body = parse(encode_tensors(codec, hand(), CodecContext(seed=1)))
    for lengths in ([len(body)], meta["lengths"] + [0]):
        with pytest.raises(PayloadError, match="parts"):
            codec.decode({**meta, "lengths": lengths}, memoryview(body), CodecContext())
