"""Mask uplinks: every length a header claims is bounded by what the configured method expects.

A server decoding a mask method's upload knows the masked-weight count n, the round's cap on the
flipped positions (κ_r · n), its filter kind and position coder, and the head's shapes. Each test
sends one header that claims more than that and checks that it is refused before the decoder
allocates for the claim (the allocating step is patched to fail if it is reached).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from handmade import build, hand_head, mask_payload, shared_task

import fedsqueeze.codecs.fusefilter as fusefilter
import fedsqueeze.codecs.positions as positions
from fedsqueeze.codecs import frame
from fedsqueeze.codecs.ans import bernoulli_bits, encode_grouped_bits, grouped_bits_cap
from fedsqueeze.codecs.fusefilter import build_filter, filter_bytes
from fedsqueeze.codecs.positions import code_bytes_cap, encode_positions
from fedsqueeze.errors import PayloadError
from fedsqueeze.methods.base import RoundContext

CTX = RoundContext(round=1, rounds=2, seed=0)


@pytest.fixture(scope="module")
def task():
    return shared_task()


def upload(m, mask_meta, mask_body: bytes, n: int = 5, extra_meta: dict | None = None) -> bytes:
    head_meta, head_body = m.wire.encode_head(hand_head(m, 0))
    meta = {"n": n, "mask": mask_meta, "head": head_meta, "sections": [len(mask_body), len(head_body)], **(extra_meta or {})}
    return frame(m.uplink_kind, meta, mask_body + head_body)


def honest(m, flips: int = 7):
    """A real upload with ``flips`` positions moved off the reference, and its mask header and body."""
    state = m.init_server()
    ref = m.uniforms(CTX, 2, None) < m.start_theta(m.theta_of(state["theta_sym"], state["levels"]))
    keep = ref.copy()
    keep[np.linspace(0, m.n - 1, flips).astype(int)] ^= True
    payload = mask_payload(m, state, CTX, 2, keep, hand_head(m, 0), 5)
    from fedsqueeze.codecs.framing import unframe

    _, meta, body = unframe(payload)
    return state, payload, meta["mask"], bytes(body[: meta["sections"][0]])


def never(*args, **kwargs):
    raise AssertionError("the decoder allocated for a claim it should have refused first")


# ---- the frame: body and header capped by the method's limits ---------------------------------
CONFIGS = [
    ("fedpm", {}),
    ("fedpm", {"coder": "levels"}),
    ("deltamask", {}),
    ("deltamask", {"filter": "fuse8"}),
    ("deltamask-exact", {"coder": "rice"}),
    ("deltamask-exact", {"coder": "elias-fano"}),
]


@pytest.mark.parametrize("name, options", CONFIGS, ids=str)
def test_a_mask_body_over_the_rounds_limit_is_refused_before_parsing(task, name, options):
    m = build(name, task, **options)
    state, payload, meta, body = honest(m)
    assert m.decode_update(payload, 2, state, CTX).n == 5
    limits = m.mask_limits(state, CTX)
    with pytest.raises(PayloadError, match="exceeds the cap"):
        m.decode_update(upload(m, meta, body + bytes(limits.body_bytes + m.wire.head_bytes)), 2, state, CTX)
    # within the frame's cap (a short head would be refused later), but the mask section itself is too long
    long_mask = body + bytes(limits.body_bytes - len(body) + 4)
    head_meta, head_body = m.wire.encode_head(hand_head(m, 0))
    short = frame(m.uplink_kind, {"n": 5, "mask": meta, "head": head_meta, "sections": [len(long_mask), 0]}, long_mask)
    with pytest.raises(PayloadError, match="mask section"):
        m.decode_update(short, 2, state, CTX)


@pytest.mark.parametrize("name, options", CONFIGS, ids=str)
def test_a_mask_header_over_the_rounds_limit_is_refused_before_parsing(task, name, options):
    m = build(name, task, **options)
    state, _, meta, body = honest(m)
    limits = m.mask_limits(state, CTX)
    padding = "x" * (limits.meta_bytes + m.wire.head_meta_bytes + 512)
    with pytest.raises(PayloadError, match="meta length"):
        m.decode_update(upload(m, meta, body, extra_meta={"pad": padding}), 2, state, CTX)


# ---- fedpm: the ANS stream is no longer than its counts can need --------------------------------
def test_fedpm_stream_longer_than_its_counts_need_is_refused(task, monkeypatch):
    m = build("fedpm", task, coder="levels")
    state, _, meta, body = honest(m)
    sizes = np.bincount(state["theta_sym"].astype(np.int64), minlength=int(state["levels"]) + 1)
    coded = sum(1 for o, s in zip(meta["ones"], sizes) if 0 < o < s)
    cap = grouped_bits_cap(bernoulli_bits(meta["ones"], sizes), coded)
    assert len(body) <= cap < m.mask_limits(state, CTX).body_bytes
    import fedsqueeze.codecs.ans as ans

    monkeypatch.setattr(ans, "_coder_from", never)
    with pytest.raises(PayloadError, match="longer than its counts"):
        m.decode_update(upload(m, meta, body + bytes(4 * math.ceil((cap - len(body) + 4) / 4))), 2, state, CTX)


@pytest.mark.parametrize("p", [0.5, 0.1, 0.003, 1e-5, 0.9999])
def test_grouped_bits_cap_holds_for_honest_streams(p):
    rng = np.random.default_rng(int(p * 1e6))
    n, groups = 200_000, 7
    g = rng.integers(0, groups, n)
    bits = rng.random(n) < np.where(g % 2 == 0, p, 1 - p)
    meta, body = encode_grouped_bits(bits, g, groups)
    sizes = np.bincount(g, minlength=groups)
    coded = sum(1 for o, s in zip(meta["ones"], sizes) if 0 < o < s)
    bound = bernoulli_bits(meta["ones"], sizes)
    assert len(body) <= grouped_bits_cap(bound, coded) <= grouped_bits_cap(n, groups)
    assert 8 * len(body) >= bound  # no code beats the empirical entropy (sanity of the bound itself)


# ---- deltamask: the filter's size, kind and length ----------------------------------------------
def test_deltamask_filter_larger_than_the_rounds_cap_is_refused_before_allocating(task, monkeypatch):
    m = build("deltamask", task, filter="fuse8")
    state = m.init_server()
    cap = m.flip_cap(CTX)
    flt = build_filter(np.arange(cap + 1, dtype=np.uint64) * 3, "fuse8")
    assert filter_bytes("fuse8", cap + 1) <= m.mask_limits(state, CTX).body_bytes + 64  # near the cap: the size decides
    monkeypatch.setattr(fusefilter, "filter_geometry", never)
    with pytest.raises(PayloadError, match="size"):
        m.decode_update(upload(m, flt.meta(), flt.body()), 2, state, CTX)


def test_deltamask_filter_of_another_kind_or_length_is_refused_before_allocating(task, monkeypatch):
    m = build("deltamask", task, filter="fuse8")
    state = m.init_server()
    flt16 = build_filter(np.arange(50, dtype=np.uint64), "fuse16")
    flt8 = build_filter(np.arange(50, dtype=np.uint64), "fuse8")
    m.mask_limits(state, CTX)  # the server's own limit (memoized) is worked out before any payload
    monkeypatch.setattr(fusefilter, "filter_geometry", never)
    with pytest.raises(PayloadError, match="kind 'fuse16'"):
        m.decode_update(upload(m, flt16.meta(), flt16.body()), 2, state, CTX)
    with pytest.raises(PayloadError, match="filter body"):
        m.decode_update(upload(m, {**flt8.meta(), "array_length": flt8.fingerprints.size + 8}, flt8.body()), 2, state, CTX)


def test_filter_bytes_grow_with_the_key_count():
    for kind in ("fuse8", "fuse16", "xor8"):
        sizes = [1, 2, 3, 10, 99, 100, 101, 1000, 4096, 4097, 50_000, 65_536, 65_537, 300_000]
        got = [filter_bytes(kind, s) for s in sizes]
        assert got == sorted(got) and got[-1] == build_filter(np.arange(sizes[-1], dtype=np.uint64), kind).fingerprints.nbytes


# ---- deltamask-exact: count, universe, coder, code length ---------------------------------------
def test_exact_positions_over_the_cap_or_universe_or_coder_are_refused_before_decoding(task, monkeypatch):
    m = build("deltamask-exact", task, coder="rice")
    state = m.init_server()
    cap = m.flip_cap(CTX)
    over_meta, over_body = encode_positions(np.arange(cap + 1, dtype=np.uint64) * 2, m.n)
    ok_meta, ok_body = encode_positions(np.arange(0, 40, 3, dtype=np.uint64), m.n)
    ef_meta, ef_body = encode_positions(np.arange(0, 40, 3, dtype=np.uint64), m.n, "elias-fano")
    monkeypatch.setattr(positions, "rice_decode", never)
    monkeypatch.setattr(positions, "elias_fano_decode", never)
    cases = [
        (over_meta, over_body, "more than the"),
        ({**ok_meta, "universe": m.n + 1}, ok_body, "over"),
        ({**ok_meta, "universe": m.n // 2}, ok_body, "over"),
        (ef_meta, ef_body, "coder 'elias-fano'"),
        (ok_meta, ok_body + bytes(code_bytes_cap(ok_meta["n"], m.n)), "longer than"),
    ]
    for meta, body, match in cases:
        with pytest.raises(PayloadError, match=match):
            m.decode_update(upload(m, meta, body), 2, state, CTX)


@pytest.mark.parametrize("coder", ["rice", "elias-fano"])
@pytest.mark.parametrize("n", [0, 1, 2, 17, 1000, 30_000, 50_000, 99_999])
def test_code_bytes_cap_bounds_both_coders_even_for_skewed_sets(coder, n):
    universe = 100_000
    rng = np.random.default_rng(n)
    uniform = np.sort(rng.choice(universe, n, replace=False))
    bunched = np.concatenate([np.arange(max(n - 1, 0)), [universe - 1]])[:n]  # one huge gap
    for pos in (uniform, bunched):
        _, body = encode_positions(pos.astype(np.uint64), universe, coder)
        assert len(body) <= code_bytes_cap(n, universe)
    assert all(code_bytes_cap(k, universe) <= code_bytes_cap(k + 1, universe) for k in range(0, universe, 997))


# ---- context flip codes: the counts, their total, the stream length ----------------------------
@pytest.mark.parametrize("name", ["fedpm", "deltamask"])
def test_context_code_claims_beyond_the_rounds_limits_are_refused_before_decoding(task, name, monkeypatch):
    import fedsqueeze.codecs.ans as ans
    import fedsqueeze.codecs.sideinfo as sideinfo

    m = build(name, task)
    state, payload, meta, body = honest(m)
    assert meta == {"coder": "context"} and m.decode_update(payload, 2, state, CTX).mask.keys == 7
    cap = m.flip_cap(CTX) if name == "deltamask" else m.n
    theta_start = m.start_theta(m.theta_of(state["theta_sym"], state["levels"]))
    sizes = sideinfo.context_sizes(sideinfo.flip_contexts(m.server_uniforms(CTX, 2), theta_start))
    ones, start = sideinfo.unpack_counts(body, sizes)
    words = body[start:]
    monkeypatch.setattr(sideinfo, "decode_grouped_positions", never)
    too_many = np.minimum(sizes, cap + 1)  # every context full, up to more flips than the cap
    over_size = np.array(ones)
    over_size[int(np.argmax(sizes))] = int(sizes.max()) + 1  # a count past its context's size
    cases = [
        (meta, sideinfo.pack_counts(over_size, sizes) + words, "in a context of"),
        ({"coder": "rice"}, body, "not a context code"),
        (meta, body[: start - 1], "truncated"),
    ]
    if name == "deltamask":  # fedpm's cap is n itself, which the context sizes already enforce
        assert sum(too_many) > cap
        cases.append((meta, sideinfo.pack_counts(too_many, sizes) + words, "more than the"))
    for bad_meta, bad_body, match in cases:
        with pytest.raises(PayloadError, match=match):
            m.decode_update(upload(m, bad_meta, bad_body), 2, state, CTX)
    monkeypatch.undo()
    monkeypatch.setattr(ans, "_coder_from", never)
    with pytest.raises(PayloadError, match="longer than its counts"):
        m.decode_update(upload(m, meta, body + bytes(256)), 2, state, CTX)


def test_header_fields_are_json_counted_within_the_limit(task):
    """The honest header of each method fits its meta limit with room to spare."""
    for name, options in CONFIGS:
        m = build(name, task, **options)
        state, _, meta, _ = honest(m)
        assert len(json.dumps(meta, separators=(",", ":"))) <= m.mask_limits(state, CTX).meta_bytes
