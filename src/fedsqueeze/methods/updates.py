"""The typed results of ``Method.decode_update``: what a server holds of one client's upload.

Each is a frozen dataclass, built only by a method's ``decode_update`` after the payload was
validated, and consumed only by the same method's ``aggregate``:

- :class:`TensorUpdate` — the tensor methods (fedavg, the compressors, fedsz, head, the PEFT
  methods) and DeComFL's warm-start rounds: the client's change to the trainable tensors and its
  number of examples.
- :class:`MaskUpdate` — the mask methods (fedpm, deltamask, deltamask-exact): the example count,
  the head delta and the decoded mask code, one of :class:`SampledMask` (FedPM's whole mask),
  :class:`FilterFlips` (DeltaMask's filter of flipped positions) or :class:`ExactFlips`
  (deltamask-exact's exact positions).
- :class:`ZOUpdate` — DeComFL's zeroth-order rounds: the K×P directional-derivative scalars.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar, Union

import numpy as np

from fedsqueeze.codecs.fusefilter import Filter, query_universe
from fedsqueeze.errors import PayloadError

Tensors = dict[str, np.ndarray]


@dataclass(frozen=True)
class TensorUpdate:
    """A client's change to the named trainable tensors, weighted by ``n`` at the server."""

    delta: Tensors
    n: int  # the client's number of training examples (>= 1)


@dataclass(frozen=True)
class SampledMask:
    """FedPM: the client's whole sampled binary mask, one bool per masked weight."""

    bits: np.ndarray


@dataclass(frozen=True)
class FilterFlips:
    """DeltaMask: the positions where the client's mask differs from the reference, in a filter."""

    filter: Filter

    @property
    def keys(self) -> int:
        """How many positions the client inserted (the filter's hits minus these are false positives)."""
        return self.filter.size

    @property
    def nbytes(self) -> int:
        """Bytes of the fingerprints on the wire."""
        return int(self.filter.fingerprints.nbytes)

    def flips(self, universe: int) -> np.ndarray:
        """Boolean membership of every position ``0..universe-1`` (false positives included)."""
        return query_universe(self.filter, universe)


@dataclass(frozen=True)
class ExactFlips:
    """deltamask-exact (and the context flip codes of every mask method): the sorted flipped positions, decoded exactly."""

    positions: np.ndarray  # int64 (context codes: int32 below 2^31 positions)
    nbytes: int  # bytes of the position code on the wire
    bound_bits: float | None = None  # the code's own bound (context codes: H(flips | context)); None: log2 C(n, N)

    @property
    def keys(self) -> int:
        """How many positions the client sent."""
        return int(self.positions.size)

    def flips(self, universe: int) -> np.ndarray:
        """The positions to flip (an index array: no false positives)."""
        return self.positions


MaskCode = Union[SampledMask, FilterFlips, ExactFlips]


@dataclass(frozen=True)
class MaskUpdate:
    """A mask method's upload: example count, head delta and the decoded mask code."""

    n: int
    head_delta: Tensors
    mask: MaskCode


@dataclass(frozen=True)
class ZOUpdate:
    """DeComFL: one client's K×P float32 scalars (row = local step, column = perturbation)."""

    scalars: np.ndarray


def example_count(n: object, client: int, partition_sizes: list[int], what: str = "client update") -> int:
    """A client's reported example count ``n``, checked against what the server assigned it.

    ``n`` must be an int in ``[1, partition_sizes[client]]``: a client claiming more examples than
    its partition holds would take more than its share of the weighted mean. Anything else is a
    PayloadError.
    """
    if type(n) is not int or n < 1:
        raise PayloadError(f"{what} carries no valid example count (n={n!r})")
    if type(client) is not int or not 0 <= client < len(partition_sizes):
        raise PayloadError(f"{what} comes from client {client!r}, which has no partition")
    if n > partition_sizes[client]:
        raise PayloadError(f"{what} claims n={n} examples; client {client}'s partition holds {partition_sizes[client]}")
    return n


def stepped(weights: np.ndarray, step: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """``weights + step`` summed in float64, then in ``dtype``; a value beyond its range becomes ±inf.

    No warning for that: the round engine refuses a state that is not finite (runtime/integrity.py).
    """
    with np.errstate(over="ignore"):
        return (np.asarray(weights, dtype=np.float64) + step).astype(dtype)


MEAN_BLOCK = 1 << 18  # coordinates per block of weighted_mean: 2 MiB of float64 sum, 2 MiB of product


def weighted_mean(arrays: Sequence[np.ndarray], counts: Sequence[int], dtype: type = np.float64, block: int = MEAN_BLOCK) -> np.ndarray:
    """``Σ n_i·a_i / Σ n_i`` (FedAvg's mean), accumulated in float64 and returned in ``dtype``.

    A convex combination of float32 arrays cannot overflow float64, so the mean of finite client
    tensors is finite however close to float32's 3.4e38 they are (a float32 sum could round to inf).
    It is computed one block of ``block`` coordinates at a time (the same float64 operations in the
    same order per coordinate, so the block size never changes a bit): the server's FedAvg mean
    then holds its result and two float64 blocks, instead of 8 bytes per value for a float64 mean
    plus 16 more for each client's float64 copy and product (~2.9 GB for one 1e8-value tensor).
    """
    if block < 1:
        raise ValueError(f"block must be at least 1, got {block}")
    shape = np.shape(arrays[0])
    flats = [np.asarray(a).reshape(-1) for a in arrays]  # views: decoded tensors are contiguous
    out: np.ndarray = np.empty(flats[0].size, dtype)
    total = float(sum(counts))
    acc = np.empty(min(block, out.size), np.float64)
    prod = np.empty_like(acc)
    for start in range(0, out.size, block):
        stop = min(start + block, out.size)
        a, t = acc[: stop - start], prod[: stop - start]
        a.fill(0.0)
        for f, n in zip(flats, counts):
            np.multiply(f[start:stop], n / total, out=t, dtype=np.float64)
            a += t
        out[start:stop] = a
    return out.reshape(shape)


def weighted_mean_f32(arrays: Sequence[np.ndarray], counts: Sequence[int], block: int = MEAN_BLOCK) -> np.ndarray:
    """:func:`weighted_mean` in float32 (FedAvg's new weights: a convex combination stays in range)."""
    return weighted_mean(arrays, counts, np.float32, block)


U = TypeVar("U")


def of_type(updates: Mapping[int, object], cls: type[U]) -> list[U]:
    """The updates' values, each checked to be a ``cls`` (what this round's decode_update makes)."""
    wrong = [c for c, u in updates.items() if not isinstance(u, cls)]
    if wrong:
        raise TypeError(f"clients {wrong} sent no {cls.__name__} (updates decoded for another round?)")
    return [u for u in updates.values() if isinstance(u, cls)]
