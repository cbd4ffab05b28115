"""Fuse/xor filter query, exact position codes and ANS mask coding: round trips and rejection of bad bytes."""

import numpy as np
import pytest

from fedsqueeze.codecs.ans import decode_grouped_bits, decode_symbols, encode_grouped_bits, encode_symbols
from fedsqueeze.codecs.fusefilter import FILTER_KINDS, build_filter, contain_c, parse_filter, query_keys, query_universe
from fedsqueeze.codecs.positions import POSITION_CODERS, decode_positions, encode_positions, entropy_bound_bits
from fedsqueeze.errors import PayloadError


@pytest.mark.parametrize("kind", FILTER_KINDS)
@pytest.mark.parametrize("n_keys", [1, 37, 3000])
def test_vectorized_query_equals_c_contain_on_every_position(kind, n_keys):
    universe = 40_000
    rng = np.random.default_rng(n_keys)
    keys = rng.choice(universe, size=n_keys, replace=False).astype(np.uint64)
    flt = build_filter(keys, kind)
    fast = query_universe(flt, universe, chunk=4096)  # several chunks, a ragged last one
    slow = contain_c(flt, np.arange(universe, dtype=np.uint64))
    np.testing.assert_array_equal(fast, slow)
    assert fast[keys].all()  # no false negatives
    assert fast.sum() > n_keys or kind == "fuse16"  # 8-bit fingerprints do give false positives here
    big = rng.integers(0, 2**63, size=2000, dtype=np.uint64)  # keys beyond the universe hash the same way
    np.testing.assert_array_equal(query_keys(flt, big), contain_c(flt, big))


def test_filter_wire_round_trip_and_rejections():
    keys = np.arange(0, 5000, 7, dtype=np.uint64)
    flt = build_filter(keys, "fuse8")
    back = parse_filter(flt.meta(), flt.body(), max_keys=10_000)
    np.testing.assert_array_equal(query_universe(back, 5000), query_universe(flt, 5000))
    with pytest.raises(PayloadError):
        parse_filter(flt.meta(), flt.body()[:-1], max_keys=10_000)
    with pytest.raises(PayloadError):
        parse_filter({**flt.meta(), "size": flt.size + 500}, flt.body(), max_keys=10_000)
    with pytest.raises(PayloadError):
        parse_filter({**flt.meta(), "kind": "bloom"}, flt.body(), max_keys=10_000)
    with pytest.raises(PayloadError):
        parse_filter(flt.meta(), flt.body(), max_keys=10)
    empty = build_filter(np.zeros(0, dtype=np.uint64))
    assert not query_universe(parse_filter(empty.meta(), empty.body(), 10), 100).any()


@pytest.mark.parametrize("coder", POSITION_CODERS)
@pytest.mark.parametrize("universe,n", [(1, 0), (1, 1), (64, 64), (1000, 3), (500_000, 5000)])
def test_positions_round_trip(coder, universe, n):
    rng = np.random.default_rng(universe + n)
    pos = np.sort(rng.choice(universe, size=n, replace=False)).astype(np.uint64)
    meta, body = encode_positions(pos, universe, coder)
    np.testing.assert_array_equal(decode_positions(meta, body, max_universe=universe), pos)


def test_rice_is_close_to_the_entropy_bound():
    universe, n = 1_000_000, 20_000
    pos = np.sort(np.random.default_rng(1).choice(universe, size=n, replace=False))
    bound = entropy_bound_bits(n, universe)
    rice = 8 * len(encode_positions(pos, universe, "rice")[1])
    ef = 8 * len(encode_positions(pos, universe, "elias-fano")[1])
    assert bound < rice < bound * 1.02 and rice < ef < bound * 1.15


@pytest.mark.parametrize("coder", POSITION_CODERS)
def test_corrupt_position_codes_raise(coder):
    pos = np.arange(3, 9000, 11, dtype=np.uint64)
    meta, body = encode_positions(pos, 10_000, coder)
    bad_metas = [{**meta, "n": meta["n"] + 1}, {**meta, "universe": 100}, {**meta, "n": -1}, {**meta, "coder": "x"}]
    for bad in bad_metas:
        with pytest.raises(PayloadError):
            decode_positions(bad, body, max_universe=10_000)
    with pytest.raises(PayloadError):
        decode_positions(meta, body[:-1], max_universe=10_000)
    with pytest.raises(PayloadError):
        decode_positions(meta, body, max_universe=5_000)


def test_grouped_bits_and_symbols_round_trip():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 6, size=50_000)
    p = np.array([0.0, 0.2, 0.5, 0.8, 0.97, 1.0])[groups]
    bits = rng.random(groups.size) < p
    meta, body = encode_grouped_bits(bits, groups, 6)
    np.testing.assert_array_equal(decode_grouped_bits(meta, body, groups, 6), bits)
    entropy = sum(
        -(np.sum(b) * np.log2(np.mean(b)) + np.sum(~b) * np.log2(1 - np.mean(b)))
        for g in range(6)
        if 0 < (b := bits[groups == g]).mean() < 1
    )
    assert 8 * len(body) < entropy + 64
    with pytest.raises(PayloadError):
        decode_grouped_bits({"ones": meta["ones"][:-1]}, body, groups, 6)
    syms = groups.copy()
    smeta, sbody = encode_symbols(syms, 6)
    np.testing.assert_array_equal(decode_symbols(smeta, sbody, syms.size, 6), syms)
    with pytest.raises(PayloadError):
        decode_symbols(smeta, sbody, syms.size + 1, 6)
    const_meta, const_body = encode_symbols(np.full(100, 3), 6)
    assert len(const_body) <= 8 and (decode_symbols(const_meta, const_body, 100, 6) == 3).all()
