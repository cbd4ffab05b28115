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

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, Union

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


def _fold(acc: np.ndarray, values: np.ndarray, n: int, scratch: np.ndarray) -> None:
    """``acc += n·values`` in float64 (``scratch``: a float64 buffer of ``acc``'s size).

    The one kernel of FedAvg's sum, shared by the blocked mean and the streamed one, so both make
    the same float64 operations in the same order per coordinate. ``n·values`` is exact for a
    float32 value and a count below 2^29 (24 + 29 ≤ 53 significant bits).
    """
    np.multiply(values, n, out=scratch, dtype=np.float64)
    acc += scratch


def weighted_mean(arrays: Sequence[np.ndarray], counts: Sequence[int], dtype: type = np.float64, block: int = MEAN_BLOCK) -> np.ndarray:
    """``(Σ n_i·a_i) / Σ n_i`` (FedAvg's mean), summed in float64 in the given order, divided once,
    and returned in ``dtype``.

    The sum of ``n_i·a_i`` needs no weight before the last update is in, so a server can fold each
    client's update into it as it arrives (:class:`WeightedSum`) and get these very bits.
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
            _fold(a, f[start:stop], n, t)
        np.divide(a, total, out=a)
        out[start:stop] = a
    return out.reshape(shape)


def weighted_mean_f32(arrays: Sequence[np.ndarray], counts: Sequence[int], block: int = MEAN_BLOCK) -> np.ndarray:
    """:func:`weighted_mean` in float32 (FedAvg's new weights: a convex combination stays in range)."""
    return weighted_mean(arrays, counts, np.float32, block)


class WeightedSum:
    """FedAvg's mean of named tensors, folded in one client update at a time.

    Holds ``Σ n_i·δ_i`` per tensor in float64 (8 bytes per value) and ``Σ n_i``; a server that
    folds each decoded update in as it arrives, then drops it, holds this sum and one update
    instead of every update of the round. :meth:`mean` gives :func:`weighted_mean`'s bits for
    the same updates in the same order (the same kernel, block by block).
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], block: int = MEAN_BLOCK) -> None:
        self.shapes = dict(shapes)
        self.block = block
        self.sums: dict[str, np.ndarray] = {name: np.zeros(math.prod(s), np.float64) for name, s in self.shapes.items()}
        self.total = 0
        self.count = 0  # updates folded in

    def add(self, tensors: Mapping[str, np.ndarray], n: int) -> None:
        """Fold ``n·tensors`` into the sums (``tensors`` has exactly the named shapes)."""
        scratch = np.empty(min(self.block, max((a.size for a in self.sums.values()), default=0)), np.float64)
        for name, acc in self.sums.items():
            flat = np.asarray(tensors[name]).reshape(-1)
            for start in range(0, acc.size, self.block):
                stop = min(start + self.block, acc.size)
                _fold(acc[start:stop], flat[start:stop], n, scratch[: stop - start])
        self.total += n
        self.count += 1

    def pop_mean(self, name: str, dtype: type = np.float32) -> np.ndarray:
        """The mean of tensor ``name`` in ``dtype``; its float64 sum is freed (call once per name)."""
        acc = self.sums.pop(name)
        out: np.ndarray = np.empty(acc.size, dtype)
        total = float(self.total)
        for start in range(0, acc.size, self.block):
            stop = min(start + self.block, acc.size)
            a = acc[start:stop]
            np.divide(a, total, out=a)
            out[start:stop] = a
        return out.reshape(self.shapes[name])

    def copy(self) -> WeightedSum:
        """An independent copy (the sums so far)."""
        other = WeightedSum({}, self.block)
        other.shapes, other.total, other.count = dict(self.shapes), self.total, self.count
        other.sums = {name: acc.copy() for name, acc in self.sums.items()}
        return other


class Accumulator(ABC):
    """A method's aggregation of one round attempt, fed one decoded update at a time.

    A method whose rule needs no more than a running sum of the updates (FedAvg's weighted mean
    with its server optimizers, norm bounding, SCAFFOLD, DP-FedAvg) returns one from
    ``accumulator(state, ctx)``; the round engine then folds each client's update in as soon as
    it is decoded and drops it, so the server holds one decoded update and this accumulator,
    not the round's K updates. ``aggregate(state, updates, ctx)`` must equal feeding the updates
    in client order and calling :meth:`finish`, bit for bit. Rules that need every update at
    once (median, trimmed mean, Krum, centered clipping) have none and keep the list path.
    """

    @abstractmethod
    def prepare(self, client: int, update: Any) -> Any:
        """The update as this rule folds it in (e.g. clipped to a norm bound)."""

    @abstractmethod
    def alone(self, client: int, prepared: Any) -> str | None:
        """Where the state would be non-finite if this update alone were aggregated from the
        round's start state (:func:`nonfinite_part`'s path), else None."""

    @abstractmethod
    def add(self, client: int, prepared: Any) -> None:
        """Fold one prepared update in (clients in increasing order)."""

    @abstractmethod
    def copy(self) -> Accumulator:
        """An independent copy of what was folded in so far."""

    @abstractmethod
    def finish(self) -> tuple[Any, dict[str, Any]]:
        """The new server state and the round's metrics; the start state is left as it was."""


U = TypeVar("U")


def of_type(updates: Mapping[int, object], cls: type[U]) -> list[U]:
    """The updates' values, each checked to be a ``cls`` (what this round's decode_update makes)."""
    wrong = [c for c, u in updates.items() if not isinstance(u, cls)]
    if wrong:
        raise TypeError(f"clients {wrong} sent no {cls.__name__} (updates decoded for another round?)")
    return [u for u in updates.values() if isinstance(u, cls)]


def nonfinite_part(tree: Any, where: str = "state") -> str | None:
    """The path of the first float array or number in ``tree`` holding NaN or infinity, else None."""
    if isinstance(tree, np.ndarray):
        if np.issubdtype(tree.dtype, np.floating) and not np.all(np.isfinite(tree)):
            return where
        return None
    if isinstance(tree, (float, np.floating)):
        return None if np.isfinite(tree) else where
    if isinstance(tree, dict):
        items: Any = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return None
    for key, value in items:
        found = nonfinite_part(value, f"{where}[{key!r}]")
        if found is not None:
            return found
    return None
