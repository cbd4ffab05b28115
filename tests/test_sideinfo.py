"""Side-information flip coding (codecs/sideinfo.py) and the issue-16 hot paths (ANS grouping, sz3 scan).

Pinned on hand-made cases: the context of a position, the bound (conditional entropy of the flips
given the context), the coder's round trip and its distance to the bound; and that the counting
sort in ANS and the one-pass scan in sz3 give byte-identical output to the code they replaced.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedsqueeze.codecs import CodecContext, decode_tensors, encode_tensors, get_codec
from fedsqueeze.codecs.ans import decode_grouped_bits, encode_grouped_bits, group_order
from fedsqueeze.codecs.sideinfo import (
    CONTEXT_BINS,
    NUM_CONTEXTS,
    decode_flips,
    encode_flips,
    flip_bound_bits,
    flip_contexts,
    pack_counts,
    unpack_counts,
)
from fedsqueeze.codecs.sz3 import rel_abs_bound, scan, sz3_compress, sz3_config
from fedsqueeze.errors import PayloadError


def test_context_is_the_half_octave_bin_of_the_distance_and_the_reference_bit():
    theta = np.float32(0.5)
    # |u − θ| → bin: (3/4, 1] → 0, (1/2, 3/4] → 1, (3/8, 1/2] → 2, (1/4, 3/8] → 3, ... two per octave,
    # the last bin holding everything nearer than 2^-15
    cases = [(0.5, 2), (0.49, 2), (0.375, 3), (0.3, 3), (0.25, 4), (0.2, 4), (0.1875, 5), (0.125, 6), (2.0**-14, 28), (0.0, 31)]
    for dist, want in cases:
        for sign, ref in ((1, 0), (-1, 1)):
            u = np.array([theta + sign * dist], dtype=np.float32)
            if u[0] >= 1:  # u < 1 always
                continue
            got = flip_contexts(u, np.array([theta], dtype=np.float32))[0]
            assert got == 2 * want + (ref if dist > 0 else 0), (dist, sign, got)
    tiny = flip_contexts(np.array([0.5 + 2.0**-20], np.float32), np.array([0.5], np.float32))
    assert tiny[0] == 2 * (CONTEXT_BINS - 1)  # clipped into the last bin
    assert flip_contexts(np.array([0.0], np.float32), np.array([1.0], np.float32))[0] == 1  # |d| = 1: bin 0, u < θ


def test_bound_is_the_conditional_entropy_of_the_flips_given_the_context():
    contexts = np.array([0, 0, 0, 0, 1, 1, 5, 5], dtype=np.uint8)
    flips = np.array([1, 0, 0, 0, 1, 1, 0, 1], dtype=bool)
    h = lambda p: -(p * math.log2(p) + (1 - p) * math.log2(1 - p))  # noqa: E731
    # context 0: 1 of 4 flipped; context 1: all flipped (0 bits); context 5: 1 of 2
    assert flip_bound_bits(flips, contexts) == pytest.approx(4 * h(0.25) + 0 + 2 * h(0.5), rel=1e-12)
    assert flip_bound_bits(np.zeros(8, bool), contexts) == 0.0


def synthetic(n: int, seed: int):
    """Uniforms, a reference θ and a client θ that moved a little, as a mask client's would."""
    rng = np.random.default_rng(seed)
    u = rng.random(n, dtype=np.float32)
    theta_ref = np.where(rng.random(n) < 0.9, 0.98, rng.choice([0.02, 0.4, 0.6], n)).astype(np.float32)
    theta_c = np.clip(theta_ref + rng.normal(0, 0.01, n) * (rng.random(n) < 0.3), 0, 1).astype(np.float32)
    flips = (u < theta_c) != (u < theta_ref)
    return u, theta_ref, flips


