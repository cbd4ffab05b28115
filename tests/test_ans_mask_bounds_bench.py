"""benchmarks/mask_bounds.py: the per-coder gap to the bound, on hand-made client rows."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import mask_bounds  # noqa: E402


def row(n: int, **coders: tuple[int, int, float]) -> dict:
    return {"n": n, "coders": {k: {"bits": b, "header_bits": h, "bound_bits": bound} for k, (b, h, bound) in coders.items()}}


def test_gaps_sum_bits_and_bounds_over_clients():
    rows = [
        row(1000, context=(102, 8, 100.0), fuse8=(90, 0, 80.0)),
        row(1000, context=(206, 8, 200.0), fuse8=(180, 0, 160.0)),
    ]
    got = mask_bounds.gaps(rows)
    ctx = got["context"]
    assert ctx["clients"] == 2 and (ctx["bits"], ctx["header_bits"], ctx["bound_bits"]) == (308, 16, 300.0)
    assert ctx["gap"] == pytest.approx(8 / 300) and ctx["gap_with_header"] == pytest.approx(24 / 300)
    assert ctx["worst_client_gap"] == pytest.approx(0.03)  # 206 / 200 - 1
    assert ctx["within_target"]  # 2.7 % <= 3 %
    assert ctx["mean_bpp"] == pytest.approx((110 / 1000 + 214 / 1000) / 2)
    assert got["fuse8"]["gap"] == pytest.approx(0.125) and not got["fuse8"]["within_target"]


def test_a_coder_without_a_bound_has_no_gap():
    got = mask_bounds.gaps([row(10, context=(0, 8, 0.0))])
    assert got["context"]["gap"] is None and got["context"]["worst_client_gap"] is None and not got["context"]["within_target"]
