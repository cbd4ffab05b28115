"""DeComFL's zeroth-order wire formats, in compact frames (:mod:`fedsqueeze.methods.zo_wire`).

Every step seed is a function of the run seed and the round, and K and P come from the run
config, so neither travels: a message holds only its scalars. P may change at set rounds
(``adjust_perturb``); it is then a function of the round, the same on both ends, and each record
and upload holds K·P(round) scalars.

- uplink ``decomfl-up``: no fields; body = the client's K·P float32 scalars (row = step).
- downlink ``decomfl-down``: fields = ``head`` (0/1) + the missed records' rounds as runs; body =
  [the warm-start head, if the client lacks it] + R×K×P float32 averaged scalars of the R records.

Information content: 4·K·P bytes up; 4·K·P·R bytes (+ the head once) down. Each message costs
that + 7–12 bytes (tag, round, counts, CRC-32); ``tests/test_decomfl.py`` checks the bound.
The warm-start rounds use the raw tensor codec instead (see :mod:`fedsqueeze.methods.decomfl`).
Decoding checks every field and length against what this round expects and raises PayloadError.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsqueeze.errors import PayloadError
from fedsqueeze.methods.zo_wire import compact_frame, compact_unframe, decode_runs, encode_runs

Tensors = dict[str, np.ndarray]
UP_KIND = "decomfl-up"
DOWN_KIND = "decomfl-down"


@dataclass(frozen=True)
class ZOShape:
    """What both sides know of the zeroth-order messages: K steps, P perturbations, the head's layout."""

    k: int
    p: int
    head_shapes: Mapping[str, tuple[int, ...]]  # in wire order
    head_dtype: np.dtype
    max_records: int  # the run's number of rounds: no message can carry more records
    changes: tuple[tuple[int, int], ...] = ()  # (round, P from that round on), increasing rounds

    def p_at(self, round_: int) -> int:
        """P of ``round_``: the last change at or before it, else the base ``p``."""
        p = self.p
        for start, value in self.changes:
            if start <= round_:
                p = value
        return p

    @property
    def head_bytes(self) -> int:
        return sum(math.prod(s) for s in self.head_shapes.values()) * self.head_dtype.itemsize


@dataclass(frozen=True)
class ZODownlink:
    """A decoded ``decomfl-down`` message."""

    rounds: list[int]  # the missed rounds' numbers, increasing
    scalars: list[np.ndarray]  # R float32 arrays [K, P(round)], all finite
    head: Tensors | None  # the warm-started head in its wire dtype, if the client lacked it


def encode_downlink(shape: ZOShape, round_: int, records: Sequence[Mapping[str, Any]], head: Tensors | None) -> bytes:
    """The ``decomfl-down`` message: ``records`` are ``{"round", "scalars"}``, oldest first."""
    parts = [head[n].astype(shape.head_dtype.newbyteorder("<")).tobytes() for n in shape.head_shapes] if head is not None else []
    parts += [r["scalars"].astype("<f4").tobytes() for r in records]
    fields = [int(head is not None)] + encode_runs([int(r["round"]) for r in records], round_)
    return compact_frame(DOWN_KIND, round_, fields, b"".join(parts))


def decode_downlink(message: bytes, shape: ZOShape, round_: int) -> ZODownlink:
    """Parse and check a ``decomfl-down`` message for ``round_``."""
    reader = compact_unframe(message, DOWN_KIND, round_)
    has_head = reader.varint(1)
    rounds = decode_runs(reader, round_, shape.max_records)
    head = read_head(reader.take(shape.head_bytes), shape) if has_head else None
    scalars = [read_finite(reader.take(shape.k * shape.p_at(r) * 4), (shape.k, shape.p_at(r))) for r in rounds]
    reader.end()
    return ZODownlink(rounds, scalars, head)


def read_finite(body: memoryview, dims: tuple[int, ...]) -> np.ndarray:
    """float32 values of ``dims`` from exactly their bytes; PayloadError if any is NaN or infinite."""
    values = np.frombuffer(body, dtype="<f4").reshape(dims).astype(np.float32)
    if not np.all(np.isfinite(values)):
        raise PayloadError("message holds NaN or infinite scalars")
    return values


def read_head(body: memoryview, shape: ZOShape) -> Tensors:
    """The head tensors, in wire order, from exactly ``shape.head_bytes`` bytes."""
    dtype = shape.head_dtype.newbyteorder("<")
    head, pos = {}, 0
    for name, dims in shape.head_shapes.items():
        size = math.prod(dims) * dtype.itemsize
        head[name] = np.frombuffer(body[pos : pos + size], dtype=dtype).reshape(dims).astype(shape.head_dtype)
        pos += size
    return head


def encode_uplink(shape: ZOShape, round_: int, scalars: np.ndarray) -> bytes:
    """The ``decomfl-up`` message of one client's K×P scalars."""
    return compact_frame(UP_KIND, round_, [], scalars.astype("<f4").tobytes())


def decode_uplink(payload: bytes, shape: ZOShape, round_: int) -> np.ndarray:
    """The K×P float32 scalars of a ``decomfl-up`` message for ``round_``, all finite."""
    reader = compact_unframe(payload, UP_KIND, round_)
    p = shape.p_at(round_)
    scalars = read_finite(reader.take(shape.k * p * 4), (shape.k, p))
    reader.end()
    return scalars
