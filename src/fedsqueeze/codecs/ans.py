"""Entropy coding with rANS (the ``constriction`` package): binary masks and small-alphabet symbols.

* :func:`encode_grouped_bits` codes a bit vector whose positions fall into groups known to both
  sides (e.g. the level of the global mask probability at each position). Per group the sender
  states how many ones it holds; each group is then coded with a static Bernoulli model at that
  empirical frequency, so the cost is ``sum_g n_g H(ones_g / n_g)`` bits plus ~32 bits of ANS state.
  Groups that are all zeros or all ones cost nothing.
* :func:`encode_symbols` codes symbols in ``[0, alphabet)`` with a static categorical model whose
  histogram travels in the header.

Both return ``(meta, body)`` where body is the ANS word stream (uint32, little endian).
Constriction's ``perfect=False`` models are bit-identical on both sides for identical float inputs.
"""

from __future__ import annotations

from typing import Any

import constriction
import numpy as np

from fedsqueeze.errors import PayloadError

_MAX_ALPHABET = 1 << 16


def _words(coder: constriction.stream.stack.AnsCoder) -> bytes:
    return coder.get_compressed().astype("<u4").tobytes()


def _coder_from(body: memoryview | bytes) -> constriction.stream.stack.AnsCoder:
    if len(body) % 4:
        raise PayloadError(f"ANS stream of {len(body)} bytes is not a whole number of 32-bit words")
    words = np.frombuffer(body, dtype="<u4").astype(np.uint32)
    try:
        return constriction.stream.stack.AnsCoder(words)
    except Exception as exc:  # constriction rejects a stream whose last word is zero
        raise PayloadError(f"invalid ANS stream: {exc}") from exc


def _bernoulli(ones: int, n: int) -> constriction.stream.model.Categorical:
    p = ones / n
    return constriction.stream.model.Categorical(np.array([1.0 - p, p]), perfect=False)


def encode_grouped_bits(bits: np.ndarray, groups: np.ndarray, num_groups: int) -> tuple[dict[str, Any], bytes]:
    """Code ``bits`` (bool) group by group; ``groups[i]`` in ``[0, num_groups)`` is known to the decoder."""
    order = np.argsort(groups, kind="stable")
    sizes = np.bincount(groups, minlength=num_groups)
    ones = np.bincount(groups, weights=bits.astype(np.float64), minlength=num_groups).astype(np.int64)
    sorted_bits = bits[order].astype(np.int32)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    coder = constriction.stream.stack.AnsCoder()
    for g in range(num_groups - 1, -1, -1):  # a stack: encode last group first, decode first group first
        if 0 < ones[g] < sizes[g]:
            coder.encode_reverse(sorted_bits[bounds[g] : bounds[g + 1]], _bernoulli(int(ones[g]), int(sizes[g])))
    return {"ones": ones.tolist()}, _words(coder)


def decode_grouped_bits(meta: dict[str, Any], body: memoryview | bytes, groups: np.ndarray, num_groups: int) -> np.ndarray:
    """Invert :func:`encode_grouped_bits` given the same ``groups``."""
    ones = meta.get("ones")
    sizes = np.bincount(groups, minlength=num_groups)
    if not (isinstance(ones, list) and len(ones) == num_groups and all(isinstance(o, int) for o in ones)):
        raise PayloadError("mask header has no valid per-group counts of ones")
    if any(not 0 <= o <= s for o, s in zip(ones, sizes.tolist())):
        raise PayloadError("mask header counts more ones than a group holds")
    coder = _coder_from(body)
    order = np.argsort(groups, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    sorted_bits = np.zeros(groups.size, dtype=bool)
    try:
        for g in range(num_groups):
            lo, hi = int(bounds[g]), int(bounds[g + 1])
            if ones[g] == sizes[g]:
                sorted_bits[lo:hi] = True
            elif ones[g] > 0:
                sorted_bits[lo:hi] = coder.decode(_bernoulli(ones[g], int(sizes[g])), hi - lo) == 1
    except Exception as exc:
        raise PayloadError(f"mask ANS stream does not decode: {exc}") from exc
    bits = np.empty(groups.size, dtype=bool)
    bits[order] = sorted_bits
    return bits


def encode_symbols(symbols: np.ndarray, alphabet: int) -> tuple[dict[str, Any], bytes]:
    """Code integer ``symbols`` in ``[0, alphabet)`` with their own histogram as a static model."""
    hist = np.bincount(symbols, minlength=alphabet)
    used = np.flatnonzero(hist)
    coder = constriction.stream.stack.AnsCoder()
    if used.size > 1:
        model = constriction.stream.model.Categorical(hist / hist.sum(), perfect=False)
        coder.encode_reverse(symbols.astype(np.int32), model)
    return {"hist": hist.tolist()}, _words(coder)


def decode_symbols(meta: dict[str, Any], body: memoryview | bytes, count: int, alphabet: int) -> np.ndarray:
    """Invert :func:`encode_symbols`; ``count`` and ``alphabet`` come from the caller, not the peer."""
    if not isinstance(meta, dict):  # a peer's header field, e.g. "theta": null
        raise PayloadError(f"symbol header must be an object, got {type(meta).__name__}")
    hist = meta.get("hist")
    if not (
        isinstance(hist, list)
        and len(hist) == alphabet <= _MAX_ALPHABET
        and all(isinstance(h, int) and h >= 0 for h in hist)
        and sum(hist) == count
    ):
        raise PayloadError(f"symbol histogram is invalid for {count} symbols over {alphabet} values")
    used = [i for i, h in enumerate(hist) if h]
    if len(used) <= 1:
        return np.full(count, used[0] if used else 0, dtype=np.int64)
    coder = _coder_from(body)
    try:
        model = constriction.stream.model.Categorical(np.asarray(hist, dtype=np.float64) / count, perfect=False)
        out = coder.decode(model, count).astype(np.int64)
    except Exception as exc:
        raise PayloadError(f"symbol ANS stream does not decode: {exc}") from exc
    if np.any(np.bincount(out, minlength=alphabet) != np.asarray(hist)):
        raise PayloadError("decoded symbols disagree with their histogram")
    return out
