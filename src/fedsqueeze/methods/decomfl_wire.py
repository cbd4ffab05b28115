"""DeComFL's zeroth-order wire formats (each one frame, see :mod:`fedsqueeze.codecs.framing`).

- uplink ``decomfl-up``: body = K·P float32 scalars (row = step); meta ``round, k, p, n``.
- downlink ``decomfl-down``: body = [warm-start head, if the client lacks it] + R×K uint64 seeds +
  R×K×P float32 averaged scalars of the R missed rounds + K uint64 seeds of this round;
  meta ``round, records (their round numbers), k, p, head``.

The warm-start rounds use the raw tensor codec instead (see :mod:`fedsqueeze.methods.decomfl`).
Decoding checks every field and length against what this round expects and raises PayloadError.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsqueeze.codecs import frame, unframe
from fedsqueeze.errors import PayloadError

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

    @property
    def head_bytes(self) -> int:
        return sum(math.prod(s) for s in self.head_shapes.values()) * self.head_dtype.itemsize


@dataclass(frozen=True)
class ZODownlink:
    """A decoded ``decomfl-down`` message."""

    rounds: list[int]  # the missed rounds' numbers, increasing
    seeds: np.ndarray  # uint64 [R, K]
    scalars: np.ndarray  # float32 [R, K, P], all finite
    head: Tensors | None  # the warm-started head in its wire dtype, if the client lacked it
    round_seeds: np.ndarray  # uint64 [K]: this round's step seeds


def encode_downlink(
    shape: ZOShape,
    round_: int,
    records: Sequence[Mapping[str, Any]],
    round_seeds: np.ndarray,
    head: Tensors | None,
) -> bytes:
    """The ``decomfl-down`` frame: ``records`` are ``{"round", "seeds", "scalars"}``, oldest first."""
    parts = [head[n].tobytes() for n in shape.head_shapes] if head is not None else []
    parts += [r["seeds"].astype("<u8").tobytes() for r in records]
    parts += [r["scalars"].astype("<f4").tobytes() for r in records]
    parts.append(round_seeds.astype("<u8").tobytes())
    meta = {"round": round_, "records": [r["round"] for r in records], "k": shape.k, "p": shape.p, "head": head is not None}
    return frame(DOWN_KIND, meta, b"".join(parts))


def decode_downlink(message: bytes, shape: ZOShape, round_: int) -> ZODownlink:
    """Parse and check a ``decomfl-down`` frame for ``round_``."""
    k, p = shape.k, shape.p
    _, meta, body = unframe(message, expect_kind=DOWN_KIND)
    rounds = meta.get("records")
    if meta.get("round") != round_ or meta.get("k") != k or meta.get("p") != p:
        raise PayloadError("server message is for another round or another K/P")
    if not (isinstance(rounds, list) and all(isinstance(r, int) for r in rounds) and rounds == sorted(set(rounds))):
        raise PayloadError("server message has a malformed record list")
    head_bytes = shape.head_bytes if meta.get("head") is True else 0
    n = len(rounds)
    need = head_bytes + n * k * 8 + n * k * p * 4 + k * 8
    if len(body) != need:
        raise PayloadError(f"server message body is {len(body)} bytes, expected {need}")
    head = _read_head(body[:head_bytes], shape) if head_bytes else None
    pos = head_bytes
    seeds = np.frombuffer(body[pos : pos + n * k * 8], dtype="<u8").reshape(n, k)
    pos += n * k * 8
    scalars = np.frombuffer(body[pos : pos + n * k * p * 4], dtype="<f4").reshape(n, k, p)
    pos += n * k * p * 4
    if not np.all(np.isfinite(scalars)):
        raise PayloadError("server message holds NaN or infinite scalars")
    return ZODownlink(rounds, seeds, scalars, head, np.frombuffer(body[pos:], dtype="<u8").copy())


def _read_head(body: memoryview, shape: ZOShape) -> Tensors:
    """The head tensors, in wire order, from exactly ``shape.head_bytes`` bytes."""
    dtype = shape.head_dtype.newbyteorder("<")
    head, pos = {}, 0
    for name, dims in shape.head_shapes.items():
        size = math.prod(dims) * dtype.itemsize
        head[name] = np.frombuffer(body[pos : pos + size], dtype=dtype).reshape(dims)
        pos += size
    return head


def encode_uplink(shape: ZOShape, round_: int, n: int, scalars: np.ndarray) -> bytes:
    """The ``decomfl-up`` frame of one client's K×P scalars (``n`` = its number of examples)."""
    return frame(UP_KIND, {"round": round_, "k": shape.k, "p": shape.p, "n": n}, scalars.astype("<f4").tobytes())


def decode_uplink(payload: bytes, shape: ZOShape, round_: int) -> np.ndarray:
    """The K×P float32 scalars of a ``decomfl-up`` frame for ``round_``, all finite."""
    size = shape.k * shape.p * 4
    _, meta, body = unframe(payload, expect_kind=UP_KIND, max_body_bytes=size)
    if meta.get("round") != round_ or meta.get("k") != shape.k or meta.get("p") != shape.p:
        raise PayloadError(f"update is for round {meta.get('round')} with K={meta.get('k')}, P={meta.get('p')}")
    if len(body) != size:
        raise PayloadError(f"update body is {len(body)} bytes, expected {size}")
    scalars = np.frombuffer(body, dtype="<f4").reshape(shape.k, shape.p).astype(np.float32)
    if not np.all(np.isfinite(scalars)):
        raise PayloadError("update holds NaN or infinite scalars")
    return scalars
