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
``k_c``, each in ``bit_length(n_c)`` bits (both sides know every context's size ``n_c``; a JSON
list of 64 counts would cost more than the whole code of a small model's flips), then the ANS
words. The decoder checks the counts against the context sizes and a cap on the flips before
decoding, and the ANS stream against what the counts can need.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedsqueeze.codecs.ans import bernoulli_bits, decode_grouped_bits, encode_grouped_bits, grouped_bits_cap
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


def context_sizes(contexts: np.ndarray) -> np.ndarray:
    """How many positions each context holds."""
    return np.bincount(contexts, minlength=NUM_CONTEXTS)


def flip_bound_bits(flips: np.ndarray, contexts: np.ndarray) -> float:
    """``Σ_c n_c H(k_c / n_c)``: the empirical conditional entropy of the flip bits given the contexts, in bits."""
    ones = np.bincount(contexts[flips], minlength=NUM_CONTEXTS)
    return bernoulli_bits(ones, context_sizes(contexts))


def _count_widths(sizes: np.ndarray) -> np.ndarray:
    """Bits of each context's flip count: enough for any count in ``[0, n_c]`` (0 bits for an empty context)."""
    return np.array([int(s).bit_length() for s in sizes], dtype=np.int64)


def pack_counts(ones: np.ndarray, sizes: np.ndarray) -> bytes:
    """The per-context flip counts, each in ``bit_length(n_c)`` bits (the decoder knows every ``n_c``)."""
    bits = [np.array([(int(k) >> j) & 1 for j in range(w - 1, -1, -1)], dtype=np.uint8) for k, w in zip(ones, _count_widths(sizes))]
    return np.packbits(np.concatenate([np.zeros(0, np.uint8), *bits])).tobytes()


def unpack_counts(body: memoryview | bytes, sizes: np.ndarray) -> tuple[list[int], int]:
    """``(counts, bytes read)`` of :func:`pack_counts`; each count must fit its context."""
    widths = _count_widths(sizes)
    nbytes = (int(widths.sum()) + 7) // 8
    if len(body) < nbytes:
        raise PayloadError(f"flip code of {len(body)} bytes is shorter than its {nbytes} bytes of counts")
    bits = np.unpackbits(np.frombuffer(body[:nbytes], dtype=np.uint8), count=int(widths.sum())).astype(np.int64)
    counts, pos = [], 0
    for w, n_c in zip(widths.tolist(), sizes.tolist()):
        k = int(np.dot(bits[pos : pos + w], 1 << np.arange(w - 1, -1, -1, dtype=np.int64))) if w else 0
        if k > n_c:
            raise PayloadError(f"flip code counts {k} flips in a context of {n_c} positions")
        counts.append(k)
        pos += w
    return counts, nbytes


def encode_flips(flips: np.ndarray, contexts: np.ndarray) -> tuple[dict[str, Any], bytes]:
    """Code the bool ``flips`` (one per position) given the ``contexts`` both sides know.

    Body: the per-context flip counts (:func:`pack_counts`), then the ANS words.
    """
    meta, words = encode_grouped_bits(np.asarray(flips, dtype=bool), contexts, NUM_CONTEXTS)
    return {"coder": "context"}, pack_counts(np.asarray(meta["ones"]), context_sizes(contexts)) + words


def decode_flips(meta: Any, body: memoryview | bytes, contexts: np.ndarray, max_flips: int) -> np.ndarray:
    """The flipped positions (sorted int64) of :func:`encode_flips`; at most ``max_flips`` of them."""
    if not isinstance(meta, dict) or meta.get("coder") != "context":
        raise PayloadError(f"flip code header is not a context code: {str(meta)[:80]}")
    ones, start = unpack_counts(body, context_sizes(contexts))
    if sum(ones) > max_flips:
        raise PayloadError(f"flip code claims {sum(ones)} flips, more than the {max_flips} this round allows")
    bits = decode_grouped_bits({"ones": ones}, body[start:], contexts, NUM_CONTEXTS)
    return np.flatnonzero(bits)


def flips_cap_bytes(n: int, max_flips: int) -> int:
    """The most bytes an honest code of at most ``max_flips`` flips among ``n`` positions takes.

    Conditioning never raises entropy: ``n · H(F | C) <= n · H(N / n)`` for ``N`` flips, which grows
    with ``N`` up to ``n / 2``.
    """
    p = min(max_flips / n, 0.5) if n else 0.0
    h = 0.0 if p <= 0 else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
    counts = NUM_CONTEXTS * max(n, 1).bit_length() // 8 + 1
    return counts + grouped_bits_cap(n * h, NUM_CONTEXTS)


def flips_meta_bytes() -> int:
    """A cap on the JSON header of a flip code: the coder's name."""
    return 32