def test_flip_code_round_trips_and_stays_within_3_percent_of_its_bound():
    u, theta_ref, flips = synthetic(300_000, 1)
    contexts = flip_contexts(u, theta_ref)
    meta, body = encode_flips(flips, contexts)
    positions = decode_flips(meta, body, contexts, max_flips=int(flips.sum()))
    np.testing.assert_array_equal(positions, np.flatnonzero(flips))
    bound = flip_bound_bits(flips, contexts)
    _, counts_len = unpack_counts(body, np.bincount(contexts, minlength=NUM_CONTEXTS))
    assert 0 < bound <= 8 * (len(body) - counts_len) <= 1.03 * bound + 64  # the ANS words
    assert counts_len <= NUM_CONTEXTS * 39 // 8 + 1  # the counts: gamma codes of at most 2 · 19 + 1 bits each
    # the side information pays: the bound is far below naming the flipped positions blind
    n, k = flips.size, int(flips.sum())
    blind = (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)
    assert bound < 0.75 * blind
    with pytest.raises(PayloadError, match="more than"):
        decode_flips(meta, body, contexts, max_flips=k - 1)
    other = flip_contexts(u, np.roll(theta_ref, 1))  # the wrong side information cannot give the flips back
    try:
        assert not np.array_equal(decode_flips(meta, body, other, k), np.flatnonzero(flips))
    except PayloadError:
        pass
    assert meta == {"coder": "context"}


def test_counts_pack_as_elias_gamma_of_count_plus_one():
    sizes = np.array([0, 1, 5, 8, 1000] + [0] * (NUM_CONTEXTS - 5))
    ones = np.array([0, 1, 3, 0, 999] + [0] * (NUM_CONTEXTS - 5))
    packed = pack_counts(ones, sizes)
    # empty context skipped; gamma(2) = 010, gamma(4) = 00100, gamma(1) = 1, gamma(1000) = 9 zeros + 1111101000
    assert packed == bytes([0b01000100, 0b10000000, 0b00111110, 0b10000000])
    assert unpack_counts(packed, sizes) == (ones.tolist(), 4)
    with pytest.raises(PayloadError, match="context of 5"):
        unpack_counts(pack_counts(np.array([0, 1, 6, 0, 999] + [0] * (NUM_CONTEXTS - 5)), sizes), sizes)
    with pytest.raises(PayloadError, match="truncated"):
        unpack_counts(packed[:2], sizes)
    with pytest.raises(PayloadError, match="truncated or larger"):
        unpack_counts(bytes(64), sizes)  # a run of zeros longer than any count of these contexts


@pytest.mark.parametrize("num_groups", [1, 6, 64, 256, 300])
def test_counting_sort_grouping_gives_the_same_bytes_as_before(num_groups):
    rng = np.random.default_rng(num_groups)
    n = 50_000
    groups = rng.integers(0, num_groups, n)
    bits = rng.random(n) < rng.random(num_groups)[groups]
    meta, body = encode_grouped_bits(bits, groups, num_groups)
    assert (meta, body) == encode_grouped_bits(bits, groups, num_groups, counting=False)  # the int64 sort of before
    # the grouping itself: every group's positions, in position order, group after group
    order, bounds = group_order(groups, num_groups)
    for g in range(num_groups):
        np.testing.assert_array_equal(order[bounds[g] : bounds[g + 1]], np.flatnonzero(groups == g))
    np.testing.assert_array_equal(decode_grouped_bits(meta, body, groups, num_groups), bits)


@pytest.mark.parametrize(
    ("n", "num_groups"), [(0, 3), (1, 1), (200_001, 6), (140_000, 16), (140_000, 17), (65_536, 64), (131_073, 300), (70_000, 40_000)]
)
def test_chunked_key_sort_codes_the_same_bytes_as_one_sort(n, num_groups):
    """Over several 65,536-position chunks (up to 16 groups, ones counted per group; more, by one
    reduceat; 40,000 groups: 64-bit keys), in any integer dtype."""
    rng = np.random.default_rng(n + num_groups)
    groups = rng.integers(0, num_groups, n)
    bits = rng.random(n) < rng.random(num_groups)[groups]
    want = encode_grouped_bits(bits, groups, num_groups, counting=False)
    assert want[0]["ones"] == np.bincount(groups[bits], minlength=num_groups).tolist()
    for dtype in (np.int64, np.int32, np.uint8 if num_groups <= 1 << 8 else np.uint16 if num_groups <= 1 << 16 else np.uint32):
        assert encode_grouped_bits(bits, groups.astype(dtype), num_groups) == want
    np.testing.assert_array_equal(decode_grouped_bits(want[0], want[1], groups, num_groups), bits)


