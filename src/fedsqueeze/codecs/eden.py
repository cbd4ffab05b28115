"""EDEN / DRIVE (Vargaftik et al., 2021–22): random rotation, one bit per value, one scale per chunk.

Each float tensor is flattened, zero-padded and cut into chunks of ``C`` values (``C`` = ``chunk``,
or the next power of two of at least 8 above the tensor's size when that is smaller). A chunk ``x`` is rotated by
``R = H·D`` (``D``: random ±1 diagonal from the seed, ``H``: orthonormal Walsh–Hadamard), so its
coordinates look Gaussian whatever ``x`` was; ``r = R x`` travels as its signs and the scale
``S = ||x||² / ||r||_1``. The decoder rebuilds ``x̂ = Rᵀ (S · sign(r))``. That scale makes
``<x, x̂> = ||x||²`` (the rotated projection is exact), the property EDEN's unbiasedness rests on;
the normalized error ``||x - x̂||² / ||x||²`` is about ``π/2 - 1 ≈ 0.57``.

The seed that draws ``D`` is written in the header (it is the round's shared seed for this
sender), so the receiver needs no side channel. Transforms run in torch (vectorized over chunks).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import torch

from fedsqueeze.codecs.base import (
    Codec,
    CodecContext,
    Tensors,
    check_table,
    codec_option,
    is_float,
    register_codec,
    split_body,
    tensor_table,
)
from fedsqueeze.codecs.sign import unpack_signs
from fedsqueeze.codecs.zstd import pack_lossless, unpack_lossless
from fedsqueeze.errors import ConfigError, PayloadError

MAX_CHUNK = 1 << 20


@dataclass
class EdenOptions:
    chunk: int = codec_option(4096, "rotation block size (a power of two): one scale per block")

    def validate(self) -> None:
        if not (8 <= self.chunk <= MAX_CHUNK and self.chunk & (self.chunk - 1) == 0):
            raise ConfigError(f"eden chunk must be a power of two in [8, 2**20], got {self.chunk}")


def chunk_size(numel: int, chunk: int) -> int:
    """The block size for a tensor of ``numel`` values: ``chunk``, or the power of two (>= 8) covering it."""
    return min(chunk, 1 << max(3, (numel - 1).bit_length()))  # >= 8: whole bytes of sign bits


@cache
def hadamard_matrix(n: int) -> torch.Tensor:
    """The orthonormal Sylvester–Hadamard matrix of order ``n`` (a power of two), float32."""
    h = np.ones((1, 1), dtype=np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return torch.from_numpy(h / np.sqrt(n, dtype=np.float32))


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh–Hadamard transform of each row of ``x`` (rows of power-of-two length).

    ``H_C = H_A ⊗ H_B`` with ``C = A·B``, so a row seen as an A×B matrix ``X`` maps to ``H_A X H_B``:
    two small matrix products instead of log2(C) passes over memory. ``H`` is symmetric and its own
    inverse, so the same call undoes it.
    """
    rows, c = x.shape
    m = c.bit_length() - 1
    ha, hb = hadamard_matrix(1 << (m // 2)), hadamard_matrix(1 << (m - m // 2))
    return (ha @ x.reshape(rows, ha.shape[0], hb.shape[0]) @ hb).reshape(rows, c)


def rademacher(gen: torch.Generator, n: int) -> torch.Tensor:
    """``n`` random ±1.0 values (float32)."""
    return torch.randint(0, 2, (n,), generator=gen, dtype=torch.int8).float() * 2.0 - 1.0


def blocks(a: np.ndarray, c: int) -> torch.Tensor:
    """``a`` flattened and zero-padded into rows of ``c`` values (float32)."""
    flat = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32).reshape(-1))
    pad = (-flat.numel()) % c
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, c)


