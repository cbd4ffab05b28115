"""Binary fuse and xor filters: built by pyfusefilter's C code, queried over a whole universe in numpy.

A filter holds a set of uint64 keys (here: the positions of a mask that flipped). It answers
"is x in the set?" with no false negatives and a false-positive rate of about 2^-8 (8-bit
fingerprints) or 2^-16 (16-bit). Only the fingerprint array travels, plus a few header fields.

Kinds (``FILTER_KINDS``):

* ``fuse8``  — binary fuse filter, 8-bit fingerprints (~9 bits/key for large sets): the default.
* ``fuse16`` — binary fuse filter, 16-bit fingerprints (~18 bits/key).
* ``xor8``   — xor filter, 8-bit fingerprints (~9.84 bits/key).

Wire format (the caller frames it): meta ``{"kind", "size", "seed", "array_length"}`` and the
fingerprint array as the body (little endian). The receiver never trusts the segment geometry:
it asks the C ``*_allocate(size)`` for it and checks that ``array_length`` and the body length
agree before reading anything.

The server must test *every* position ``0..universe-1``; calling the C ``contain`` once per
position costs ~10 s for 22.7M positions. :func:`query_universe` recomputes the C code's hash
(``binary_fuse_mix_split`` = murmur64 finaliser of ``key + seed``, ``mulhi`` segment choice,
fingerprint ``hash ^ hash >> 32``) with vectorized numpy on uint64 arrays, chunk by chunk, and is
tested position for position against the C ``contain``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from pyfusefilter._xorfilter import ffi, lib

from fedsqueeze.errors import PayloadError

FILTER_KINDS = ("fuse8", "fuse16", "xor8")
_FP_DTYPE = {"fuse8": np.uint8, "fuse16": np.uint16, "xor8": np.uint8}
_CTYPE = {"fuse8": "binary_fuse8_t *", "fuse16": "binary_fuse16_t *", "xor8": "xor8_t *"}
_PREFIX = {"fuse8": "binary_fuse8", "fuse16": "binary_fuse16", "xor8": "xor8"}

_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
_LOW32 = np.uint64(0xFFFFFFFF)
_CHUNK = 1 << 16  # positions per numpy pass: keeps the ~10 temporaries in the L2 cache


@dataclass
class Filter:
    """A filter as it travels: kind, number of keys, hash seed and fingerprint array."""

    kind: str
    size: int
    seed: int
    fingerprints: np.ndarray  # uint8 or uint16, length array_length

    def meta(self) -> dict[str, int | str]:
        return {"kind": self.kind, "size": self.size, "seed": self.seed, "array_length": int(self.fingerprints.size)}

    def body(self) -> bytes:
        return self.fingerprints.astype(self.fingerprints.dtype.newbyteorder("<"), copy=False).tobytes()

    @property
    def bits_per_key(self) -> float:
        return 8.0 * self.fingerprints.nbytes / max(self.size, 1)


def _check_kind(kind: str) -> None:
    if kind not in FILTER_KINDS:
        raise ValueError(f"unknown filter kind {kind!r}; choose one of {FILTER_KINDS}")


class _CFilter:
    """Owns one C filter struct; frees it on exit."""

    def __init__(self, kind: str, size: int) -> None:
        self.kind = kind
        self.ptr = ffi.new(_CTYPE[kind])
        if not getattr(lib, f"{_PREFIX[kind]}_allocate")(size, self.ptr):
            raise MemoryError(f"{kind}: allocation for {size} keys failed")

    def __enter__(self) -> _CFilter:
        return self

    def __exit__(self, *exc) -> None:
        getattr(lib, f"{_PREFIX[self.kind]}_free")(self.ptr)

    def geometry(self) -> dict[str, int]:
        p = self.ptr
        if self.kind == "xor8":
            return {"block_length": int(p.blockLength), "array_length": 3 * int(p.blockLength)}
        return {
            "segment_length": int(p.SegmentLength),
            "segment_length_mask": int(p.SegmentLengthMask),
            "segment_count_length": int(p.SegmentCountLength),
            "array_length": int(p.ArrayLength),
        }

    def fingerprint_view(self) -> np.ndarray:
        n = self.geometry()["array_length"]
        dt = np.dtype(_FP_DTYPE[self.kind])
        ptr = self.ptr.fingerprints if self.kind == "xor8" else self.ptr.Fingerprints
        return np.frombuffer(ffi.buffer(ptr, n * dt.itemsize), dtype=dt)

    def seed(self) -> int:
        return int(self.ptr.seed if self.kind == "xor8" else self.ptr.Seed)


def build_filter(keys: np.ndarray, kind: str = "fuse8") -> Filter:
    """Build a filter over distinct uint64 ``keys`` with the C code of pyfusefilter."""
    _check_kind(kind)
    keys = np.ascontiguousarray(keys, dtype=np.uint64)
    n = int(keys.size)
    if n == 0:
        return Filter(kind, 0, 0, np.zeros(0, dtype=_FP_DTYPE[kind]))
    if n >= 1 << 32:
        raise ValueError("a filter holds fewer than 2^32 keys")
    with _CFilter(kind, n) as cf:
        ok = getattr(lib, f"{_PREFIX[kind]}_populate")(ffi.from_buffer("uint64_t[]", keys), n, cf.ptr)
        if not ok:
            raise ValueError(f"{kind}: construction failed (duplicate keys?)")
        return Filter(kind, n, cf.seed(), cf.fingerprint_view().copy())


def filter_geometry(kind: str, size: int) -> dict[str, int]:
    """Segment geometry the C code derives from the number of keys (trusted, never read from a peer)."""
    _check_kind(kind)
    if size == 0:
        return {"array_length": 0}
    with _CFilter(kind, size) as cf:
        return cf.geometry()


@functools.lru_cache(maxsize=64)
def filter_bytes(kind: str, size: int) -> int:
    """Bytes of the fingerprints of a ``kind`` filter over ``size`` keys (increasing in ``size``; memoized)."""
    return filter_geometry(kind, size)["array_length"] * np.dtype(_FP_DTYPE[kind]).itemsize


def parse_filter(meta: dict, body: memoryview | bytes, max_keys: int, kind: str | None = None) -> Filter:
    """Validate a received filter's header and body; raise PayloadError on anything inconsistent.

    ``kind`` (the receiver's configured filter) is the only kind accepted. The body length must match
    the header's ``array_length`` and ``size`` be at most ``max_keys`` before the C code is asked
    for the geometry of ``size`` keys (which allocates for them).
    """
    got, size, seed, length = (meta.get(k) for k in ("kind", "size", "seed", "array_length"))
    if got not in FILTER_KINDS or (kind is not None and got != kind):
        raise PayloadError(f"filter kind {got!r} where {kind or FILTER_KINDS!r} was expected")
    for name, v, hi in (("size", size, max_keys), ("seed", seed, (1 << 64) - 1), ("array_length", length, 1 << 34)):
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= hi:
            raise PayloadError(f"filter {name} {v!r} is not an integer in [0, {hi}]")
    assert isinstance(size, int) and isinstance(seed, int) and isinstance(length, int)  # just checked
    dt = np.dtype(_FP_DTYPE[got]).newbyteorder("<")
    if len(body) != length * dt.itemsize:
        raise PayloadError(f"filter body is {len(body)} bytes, {length * dt.itemsize} expected")
    geom = filter_geometry(got, size)
    if geom["array_length"] != length:
        raise PayloadError(f"{got} with {size} keys needs {geom['array_length']} fingerprints, header says {length}")
    return Filter(got, size, seed, np.frombuffer(body, dtype=dt).astype(_FP_DTYPE[got]))


def contain_c(flt: Filter, keys: np.ndarray) -> np.ndarray:
    """Membership through the C ``contain``, one call per key (slow: for tests and benchmarks)."""
    out = np.zeros(len(keys), dtype=bool)
    if flt.size == 0:
        return out
    with _CFilter(flt.kind, flt.size) as cf:
        cf.fingerprint_view()[:] = flt.fingerprints
        if flt.kind == "xor8":
            cf.ptr.seed = flt.seed
        else:
            cf.ptr.Seed = flt.seed
        contain = getattr(lib, f"{_PREFIX[flt.kind]}_contain")
        for i, k in enumerate(np.asarray(keys, dtype=np.uint64).tolist()):
            out[i] = contain(k, cf.ptr)
    return out


def _mix_split(keys: np.ndarray, seed: np.uint64, tmp: np.ndarray) -> np.ndarray:
    """murmur64(key + seed), in place on ``keys`` (uint64 arithmetic wraps as in C)."""
    h = keys
    h += seed
    for mult in (_M1, _M2):
        np.right_shift(h, np.uint64(33), out=tmp)
        h ^= tmp
        h *= mult
    np.right_shift(h, np.uint64(33), out=tmp)
    h ^= tmp
    return h


def _mulhi32(h: np.ndarray, n: int, tmp: np.ndarray, out: np.ndarray) -> np.ndarray:
    """High 64 bits of the 128-bit product ``h * n`` for ``n < 2^32`` (C ``binary_fuse_mulhi``)."""
    n64 = np.uint64(n)
    np.bitwise_and(h, _LOW32, out=tmp)
    tmp *= n64
    tmp >>= np.uint64(32)
    np.right_shift(h, np.uint64(32), out=out)
    out *= n64
    out += tmp
    out >>= np.uint64(32)
    return out


def _query_chunk_fuse(h: np.ndarray, flt: Filter, geom: dict[str, int], bufs: list[np.ndarray]) -> np.ndarray:
    tmp, i0, i1 = bufs[0][: h.size], bufs[1][: h.size], bufs[2][: h.size]
    fp = flt.fingerprints
    mask = np.uint64(geom["segment_length_mask"])
    seg = np.uint64(geom["segment_length"])
    f = (h ^ (h >> np.uint64(32))).astype(fp.dtype)  # the fingerprint: low bits of hash ^ hash >> 32
    _mulhi32(h, geom["segment_count_length"], tmp, i0)  # h0
    f ^= fp[i0]
    i0 += seg
    np.right_shift(h, np.uint64(18), out=i1)
    i1 &= mask
    i1 ^= i0  # h1 = (h0 + L) ^ ((hash >> 18) & mask)
    f ^= fp[i1]
    i0 += seg
    np.bitwise_and(h, mask, out=i1)
    i1 ^= i0  # h2 = (h0 + 2L) ^ (hash & mask)
    f ^= fp[i1]
    return f == 0


def _query_chunk_xor(h: np.ndarray, flt: Filter, geom: dict[str, int], bufs: list[np.ndarray]) -> np.ndarray:
    tmp, idx, r = bufs[0][: h.size], bufs[1][: h.size], bufs[2][: h.size]
    fp = flt.fingerprints
    bl = np.uint64(geom["block_length"])
    f = (h ^ (h >> np.uint64(32))).astype(fp.dtype)
    for i, rot in enumerate((0, 21, 42)):
        if rot:
            np.left_shift(h, np.uint64(rot), out=r)
            np.right_shift(h, np.uint64(64 - rot), out=tmp)
            r |= tmp
        else:
            r[:] = h
        r &= _LOW32  # xor_reduce(uint32 r, n) = (r * n) >> 32
        r *= bl
        r >>= np.uint64(32)
        np.add(r, np.uint64(i) * bl, out=idx)
        f ^= fp[idx]
    return f == 0


def query_universe(flt: Filter, universe: int, chunk: int = _CHUNK) -> np.ndarray:
    """Membership of every key ``0..universe-1``, as a bool array (vectorized; same hash as the C code)."""
    hits = np.zeros(universe, dtype=bool)
    if flt.size == 0 or universe == 0:
        return hits
    geom = filter_geometry(flt.kind, flt.size)
    query = _query_chunk_xor if flt.kind == "xor8" else _query_chunk_fuse
    seed = np.uint64(flt.seed)
    keys = np.empty(chunk, dtype=np.uint64)
    bufs = [np.empty(chunk, dtype=np.uint64) for _ in range(3)]
    for start in range(0, universe, chunk):
        stop = min(start + chunk, universe)
        h = keys[: stop - start]
        h[:] = np.arange(start, stop, dtype=np.uint64)
        _mix_split(h, seed, bufs[0][: h.size])
        hits[start:stop] = query(h, flt, geom, bufs)
    return hits


def query_keys(flt: Filter, keys: np.ndarray) -> np.ndarray:
    """Membership of arbitrary uint64 ``keys`` (vectorized)."""
    keys = np.asarray(keys, dtype=np.uint64)
    if flt.size == 0 or keys.size == 0:
        return np.zeros(keys.size, dtype=bool)
    geom = filter_geometry(flt.kind, flt.size)
    query = _query_chunk_xor if flt.kind == "xor8" else _query_chunk_fuse
    h = keys.copy()
    bufs = [np.empty(keys.size, dtype=np.uint64) for _ in range(3)]
    _mix_split(h, np.uint64(flt.seed), bufs[0])
    return query(h, flt, geom, bufs)