@pytest.mark.parametrize("bad", [[0, 1, 6], [0, -1, 2], [0, 1 << 15, 2], [1 << 40, 0, 0]])
def test_grouped_bits_refuse_a_group_outside_the_range(bad):
    """A wider id would wrap into another group's keys (2^15 is group 0 modulo a 32-bit key)."""
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        encode_grouped_bits(np.zeros(3, dtype=bool), np.array(bad), 6)
    with pytest.raises(ValueError, match="one length"):
        encode_grouped_bits(np.zeros(4, dtype=bool), np.zeros(3, dtype=np.int64), 6)


def test_grouped_bits_check_the_groups_of_every_chunk():
    """The group ids are checked a chunk at a time: a bad id in the last chunk is refused too; a
    type all of whose values are groups (uint8 for 256 groups) needs no check."""
    long = np.zeros(3 * 65_536 + 5, dtype=np.int64)
    for bad in (6, -1, 1 << 15):
        long[-1] = bad
        with pytest.raises(ValueError, match=r"\[0, 6\)"):
            encode_grouped_bits(np.zeros(long.size, dtype=bool), long, 6)
    groups = np.arange(300, dtype=np.int64) % 256
    bits = groups % 3 == 0
    assert encode_grouped_bits(bits, groups.astype(np.uint8), 256) == encode_grouped_bits(bits, groups, 256, counting=False)


def test_one_pass_scan_finds_range_finiteness_and_rows():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((700, 200)).astype(np.float32)  # several scan blocks of rows
    a[rng.random(700) < 0.8] = 0.0
    a[5, 3] = -0.0
    info = scan(a)
    assert (info.lo, info.hi, info.finite) == (float(a.min()), float(a.max()), True)
    np.testing.assert_array_equal(info.nonzero_rows, np.any(a != 0, axis=1))
    flat = rng.standard_normal(3 * 65536 + 11).astype(np.float32)
    assert (scan(flat).lo, scan(flat).hi, scan(flat).nonzero_rows) == (float(flat.min()), float(flat.max()), None)
    for bad in (np.nan, np.inf, -np.inf):
        for where in (0, -1):
            for arr in (a.copy(), flat.copy()):
                arr.reshape(-1)[where] = bad
                assert not scan(arr).finite


def test_scan_skips_the_rows_of_a_tensor_whose_first_column_says_dense():
    """Over half the rows non-zero at their first value: no per-row pass (the row-sparse path needs
    at most half), the same range; at exactly half the rows are found."""
    a = np.arange(1.0, 13.0, dtype=np.float32).reshape(4, 3)
    a[1, 0] = 0.0  # 3 of 4 rows start non-zero
    assert scan(a) == (True, 0.0, 12.0, None)
    b = a.copy()
    b[2, 0] = 0.0  # 2 of 4: might be row-sparse
    b[1] = 0.0
    info = scan(b)
    assert (info.finite, info.lo, info.hi) == (True, 0.0, 12.0)
    np.testing.assert_array_equal(info.nonzero_rows, [True, False, True, True])
    big = np.ones((3, 70_000), dtype=np.float32)  # dense, flat blocks: a NaN in the last one shows
    big[2, -1] = np.nan
    assert scan(big).nonzero_rows is None and not scan(big).finite


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value encountered:RuntimeWarning")
def test_sz3_plans_a_small_vector_as_the_full_scan_decides():
    """A bias takes the one-dot-product path; every case goes lossy exactly when the full scan says so."""
    rel = get_codec("sz3", mode="rel", bound=1e-2, threshold=4)
    absolute = get_codec("sz3", mode="abs", bound=1e-2, threshold=4)
    cases = {
        "plain": (np.arange(8, dtype=np.float32), True, True),
        "constant": (np.full(8, 2.0, dtype=np.float32), False, True),
        "equal ends": (np.array([1, 5, 2, 1, 0, 3, 1, 1], dtype=np.float32), True, True),
        "nan": (np.array([0, 1, np.nan, 3, 4, 5, 6, 7], dtype=np.float32), False, False),
        "inf": (np.array([0, 1, 2, np.inf, 4, 5, 6, 7], dtype=np.float32), False, False),
        "both infs": (np.array([-np.inf, 1, 2, 3, 4, 5, 6, np.inf], dtype=np.float32), False, False),
        "overflowing sum": (np.array([3e38, 3e38, 3e38, 1, 1, 1, 1, 0], dtype=np.float32), True, True),
        "overflowing dot": (np.array([2e19, 1, 2, 3, 4, 5, 6, 0], dtype=np.float32), True, True),
        "minus inf": (np.array([0, 1, 2, -np.inf, 4, 5, 6, 7], dtype=np.float32), False, False),
        "nan float64": (np.array([0, 1, 2, np.nan, 4, 5, 6, 7]), False, False),
    }
    for name, (a, lossy_rel, lossy_abs) in cases.items():
        assert (rel.plan("b", a) is not None, absolute.plan("b", a) is not None) == (lossy_rel, lossy_abs), name
    plain = rel.plan("b", cases["plain"][0])
    assert plain is not None and plain.finite and math.isnan(plain.lo) and math.isnan(plain.hi) and plain.nonzero_rows is None
    assert rel.plan("b", cases["overflowing sum"][0]) == (True, 0.0, float(np.float32(3e38)), None)  # the full scan's
    assert rel.plan("b", cases["overflowing dot"][0]) == (True, 0.0, float(np.float32(2e19)), None)
    longer = np.arange(9000, dtype=np.float32)  # over the one-dot-product size: the full scan, with its range
    assert rel.plan("b", longer) == (True, 0.0, 8999.0, None)