@register_codec
class EdenCodec(Codec):
    """Randomized Hadamard rotation + 1 bit + a scale per block."""

    codec_id = "eden"
    lossless = False
    for_weights = False
    Options = EdenOptions

    def encode(self, tensors: Tensors, ctx: CodecContext) -> tuple[dict[str, Any], bytes]:
        floats = {n: a for n, a in tensors.items() if is_float(a) and a.size > 0}
        exact = {n: a for n, a in tensors.items() if n not in floats}
        seed = int(ctx.seed) & ((1 << 63) - 1)
        gen = torch.Generator().manual_seed(seed)
        scales, bits = [], []
        for a in floats.values():
            c = chunk_size(a.size, self.opts.chunk)
            x = blocks(a, c)
            r = hadamard(x * rademacher(gen, x.numel()).view_as(x))
            l1 = r.abs().sum(dim=1, dtype=torch.float64)
            sq = (x.double() ** 2).sum(dim=1)
            scales.append(torch.where(l1 > 0, sq / torch.where(l1 > 0, l1, 1.0), 0.0).float().numpy())
            bits.append(np.packbits((r >= 0).numpy().reshape(-1), bitorder="little").tobytes())
        s_bytes = np.concatenate(scales).astype("<f4").tobytes() if scales else b""
        b_bytes = b"".join(bits)
        exact_table, e_blob = pack_lossless(exact)
        meta = {
            "rotated": tensor_table(floats),
            "exact": exact_table,
            "chunk": self.opts.chunk,
            "seed": seed,
            "lengths": [len(s_bytes), len(b_bytes), len(e_blob)],
        }
        return meta, b"".join([s_bytes, b_bytes, e_blob])

    def check_header(self, meta: dict[str, Any]) -> None:
        if meta.get("chunk") != self.opts.chunk:
            raise PayloadError(f"eden payload declares chunk={meta.get('chunk')!r}; this side uses chunk={self.opts.chunk}")

    def decode(self, meta: dict[str, Any], body: memoryview, ctx: CodecContext) -> Tensors:
        rows = check_table(meta.get("rotated"), ctx)
        chunk, seed = meta.get("chunk"), meta.get("seed")
        if not (isinstance(chunk, int) and 8 <= chunk <= MAX_CHUNK and chunk & (chunk - 1) == 0):
            raise PayloadError("eden payload has a bad chunk size")
        if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 1 << 63):
            raise PayloadError("eden payload has a bad seed")
        if any(numel == 0 or not np.issubdtype(dt, np.floating) for _, dt, _, numel in rows):
            raise PayloadError("eden payload declares an empty or non-float tensor")
        sizes = [chunk_size(numel, chunk) for *_, numel in rows]
        n_blocks = [-(-numel // c) for (*_, numel), c in zip(rows, sizes)]
        s_bytes, b_bytes, e_blob = split_body(body, meta.get("lengths"), 3)
        if len(s_bytes) != 4 * sum(n_blocks) or len(b_bytes) != sum(nb * c // 8 for nb, c in zip(n_blocks, sizes)):
            raise PayloadError("eden payload parts have the wrong lengths")
        scales = np.frombuffer(s_bytes, "<f4")
        if not np.isfinite(scales).all() or (scales < 0).any():
            raise PayloadError("eden payload holds an invalid scale")
        out = unpack_lossless(meta.get("exact"), e_blob, ctx.budget(sum(r[3] for r in rows)))
        gen = torch.Generator().manual_seed(seed)
        s_pos = b_pos = 0
        for (name, dt, shape, numel), c, nb in zip(rows, sizes, n_blocks):
            if name in out:
                raise PayloadError(f"tensor {name!r} appears twice in the eden payload")
            signs = torch.from_numpy(unpack_signs(b_bytes[b_pos : b_pos + nb * c // 8], nb * c)).view(nb, c)
            q = signs * torch.from_numpy(scales[s_pos : s_pos + nb].copy())[:, None]
            x = hadamard(q) * rademacher(gen, nb * c).view(nb, c)
            out[name] = x.reshape(-1)[:numel].numpy().astype(dt, copy=False).reshape(shape)
            s_pos += nb
            b_pos += nb * c // 8
        return out
