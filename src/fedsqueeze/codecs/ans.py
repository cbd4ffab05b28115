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

import math
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


def group_order(groups: np.ndarray, num_groups: int, counting: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(order, bounds)``: positions sorted by group, in position order within a group, and the group boundaries.

    A counting sort: the groups are cast to the narrowest unsigned type that holds them, which numpy's
    stable sort orders by radix (linear time) when it is 8 or 16 bits wide. ``counting=False`` keeps
    the int64 key, a comparison sort, O(d log d) (0.58 s of a 1.05 s encode at d = 2.2e7): the same
    order, kept to benchmark and test against.
    """
    narrow = np.uint8 if num_groups <= 1 << 8 else np.uint16 if num_groups <= 1 << 16 else np.int64
    key = groups.astype(narrow if counting else np.int64, copy=False)
    order = np.argsort(key, kind="stable")
    bounds = np.zeros(num_groups + 1, dtype=np.int64)
    np.cumsum(np.bincount(key, minlength=num_groups), out=bounds[1:])
    return order, bounds


def chunk_size(n: int) -> int:
    """Positions per chunk of a bounded decode of ``n`` positions: its temporaries (~24 bytes a
    position) stay a small fraction of ``n``, and the chunks few enough for numpy to do the work."""
    return min(1 << 16, max(1 << 10, n >> 4))


def group_sizes(groups: np.ndarray, num_groups: int) -> np.ndarray:
    """How many positions each group holds (counted a chunk at a time: bincount widens to int64)."""
    sizes = np.zeros(num_groups, dtype=np.int64)
    step = chunk_size(groups.size)
    for lo in range(0, groups.size, step):
        sizes += np.bincount(groups[lo : lo + step], minlength=num_groups)
    return sizes


def bernoulli_bits(ones: list[int] | np.ndarray, sizes: list[int] | np.ndarray) -> float:
    """``Σ_g n_g H(ones_g / n_g)``: the empirical entropy of a grouped bit vector, the bound of its code."""
    o = np.asarray(ones, dtype=np.float64)
    n = np.asarray(sizes, dtype=np.float64)
    coded = (o > 0) & (o < n)
    p = o[coded] / n[coded]
    return float(-(n[coded] * (p * np.log2(p) + (1 - p) * np.log2(1 - p))).sum())


def grouped_bits_cap(entropy_bits: float, coded_groups: int) -> int:
    """The most bytes an honest :func:`encode_grouped_bits` stream takes for ``entropy_bits`` of content.

    rANS with 24-bit quantized probabilities stays well within 1% of the empirical entropy; each
    coded group may add a few bits of quantization loss and the stream ends on a 64-bit state.
    """
    return 4 * (math.ceil((entropy_bits * 1.01 + 32 * coded_groups + 64) / 32) + 1)


_KEY_CHUNK = 1 << 16  # positions per chunk of the encoder's grouping sort: its keys stay in cache
_FEW_GROUPS = 16  # up to this many groups, a chunk's ones are counted group by group


def _unchecked_view(groups: np.ndarray, num_groups: int) -> np.ndarray | None:
    """``groups`` as unsigned (a negative id reads as huge), to check chunk by chunk for an id outside
    ``[0, num_groups)``, which would wrap into another group's keys; None when every value of the
    type is a group."""
    if groups.dtype.kind not in "iu":
        raise ValueError(f"groups must be integers, got {groups.dtype}")
    if groups.dtype.kind == "u" and np.iinfo(groups.dtype).max < num_groups:
        return None
    return groups.view(groups.dtype.str.replace("i", "u"))


def _grouped_chunks(
    bits: np.ndarray, groups: np.ndarray, num_groups: int, step: int = _KEY_CHUNK
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """``(pieces, bounds, ones)``: each chunk of ``step`` positions with its bits ordered by group
    (in position order within a group) as int32 0/1, ``bounds[i, g:g + 2]`` group ``g``'s slice of
    chunk ``i``'s piece, and the count of ones of each group.

    A chunk's bits are ordered by sorting one unsigned key per position, ``group << s | position
    << 1 | bit``: the keys are distinct, so a plain (SIMD) sort of them is the stable grouping, and
    the bit rides along in the low bit (no index array, no gather). A chunk of keys sorts in cache.
    """
    if bits.shape != groups.shape or bits.ndim != 1:
        raise ValueError(f"bits {bits.shape} and groups {groups.shape} must be vectors of one length")
    check = _unchecked_view(groups, num_groups)
    shift = step.bit_length()  # position << 1 | bit fits below it
    key_t: Any = np.uint32 if num_groups <= 1 << (32 - shift) else np.uint64
    low = np.arange(step, dtype=key_t) << key_t(1)
    edges = np.arange(num_groups + 1, dtype=key_t) << key_t(shift)
    chunks = (bits.size + step - 1) // step
    pieces, bounds = [], np.empty((chunks, num_groups + 1), dtype=np.int64)
    sums = np.empty((chunks, num_groups), dtype=np.int64)
    few = num_groups <= _FEW_GROUPS
    for i, lo in enumerate(range(0, bits.size, step)):
        g = groups[lo : lo + step]
        if check is not None and np.maximum.reduce(check[lo : lo + step]) >= num_groups:  # the chunk in cache, not another pass
            raise ValueError(f"groups must lie in [0, {num_groups})")
        buf: Any = np.empty(g.size + 1, dtype=key_t)  # a last 0 after the keys: reduceat may index one past them
        key, buf[-1] = buf[:-1], 0
        np.left_shift(g, shift, out=key, dtype=key_t, casting="unsafe")
        key |= low[: g.size]
        key |= bits[lo : lo + step]
        key.sort()
        bounds[i] = np.searchsorted(key, edges)
        buf &= key_t(1)
        piece = buf.view(np.int32) if key_t is np.uint32 else buf.astype(np.int32)
        if few:  # a SIMD count per group's slice: half reduceat's time for a few groups
            b = bounds[i].tolist()
            sums[i] = [np.count_nonzero(piece[b[j] : b[j + 1]]) for j in range(num_groups)]
        else:  # the sum of each group's slice (an empty group's entry is junk, zeroed below by its size)
            sums[i] = np.add.reduceat(piece, bounds[i, :-1])
        pieces.append(piece)
    sizes = bounds[:, 1:] - bounds[:, :-1]
    ones = np.where(sizes > 0, sums, 0).sum(axis=0)
    return pieces, bounds, ones


def encode_grouped_bits(bits: np.ndarray, groups: np.ndarray, num_groups: int, counting: bool = True) -> tuple[dict[str, Any], bytes]:
    """Code ``bits`` (bool) group by group; ``groups[i]`` in ``[0, num_groups)`` is known to the decoder.

    Each group's bits are coded in position order with one Bernoulli model, last group first (a
    stack: the decoder pops the first group first). ``counting`` chooses how the bits are grouped:
    a chunked key sort (:func:`_grouped_chunks`), fed to the coder a chunk's slice at a time (the
    same stream as one call per group: a stack codes the symbols of a call last to first), or,
    with ``counting=False``, one int64 sort of all the positions (:func:`group_order`), kept to
    test against; the bytes are the same either way.
    """
    bits = np.asarray(bits, dtype=bool)
    coder = constriction.stream.stack.AnsCoder()
    if not counting:
        order, bounds = group_order(groups, num_groups, counting=False)
        sizes = np.diff(bounds)
        ones = np.bincount(groups[bits], minlength=num_groups).astype(np.int64)
        for g in range(num_groups - 1, -1, -1):
            if 0 < ones[g] < sizes[g]:
                coder.encode_reverse(bits[order[bounds[g] : bounds[g + 1]]].astype(np.int32), _bernoulli(int(ones[g]), int(sizes[g])))
        return {"ones": ones.tolist()}, _words(coder)
    pieces, chunk_bounds, ones = _grouped_chunks(bits, groups, num_groups)
    sizes = (chunk_bounds[:, 1:] - chunk_bounds[:, :-1]).sum(axis=0)
    spans = list(zip(pieces, chunk_bounds.tolist()))[::-1]
    for g in range(num_groups - 1, -1, -1):
        if 0 < ones[g] < sizes[g]:
            model = _bernoulli(int(ones[g]), int(sizes[g]))
            for piece, b in spans:  # the last chunk first
                if b[g + 1] > b[g]:
                    coder.encode_reverse(piece[b[g] : b[g + 1]], model)
    return {"ones": ones.tolist()}, _words(coder)


def _grouped_stream(ones: list[int], sizes: list[int], body: memoryview | bytes) -> constriction.stream.stack.AnsCoder:
    """The ANS stream of a grouped bit code, once its length is within what the ``ones`` can need."""
    coded = sum(1 for o, s in zip(ones, sizes) if 0 < o < s)
    cap = grouped_bits_cap(bernoulli_bits(ones, sizes), coded)
    if len(body) > cap:
        raise PayloadError(f"mask ANS stream of {len(body)} bytes is longer than its counts can need ({cap})")
    return _coder_from(body)


def decode_grouped_ranks(ones: list[int], sizes: list[int], body: memoryview | bytes, piece: int, dtype: type = np.int64) -> np.ndarray:
    """The ones of :func:`encode_grouped_bits` as ranks: for each group in turn, the sorted indices
    (within the group, in position order) of its ones; ``sum(ones)`` of them.

    The caller checks ``ones`` against ``sizes`` and bounds their sum. The stream is decoded
    ``piece`` bits at a time, so no temporary grows with a group's size (the same symbols as one
    decode: the stack pops them in order); a group that decodes to another count than its header
    states is refused.
    """
    coder = _grouped_stream(ones, sizes, body)
    out: np.ndarray = np.empty(sum(ones), dtype=dtype)
    at = 0
    try:
        for k, size in zip(ones, sizes):
            if k == size:
                out[at : at + k] = np.arange(k, dtype=dtype)
            elif k > 0:
                model, got = _bernoulli(k, size), 0
                for lo in range(0, size, piece):
                    hits = np.flatnonzero(coder.decode(model, min(piece, size - lo)))
                    if got + hits.size > k:
                        break
                    out[at + got : at + got + hits.size] = hits + lo
                    got += hits.size
                if got != k:
                    raise PayloadError(f"mask ANS stream decodes a group to other than the {k} ones its header states")
            at += k
    except PayloadError:
        raise
    except Exception as exc:
        raise PayloadError(f"mask ANS stream does not decode: {exc}") from exc
    return out


def ranks_to_positions(ranks: np.ndarray, ones: list[int], groups: np.ndarray) -> None:
    """Turn, in place, each group's ranks (the ``j``-th position of group ``g``, counting in position
    order; ``ones[g]`` of them, sorted, group after group) into the positions themselves.

    One pass over ``groups`` a chunk at a time: within a chunk, :func:`group_order` lists each
    group's positions in order, and the ranks that fall in the chunk index into it.
    """
    count = np.asarray(ones, dtype=np.int64)
    ends = np.cumsum(count)
    todo = ends - count  # each group's first rank not yet turned
    seen = np.zeros(count.size, dtype=np.int64)  # each group's positions in earlier chunks
    step = chunk_size(groups.size)
    for lo in range(0, groups.size, step):
        order, bounds = group_order(groups[lo : lo + step], count.size)
        here = np.diff(bounds)
        for g in np.flatnonzero((todo < ends) & (here > 0)).tolist():
            a = int(todo[g])
            # the bound in the ranks' dtype: an int64 one would make searchsorted copy the ranks wide
            b = a + int(np.searchsorted(ranks[a : ends[g]], ranks.dtype.type(seen[g] + here[g])))
            ranks[a:b] = lo + order[bounds[g] + ranks[a:b] - seen[g]]
            todo[g] = b
        seen += here


def decode_grouped_positions(ones: list[int], sizes: list[int], body: memoryview | bytes, groups: np.ndarray) -> np.ndarray:
    """The positions of the ones of :func:`encode_grouped_bits`, group after group (sorted within a
    group): int32 below 2^31 positions. The caller checks ``ones`` against ``sizes`` (the groups'
    sizes) and bounds their sum.

    Memory: the positions and chunk-sized temporaries (:func:`chunk_size`), never a temporary over
    all of ``groups``.
    """
    dtype = np.int32 if groups.size < 1 << 31 else np.int64
    ranks = decode_grouped_ranks(ones, sizes, body, chunk_size(groups.size), dtype)
    ranks_to_positions(ranks, ones, groups)
    return ranks


def decode_grouped_bits(meta: dict[str, Any], body: memoryview | bytes, groups: np.ndarray, num_groups: int) -> np.ndarray:
    """Invert :func:`encode_grouped_bits` given the same ``groups``.

    The body may be no longer than the header's counts can need (:func:`grouped_bits_cap`),
    checked before the stream is read; memory: the bits and the positions of the ones
    (:func:`decode_grouped_positions`).
    """
    ones = meta.get("ones")
    if not (isinstance(ones, list) and len(ones) == num_groups and all(type(o) is int for o in ones)):
        raise PayloadError("mask header has no valid per-group counts of ones")
    sizes = group_sizes(groups, num_groups).tolist()
    if any(not 0 <= o <= s for o, s in zip(ones, sizes)):
        raise PayloadError("mask header counts more ones than a group holds")
    bits = np.zeros(groups.size, dtype=bool)
    positions, step = decode_grouped_positions(ones, sizes, body, groups), chunk_size(groups.size)
    for lo in range(0, positions.size, step):  # in chunks: numpy widens an int32 index to int64
        bits[positions[lo : lo + step]] = True
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