def test_rel_bound_becomes_the_abs_bound_sz3_works_out_in_the_tensors_type():
    """SZ3's REL mode takes max − min in the tensor's own type: float32 rounding, not float64's."""
    info = scan(np.array([0.1, 16777217.0], dtype=np.float32))  # 2^24 + 1 rounds to 2^24 in float32
    assert info.hi == 16777216.0 and info.lo == float(np.float32(0.1))
    # float64: 16777216 − 0.1 = 16777215.9 (rounded to 53 bits); float32: 16777216 − 0.1 rounds back to 16777216
    assert rel_abs_bound(0.5, info, np.dtype(np.float32)) == 0.5 * 16777216.0
    assert rel_abs_bound(0.5, info, np.dtype(np.float64)) == 0.5 * (16777216.0 - float(np.float32(0.1)))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_dense_rel_tensors_go_to_sz3_at_their_abs_bound_and_give_rel_modes_stream():
    """The dense REL path hands SZ3 the ABS bound of the scan's range: the very stream SZ3's REL mode
    gives, for every predictor, float32 and float64, ranges whose float32 and float64 differences
    differ, and a range that overflows float32."""
    rng = np.random.default_rng(5)
    arrays = []
    while len(arrays) < 12:  # float32 tensors whose max − min rounds differently in float32 and float64
        a = (rng.standard_normal((40, 60)) * rng.uniform(1e-3, 10) + rng.uniform(-5, 5)).astype(np.float32)
        if float(a.max() - a.min()) != float(a.max()) - float(a.min()):
            arrays.append(a)
    arrays += [rng.standard_normal((50, 200)), np.array([-3e38, 3e38] * 1500, dtype=np.float32).reshape(30, 100)]
    for algo in ("interp_lorenzo", "lorenzo_reg", "interp", "nopred"):
        for bound in (1e-2, 2e-2, 1e-3):
            codec = get_codec("sz3", mode="rel", bound=bound, threshold=1024, algo=algo)
            for a in arrays:
                info = codec.plan("w", a)
                assert info is not None and not math.isnan(info.lo)
                bitmap, stream, rows = codec.compress_one(a, info)
                assert (bitmap, rows) == (b"", 0)
                assert stream == sz3_compress(a.reshape(-1), sz3_config("rel", bound, algo)), (algo, bound, a.dtype)


