"""Side-information coding of a mask's flips: ANS of the flip bits, conditioned on what the server knows.

A mask client draws its mask ``m = u < θ_client`` with uniforms ``u`` the server rebuilds from the
round's seed, and the server also rebuilds the reference mask ``r = u < θ_ref`` (θ_ref = the
clipped global θ the client started from). The client's news is only the flips ``f = m xor r``,
and a position can flip only where ``u`` lies between ``θ_ref`` and ``θ_client``: the nearer ``u``
is to ``θ_ref``, the likelier a flip. So both sides put every position in a *context*

    c_i = 2 · bin(|u_i − θ_ref,i|) + r_i,

``bin`` counting half-octaves of ``|u − θ_ref|`` down from 1 (``CONTEXT_BINS`` of them: (3/4, 1]
→ 0, (1/2, 3/4] → 1, (3/8, 1/2] → 2, ..., the last one holding everything below 2^-15), and code the flip bits per context with a Bernoulli model at that context's
empirical flip frequency (:func:`fedsqueeze.codecs.ans.encode_grouped_bits`: rANS, the per-context
flip counts travel in the header). The body costs the empirical conditional entropy

    Σ_c n_c H(k_c / n_c) = n · H(F | C)        (:func:`flip_bound_bits`, the coder's bound)

plus a few bytes of ANS state; with flips concentrated near ``u ≈ θ_ref`` this is well below
``log2 C(n, N)``, the cost of naming N flipped positions with no side information (Rice codes).

The bin is taken from the bit pattern of the float32 ``|u − θ_ref|`` (integer arithmetic on the
exponent and top mantissa bit), so both sides compute the same context from the same float32
inputs, exactly, on any machine.

Wire (the caller frames it): meta ``{"coder": "context"}``; body the per-context flip counts
``k_c`` as Elias-gamma codes of ``k_c + 1`` (one bit for an empty count; contexts both sides know
to be empty are skipped; a JSON list of 64 counts would cost more than the whole code of a small
model's flips), then the ANS words. The decoder checks the counts against the context sizes and a cap on the flips before
decoding, and the ANS stream against what the counts can need.

The server decodes in bounded memory (:func:`decode_flips_counted`): the contexts as one uint8 per
position (built chunk by chunk, :func:`fedsqueeze.codecs.ans.chunk_size`), the flips as int32
positions (:func:`fedsqueeze.codecs.ans.decode_grouped_positions`); no temporary over the whole mask.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from fedsqueeze.codecs.ans import bernoulli_bits, decode_grouped_positions, encode_grouped_bits, group_sizes, grouped_bits_cap
from fedsqueeze.errors import PayloadError

CONTEXT_BINS = 32  # half-octave bins of |u − θ_ref|: 1 down to 2^-16, then one bin for everything nearer
NUM_CONTEXTS = 2 * CONTEXT_BINS
_ONE = 0x3F800000  # float32 1.0 as bits: each half-octave below it is 2^22 further down


def flip_contexts(u: np.ndarray, theta_ref: np.ndarray) -> np.ndarray:
    """Each position's context ``2 · bin(|u − θ_ref|) + (u < θ_ref)`` as uint8, from float32 inputs."""
    d = np.subtract(u, theta_ref, dtype=np.float32)
    ref = d < 0
    np.abs(d, out=d)
    half_octaves = (_ONE - d.view(np.int32)) >> 22  # |d| in (0.5, 1] gives 0 or 1, halving |d| adds 2
    np.clip(half_octaves, 0, CONTEXT_BINS - 1, out=half_octaves)
    ctx = half_octaves.astype(np.uint8)
    ctx <<= 1
    ctx |= ref
    return ctx


