"""benchmarks/scale.py on tiny sizes: the server row runs the tensor method's own server path, and a
run re-measures only the rows it was asked for (the others, at any d, stay in the JSON)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import scale  # noqa: E402

from fedsqueeze.codecs import encode_tensors, get_codec  # noqa: E402


def test_server_row_decodes_and_aggregates_every_chunk_through_the_method():
    rss = scale.PeakRSS(1 << 40)
    try:
        row = scale.server_row("fedavg", [1000, 500], 3, rss)
    finally:
        rss.stop()
    # one client's raw payloads over both chunks: the weight, then the head's weight and bias
    want = sum(
        len(encode_tensors(get_codec("raw"), {"backbone.0.weight": np.zeros((1, size), np.float32),
                                              "head.weight": np.zeros((2, 1), np.float32),
                                              "head.bias": np.zeros(2, np.float32)}, n=100))
        for size in (1000, 500)
    )  # fmt: skip
    assert row["clients"] == 3 and row["bytes"] == want
    assert row["time_s"] == row["server_decode_s"] + row["aggregate_s"]


def test_engine_row_plays_one_real_streamed_round_over_all_d_values():
    rss = scale.PeakRSS(1 << 40)
    try:
        row = scale.engine_row("fedavg", 3000, 4, rss, tensor=2000)
    finally:
        rss.stop()
    want = len(encode_tensors(get_codec("raw"), {"backbone.0.weight": np.zeros((1, 2000), np.float32),
                                                 "backbone.1.weight": np.zeros((1, 1000), np.float32),
                                                 "head.weight": np.zeros((2, 1), np.float32),
                                                 "head.bias": np.zeros(2, np.float32)}, n=100))  # fmt: skip
    assert row["clients"] == 4 and row["bytes"] == want  # one client's whole upload: nothing chunked
    assert row["time_s"] == row["server_s"] > 0 and row["client_encode_s"] > 0
    assert 0 < row["server_peak_rss_gib"] <= row["all_peak_rss_gib"]


def test_a_run_replaces_only_the_rows_it_measures(tmp_path, monkeypatch):
    out = tmp_path / "scale.json"
    kept = [{"row": "codec:sz3", "d": 2000, "status": "ok", "time_s": 1.0}, {"row": "server:fedavg", "d": 9, "status": "ok", "time_s": 2.0}]
    stale = {"row": "server:fedavg", "d": 2000, "status": "ok", "time_s": -1.0}
    out.write_text(json.dumps({"rows": [*kept, stale]}))
    argv = ["scale.py", "--d", "2000", "--chunk", "1000", "--clients", "2", "--rows", "server:fedavg", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    scale.main()
    rows = json.loads(out.read_text())["rows"]
    assert [r for r in rows if r["row"] == "codec:sz3" or r["d"] == 9] == [kept[0], kept[1]]
    (new,) = [r for r in rows if r["row"] == "server:fedavg" and r["d"] == 2000]
    assert new["status"] == "ok" and new["chunks"] == 2 and new["clients"] == 2 and new["time_s"] >= 0