def test_sz3_reuses_its_configuration_and_codes_the_same_bytes():
    """The dense path's shared configuration: the same bytes as a fresh one, tensor after tensor."""
    rng = np.random.default_rng(3)
    codec = get_codec("sz3", mode="rel", bound=2e-2, threshold=1024, algo="nopred")
    arrays = [rng.standard_normal(n).astype(np.float32) * s for n, s in ((5000, 1.0), (2000, 40.0), (5000, 1.0))]
    arrays.append(rng.standard_normal((50, 40)))  # float64
    for a in arrays:
        bitmap, stream, rows = codec.compress_one(a, codec.plan("w", a))
        assert (bitmap, rows) == (b"", 0)
        assert stream == sz3_compress(a.reshape(-1), sz3_config("rel", 2e-2, "nopred"))


def test_sz3_streams_are_the_same_bytes_as_before():
    """Dense tensors: exactly raw pysz's stream; row-sparse: the row bitmap and pysz at the ABS bound
    bound × (max − min) of the whole tensor, as the codec did before its one-pass scan."""
    rng = np.random.default_rng(1)
    dense = rng.standard_normal(5000).astype(np.float32)
    sparse = np.zeros((64, 50), dtype=np.float32)
    sparse[[3, 17, 40]] = rng.standard_normal((3, 50))
    nan = dense.copy()
    nan[7] = np.nan
    tensors = {"dense.weight": dense, "emb.weight": sparse, "nan.weight": nan}
    codec = get_codec("sz3", mode="rel", bound=1e-2, threshold=1024)
    payload = encode_tensors(codec, tensors, CodecContext())
    from fedsqueeze.codecs.framing import unframe

    _, meta, body = unframe(payload)
    assert [row[0] for row in meta["lossy"]] == ["dense.weight", "emb.weight"]  # NaN goes lossless
    lengths = meta["lengths"]
    parts, pos = [], 0
    for n in lengths:
        parts.append(bytes(body[pos : pos + n]))
        pos += n
    assert parts[1] == b"" and parts[2] == sz3_compress(dense, sz3_config("rel", 1e-2))
    nonzero = np.any(sparse != 0, axis=1)
    assert parts[3] == np.packbits(nonzero).tobytes()
    abs_bound = 1e-2 * (float(sparse.max()) - float(sparse.min()))
    assert parts[4] == sz3_compress(sparse[nonzero].reshape(-1), sz3_config("abs", abs_bound))
    back, _ = decode_tensors(payload, CodecContext())
    assert np.array_equal(back["nan.weight"], nan, equal_nan=True)
    assert np.abs(back["emb.weight"] - sparse).max() <= abs_bound * (1 + 1e-6)


@pytest.mark.parametrize("name", ["fedpm", "deltamask", "deltamask-exact"])
def test_mask_methods_default_to_the_context_code_and_report_its_bound(name):
    """A hand-made flip set through each method's default uplink: decoded exactly, and the round's
    ``bound_bits_per_key`` is the conditional entropy of those flips given the server's contexts."""
    import copy

    from handmade import build, hand_head, mask_payload, shared_task

    from fedsqueeze.codecs.framing import unframe
    from fedsqueeze.methods.base import RoundContext

    m = build(name, shared_task())
    state = m.init_server()
    ctx = RoundContext(round=1, rounds=2, seed=4)
    theta_start = m.start_theta(m.theta_of(state["theta_sym"], state["levels"]))
    u = m.server_uniforms(ctx, 1)
    ref = u < theta_start
    flips = np.zeros(m.n, dtype=bool)
    flips[np.argsort(np.abs(u - theta_start))[:60:2]] = True  # 30 positions, all nearest their θ: cheap to code
    payload = mask_payload(m, state, ctx, 1, ref ^ flips, hand_head(m, 1), 3)
    assert unframe(payload)[1]["mask"] == {"coder": "context"}
    update = m.decode_update(payload, 1, state, ctx)
    np.testing.assert_array_equal(update.mask.positions, np.flatnonzero(flips))
    _, metrics = m.aggregate(copy.deepcopy(state), {1: update}, ctx)
    contexts = flip_contexts(u, theta_start)
    assert metrics["keys"] == 30
    assert metrics["bound_bits_per_key"] == pytest.approx(flip_bound_bits(flips, contexts) / 30, rel=1e-12)
    assert metrics["mask_bits_per_key"] == 8 * update.mask.nbytes / 30
