"""The pure rules of FeedSign (methods/feedsign.py) and FedKSeed (methods/fedkseed.py) on hand-made cases
(mutation testing: benchmarks/mutants.py, section ``zo_methods``). The methods end to end are
tests/test_zo_methods.py's."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedsqueeze.errors import PayloadError
from fedsqueeze.methods.fedkseed import DENSE, PATHS, REPLAY, SPARSE, FedKSeed, _gaps, _read_index
from fedsqueeze.methods.feedsign import majority, pack_signs, read_signs, sign_step
from fedsqueeze.methods.zo_wire import Reader, varints


def _reader(data: bytes) -> Reader:
    return Reader(memoryview(data))


# ---- FeedSign ------------------------------------------------------------------------------------


def test_signs_pack_little_endian_one_bit_each():
    # +1 -1 -1 +1 +1 +1 +1 +1 | -1: bit i of byte 0 is sign i (1 = +1) -> 0b11111001; byte 1: 0
    signs = np.array([1, -1, -1, 1, 1, 1, 1, 1, -1], dtype=np.float32)
    assert pack_signs(signs) == bytes([0b11111001, 0])
    assert pack_signs(np.array([0.0, 2.0, -3.0])) == bytes([0b010])  # 0 is not > 0: bit 0
    assert pack_signs(np.zeros(0)) == b""


def test_read_signs_inverts_pack_and_refuses_padding_bits():
    signs = np.array([1, -1, -1, 1, 1, 1, 1, 1, -1], dtype=np.float32)
    reader = _reader(pack_signs(signs) + b"\x07")
    got = read_signs(reader, 9)
    assert got.dtype == np.float32 and got.tolist() == signs.tolist()
    assert reader.pos == 2  # ceil(9 / 8) bytes, the rest left
    assert read_signs(_reader(bytes([0b1111])), 4).tolist() == [1, 1, 1, 1]
    assert read_signs(_reader(b""), 0).tolist() == []
    with pytest.raises(PayloadError, match="non-zero padding bits"):
        read_signs(_reader(bytes([0b10000])), 4)
    with pytest.raises(PayloadError, match="truncated"):
        read_signs(_reader(bytes([1])), 9)


def test_majority_per_step_and_the_coin_on_a_tie():
    votes = [np.array([1, 1, -1, -1, 1], np.float32), np.array([1, -1, -1, 1, -1], np.float32), np.array([1, -1, 1, 1, 1], np.float32)]
    coin = np.array([-1, -1, -1, -1, -1], dtype=np.float64)
    # sums 3 -1 -1 1 1: no tie
    got = majority(votes, coin)
    assert got.dtype == np.float32 and got.tolist() == [1, -1, -1, 1, 1]
    two = [np.array([1, 1, -1], np.float32), np.array([-1, 1, -1], np.float32)]  # sums 0 2 -2
    assert majority(two, np.array([1.0, -1.0, 1.0])).tolist() == [1, 1, -1]
    assert majority(two, np.array([-1.0, 1.0, -1.0])).tolist() == [-1, 1, -1]


def test_a_clients_own_step_is_the_sign_with_zero_as_minus_one():
    got = sign_step(np.array([0.5, -0.1, 0.0, 1e-30]))
    assert got.dtype == np.float32 and got.tolist() == [1, -1, -1, 1]


# ---- FedKSeed ------------------------------------------------------------------------------------


def test_catch_up_paths():
    assert (REPLAY, SPARSE, DENSE) == (0, 1, 2)
    assert PATHS == {0: "replay", 1: "accumulated", 2: "accumulated"}


def test_seed_indices_travel_as_gaps_and_back():
    assert _gaps(np.array([3, 4, 10])) == [3, 0, 5]  # the first, then each step minus one
    assert _gaps(np.array([0])) == [0]
    assert _gaps(np.zeros(0, dtype=np.int64)) == []
    got = _read_index(_reader(varints([3, 0, 5])), 3, 11)
    assert got.dtype == np.int64 and got.tolist() == [3, 4, 10]
    assert _read_index(_reader(b""), 0, 11).tolist() == []
    assert _read_index(_reader(varints([9])), 1, 10).tolist() == [9]  # the last seed of the pool


def test_read_index_refuses_a_seed_outside_the_pool():
    with pytest.raises(PayloadError, match="names seed 10 of a pool of 10"):
        _read_index(_reader(varints([3, 0, 5])), 3, 10)
    with pytest.raises(PayloadError, match="over its bound 10"):
        _read_index(_reader(varints([11])), 1, 10)


def _pro(pro: bool) -> FedKSeed:
    method = FedKSeed.__new__(FedKSeed)  # probabilities() reads only the importance flag
    method.pro = pro
    return method


def test_fedkseed_pro_probabilities_are_the_softmax_of_min_max_normalised_mean_amplitudes():
    stats = {"amp_sum": np.array([0.0, 2.0, 6.0, 3.0], np.float32), "amp_count": np.array([0, 1, 2, 5], np.int64)}
    # mean amplitude with the initial 0: sum / (count + 1) = 0, 1, 2, 0.5 -> min-max: 0, 0.5, 1, 0.25
    normalised = [0.0, 0.5, 1.0, 0.25]
    e = [math.exp(a) for a in normalised]
    probs = _pro(True).probabilities(stats)
    np.testing.assert_allclose(probs, [x / sum(e) for x in e], rtol=1e-8)
    assert probs.sum() == pytest.approx(1.0)
    assert _pro(False).probabilities(stats) is None  # uniform
    flat = {"amp_sum": np.zeros(4, np.float32), "amp_count": np.zeros(4, np.int64)}
    np.testing.assert_allclose(_pro(True).probabilities(flat), [0.25] * 4)  # all equal: no division by zero
