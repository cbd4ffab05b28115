"""The side-information flip code (codecs/sideinfo.py) on hand-made cases: each context, count code and
cap is worked out by hand in the comments (mutation testing: benchmarks/mutants.py, section ``sideinfo``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedsqueeze.codecs.ans import grouped_bits_cap
from fedsqueeze.codecs.sideinfo import (
    CONTEXT_BINS,
    NUM_CONTEXTS,
    context_sizes,
    decode_flips,
    encode_flips,
    flip_bound_bits,
    flip_contexts,
    flips_cap_bytes,
    flips_meta_bytes,
    pack_counts,
    unpack_counts,
)
from fedsqueeze.errors import PayloadError


def test_constants():
    assert CONTEXT_BINS == 32 and NUM_CONTEXTS == 64 and flips_meta_bytes() == 32


@pytest.mark.parametrize(
    ("u", "theta", "context"),
    [
        (0.9375, 0.0, 0),  # |d| in (3/4, 1]: bin 0; u >= θ: reference bit 0
        (1.0, 0.0, 0),  # |d| = 1: bin 0
        (0.0, 0.9375, 1),  # bin 0, u < θ: reference bit 1
        (0.75, 0.0, 2),  # |d| = 3/4: bin 1
        (0.625, 0.0, 2),  # (1/2, 3/4]: bin 1
        (0.25, 0.75, 5),  # |d| = 1/2: bin 2, reference bit 1
        (0.625, 0.25, 6),  # |d| = 3/8: bin 3
        (0.5, 0.5 - 2.0**-15, 60),  # 2^-15: bin 30
        (0.5, 0.5 - 2.0**-16, 62),  # 2^-16: bin 32, clipped to the last bin, 31
        (0.5, 0.5 - 2.0**-20, 62),  # nearer still: the last bin
        (0.5 - 2.0**-20, 0.5, 63),  # the last bin, reference bit 1
        (0.5, 0.5, 62),  # d = 0: the last bin, reference bit 0
    ],
)
def test_context_is_two_times_the_half_octave_bin_plus_the_reference_bit(u, theta, context):
    got = flip_contexts(np.array([u], dtype=np.float32), np.array([theta], dtype=np.float32))
    assert got.dtype == np.uint8 and got.tolist() == [context]


def test_contexts_of_a_vector_and_their_sizes():
    u = np.array([0.9375, 0.0, 0.25, 0.5, 0.625], dtype=np.float32)
    theta = np.array([0.0, 0.9375, 0.75, 0.5, 0.25], dtype=np.float32)
    contexts = flip_contexts(u, theta)
    assert contexts.tolist() == [0, 1, 5, 62, 6]
    sizes = context_sizes(np.array([0, 0, 3, 63], dtype=np.uint8))
    assert len(sizes) == NUM_CONTEXTS and sizes[0] == 2 and sizes[3] == 1 and sizes[63] == 1 and sizes.sum() == 4


def test_bound_is_the_conditional_entropy_of_the_flips_given_the_context():
    contexts = np.array([0, 0, 0, 0, 1, 1, 2, 2], dtype=np.uint8)
    flips = np.array([True, False, False, False, True, True, True, False])
    # context 0: 4·H(1/4); context 1: all flipped, 0 bits; context 2: 2·H(1/2) = 2
    h = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))
    assert flip_bound_bits(flips, contexts) == pytest.approx(4 * h + 2, rel=1e-12)


def test_counts_are_elias_gamma_codes_of_count_plus_one_skipping_empty_contexts():
    # k = 0 -> 1: "1"; k = 1 -> 2: "010"; (size 0: skipped); k = 4 -> 5: "00101" => 1010 0010 1(000 0000)
    assert pack_counts(np.array([0, 1, 0, 4]), np.array([3, 5, 0, 9])) == bytes([0b10100010, 0b10000000])
    assert pack_counts(np.array([2, 0]), np.array([2, 0])) == bytes([0b01100000])  # k = 2 -> 3: "011"
    # 7 -> 8 = 1000: "0001000"
    assert pack_counts(np.array([7]), np.array([7])) == bytes([0b00010000])


def test_unpack_counts_reads_what_pack_wrote_and_says_how_many_bytes():
    sizes = np.array([3, 5, 0, 9])
    body = pack_counts(np.array([0, 1, 0, 4]), sizes) + b"\xff\xee"  # followed by the ANS words
    assert unpack_counts(body, sizes) == ([0, 1, 0, 4], 2)  # 9 bits: 2 bytes
    assert unpack_counts(bytes([0b10000000]), np.array([0, 5])) == ([0, 0], 1)
    assert unpack_counts(b"", np.array([0, 0])) == ([0, 0], 0)
    full = pack_counts(np.array([9]), np.array([9]))  # 10 = 1010: "0001010", a count equal to its context
    assert unpack_counts(full, np.array([9])) == ([9], 1)


def test_unpack_counts_refuses_counts_beyond_their_context_or_truncated():
    with pytest.raises(PayloadError, match="2 flips in a context of 1 positions"):
        unpack_counts(bytes([0b01100000]), np.array([1]))  # "011" = 3 -> 2 flips, context of 1
    with pytest.raises(PayloadError, match="truncated or larger"):
        unpack_counts(bytes([0b00100000]), np.array([1]))  # two zeros: a count of at least 3 bits, context of 1
    with pytest.raises(PayloadError, match="truncated or larger"):
        unpack_counts(b"", np.array([3]))
    with pytest.raises(PayloadError, match="truncated or larger"):
        unpack_counts(bytes([0b00000000]), np.array([200]))  # 8 zeros and nothing after them
    # more leading zeros than a count of a 3-position context can have ("00100" = 4 is its longest)
    with pytest.raises(PayloadError, match="truncated or larger"):
        unpack_counts(bytes([0b00000000, 0b11111111]), np.array([3]))


def test_flips_round_trip_and_the_cap_on_their_number():
    rng = np.random.default_rng(0)
    u = rng.random(500, dtype=np.float32)
    theta = np.full(500, 0.3, dtype=np.float32)
    contexts = flip_contexts(u, theta)
    flips = np.zeros(500, dtype=bool)
    flips[[3, 17, 18, 250, 499]] = True
    meta, body = encode_flips(flips, contexts)
    assert meta == {"coder": "context"}
    assert decode_flips(meta, body, contexts, 5).tolist() == [3, 17, 18, 250, 499]
    with pytest.raises(PayloadError, match="claims 5 flips, more than the 4 this round allows"):
        decode_flips(meta, body, contexts, 4)
    for bad in ({"coder": "rice"}, ["context"], None):
        with pytest.raises(PayloadError, match="not a context code"):
            decode_flips(bad, body, contexts, 5)
    empty_meta, empty_body = encode_flips(np.zeros(500, dtype=bool), contexts)
    assert decode_flips(empty_meta, empty_body, contexts, 0).tolist() == []


@pytest.mark.parametrize(("n", "max_flips"), [(100, 10), (1000, 600), (64, 0), (0, 0), (7, 1)])
def test_flips_cap_bytes(n, max_flips):
    p = min(max_flips / n, 0.5) if n else 0.0  # conditioning never raises entropy: n·H(N/n), N <= n/2
    h = 0.0 if p == 0 else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
    counts = NUM_CONTEXTS * (2 * (n + 1).bit_length() + 1) // 8 + 1  # every context's Elias-gamma count
    assert flips_cap_bytes(n, max_flips) == counts + grouped_bits_cap(n * h, NUM_CONTEXTS)


def test_flips_cap_bytes_by_hand():
    # n = 100, 10 flips: counts 64·(2·7 + 1)//8 + 1 = 121; H(0.1) = 0.468996 -> 46.9 bits:
    # 4·(ceil((46.9·1.01 + 32·64 + 64) / 32) + 1) = 4·(ceil(67.48) + 1) = 4·69 = 276
    assert flips_cap_bytes(100, 10) == 121 + 276
    # half or more flipped: H = 1 bit a position. n = 1000: counts 64·(2·10 + 1)//8 + 1 = 169;
    # 4·(ceil((1010 + 2048 + 64)/32) + 1) = 4·(ceil(97.56) + 1) = 396
    assert flips_cap_bytes(1000, 600) == 169 + 396 == flips_cap_bytes(1000, 500)