def chunked_contexts(n: int, chunks: Iterable[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The contexts of :func:`flip_contexts` of ``n`` positions, from ``(u, θ_ref)`` chunks in order."""
    contexts = np.empty(n, dtype=np.uint8)
    lo = 0
    for u, theta_ref in chunks:
        contexts[lo : lo + u.size] = flip_contexts(u, theta_ref)
        lo += u.size
    if lo != n:
        raise ValueError(f"the chunks cover {lo} positions, not {n}")
    return contexts


def context_sizes(contexts: np.ndarray) -> np.ndarray:
    """How many positions each context holds."""
    return group_sizes(contexts, NUM_CONTEXTS)


def flip_bound_bits(flips: np.ndarray, contexts: np.ndarray) -> float:
    """``Σ_c n_c H(k_c / n_c)``: the empirical conditional entropy of the flip bits given the contexts, in bits."""
    ones = np.bincount(contexts[flips], minlength=NUM_CONTEXTS)
    return bernoulli_bits(ones, context_sizes(contexts))


def pack_counts(ones: np.ndarray, sizes: np.ndarray) -> bytes:
    """The per-context flip counts, each as the Elias-gamma code of ``k_c + 1``.

    Most contexts of a sparse flip set hold no flip, and a zero count costs one bit; a count ``k``
    costs ``2 floor(log2(k + 1)) + 1`` bits. Contexts the decoder knows to be empty are skipped.
    """
    bits: list[int] = []
    for k, n_c in zip(np.asarray(ones).tolist(), np.asarray(sizes).tolist()):
        if n_c == 0:
            continue
        v = int(k) + 1
        width = v.bit_length()
        bits += [0] * (width - 1) + [(v >> j) & 1 for j in range(width - 1, -1, -1)]
    return np.packbits(np.array(bits, dtype=np.uint8)).tobytes()


def unpack_counts(body: memoryview | bytes, sizes: np.ndarray) -> tuple[list[int], int]:
    """``(counts, bytes read)`` of :func:`pack_counts`; each count must fit its context (checked as read)."""
    sizes_list = np.asarray(sizes).tolist()
    # no count needs more than 2 * 64 + 1 bits, so this bounds what is unpacked
    limit = min(len(body), (sum(2 * int(s + 1).bit_length() + 1 for s in sizes_list if s) + 7) // 8)
    bits = np.unpackbits(np.frombuffer(body[:limit], dtype=np.uint8)).tolist()
    counts, pos = [], 0
    for n_c in sizes_list:
        if n_c == 0:
            counts.append(0)
            continue
        zeros = 0
        while pos < len(bits) and bits[pos] == 0 and zeros <= int(n_c + 1).bit_length():
            zeros += 1
            pos += 1
        if pos + zeros + 1 > len(bits) or zeros > int(n_c + 1).bit_length() - 1:
            raise PayloadError("flip code counts are truncated or larger than their contexts")
        v = 0
        for bit in bits[pos : pos + zeros + 1]:
            v = (v << 1) | bit
        pos += zeros + 1
        if v - 1 > n_c:
            raise PayloadError(f"flip code counts {v - 1} flips in a context of {n_c} positions")
        counts.append(v - 1)
    return counts, (pos + 7) // 8


def encode_flips(flips: np.ndarray, contexts: np.ndarray) -> tuple[dict[str, Any], bytes]:
    """Code the bool ``flips`` (one per position) given the ``contexts`` both sides know.

    Body: the per-context flip counts (:func:`pack_counts`), then the ANS words.
    """
    meta, words = encode_grouped_bits(np.asarray(flips, dtype=bool), contexts, NUM_CONTEXTS)
    return {"coder": "context"}, pack_counts(np.asarray(meta["ones"]), context_sizes(contexts)) + words


def decode_flips(meta: Any, body: memoryview | bytes, contexts: np.ndarray, max_flips: int) -> np.ndarray:
    """The flipped positions (sorted) of :func:`encode_flips`; at most ``max_flips`` of them."""
    return decode_flips_counted(meta, body, contexts, max_flips)[0]


def decode_flips_counted(meta: Any, body: memoryview | bytes, contexts: np.ndarray, max_flips: int) -> tuple[np.ndarray, float]:
    """``(positions, bound bits)``: the sorted flipped positions of :func:`encode_flips` (int32 below
    2^31 positions), at most ``max_flips`` of them, and the code's bound ``n · H(F | C)``.

    Memory: the positions and chunk-sized temporaries, besides the caller's ``contexts``.
    """
    if not isinstance(meta, dict) or meta.get("coder") != "context":
        raise PayloadError(f"flip code header is not a context code: {str(meta)[:80]}")
    sizes = context_sizes(contexts)
    ones, start = unpack_counts(body, sizes)
    if sum(ones) > max_flips:
        raise PayloadError(f"flip code claims {sum(ones)} flips, more than the {max_flips} this round allows")
    positions = decode_grouped_positions(ones, sizes.tolist(), body[start:], contexts)
    positions.sort()
    return positions, bernoulli_bits(ones, sizes)


def flips_cap_bytes(n: int, max_flips: int) -> int:
    """The most bytes an honest code of at most ``max_flips`` flips among ``n`` positions takes.

    Conditioning never raises entropy: ``n · H(F | C) <= n · H(N / n)`` for ``N`` flips, which grows
    with ``N`` up to ``n / 2``.
    """
    p = min(max_flips / n, 0.5) if n else 0.0
    h = 0.0 if p <= 0 else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
    counts = NUM_CONTEXTS * (2 * (n + 1).bit_length() + 1) // 8 + 1
    return counts + grouped_bits_cap(n * h, NUM_CONTEXTS)


def flips_meta_bytes() -> int:
    """A cap on the JSON header of a flip code: the coder's name."""
    return 32
