"""The link model: sim_time_s = slowest client's compute + transfer of its bytes + latency."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fedsqueeze.config import RunConfig, build_config
from fedsqueeze.errors import ConfigError
from fedsqueeze.runtime import run_local
from fedsqueeze.runtime.common import client_link, simulated_round_time, transfer_s


def test_round_time_is_the_slowest_clients_compute_plus_transfer_plus_latency():
    cfg = RunConfig(uplink_mbps=8.0, downlink_mbps=80.0, latency_ms=100.0)
    # client 1: 1 s compute, 10 MB down (1 s at 80 Mbit/s), 2 MB up (2 s at 8 Mbit/s), 0.1 s latency → 4.1 s
    # client 2: 3.5 s compute, 1 MB down (0.1 s), 0.5 MB up (0.5 s)                               → 4.2 s
    out = simulated_round_time(cfg, {1: (1.0, 10_000_000, 2_000_000), 2: (3.5, 1_000_000, 500_000)})
    assert out["sim_time_s"] == pytest.approx(4.2)
    assert out["sim_slowest_client"] == 2
    assert [c["time_s"] for c in out["sim_clients"]] == pytest.approx([4.1, 4.2])
    assert simulated_round_time(cfg, {})["sim_time_s"] == 0.0
    assert transfer_s(1_000_000, 8.0) == pytest.approx(1.0)


def test_link_spread_is_seeded_per_client_and_centred_on_the_configured_medians():
    flat = RunConfig(uplink_mbps=10.0, downlink_mbps=40.0, latency_ms=20.0)
    assert client_link(flat, 3) == (10.0, 40.0, 0.02)
    spread = dataclasses.replace(flat, link_spread=0.8)
    links = [client_link(spread, c) for c in range(400)]
    assert links == [client_link(spread, c) for c in range(400)]  # same seed, same links
    assert links != [client_link(dataclasses.replace(spread, seed=1), c) for c in range(400)]
    ups = sorted(up for up, _, _ in links)
    assert 7.0 < ups[200] < 14.0  # median near 10 Mbit/s
    assert ups[0] < 3.0 and ups[-1] > 30.0  # really spread
    assert all(down / up == pytest.approx(4.0) for up, down, _ in links)  # one factor per client, both ways


def test_link_options_are_validated():
    with pytest.raises(ConfigError):
        build_config(sets={"uplink_mbps": 0})
    with pytest.raises(ConfigError):
        build_config(sets={"latency_ms": -1})
    assert build_config(sets={"uplink_mbps": 2.5, "link_spread": 0.5}).uplink_mbps == 2.5


def _expected(cfg: RunConfig, record: dict) -> float:
    """The round's simulated time recomputed from its recorded per-client compute time and bytes."""
    return max(
        c["compute_s"]
        + c["downlink_bytes"] * 8 / (cfg.downlink_mbps * 1e6)
        + c["uplink_bytes"] * 8 / (cfg.uplink_mbps * 1e6)
        + cfg.latency_ms / 1000
        for c in record["sim_clients"]
    )


def test_halving_uplink_bandwidth_adds_the_uplink_transfer_time(tiny_cfg):
    # fedavg sends all ~1M float32 weights of the tiny model up: at 0.05 Mbit/s that is ~640 s per
    # client, far above its compute (< 1 s), so the run is uplink-bound.
    cfg = tiny_cfg(
        method="fedavg", rounds=1, train_size=60, test_size=20, local_steps=1, uplink_mbps=0.05, downlink_mbps=1000.0, latency_ms=30.0
    )
    slow = dataclasses.replace(cfg, uplink_mbps=0.025, out=cfg.out + "-slow")
    fast_round = run_local(cfg, show_progress=False)["rounds"][0]
    slow_round = run_local(slow, show_progress=False)["rounds"][0]
    for c, r in ((cfg, fast_round), (slow, slow_round)):
        assert r["sim_time_s"] == pytest.approx(_expected(c, r), rel=1e-12)
        sent = {x["client"]: x["uplink_bytes"] for x in r["sim_clients"]}
        assert sum(sent.values()) == r["uplink_bytes"] and len(sent) == r["clients_uploaded"]
    # the slowest client's uplink transfer doubles: the round gets longer by one more such transfer
    up = max(x["uplink_bytes"] for x in fast_round["sim_clients"])
    extra = up * 8 / (0.05 * 1e6)
    assert extra > 100
    compute = max(x["compute_s"] for x in fast_round["sim_clients"] + slow_round["sim_clients"])
    assert slow_round["sim_time_s"] - fast_round["sim_time_s"] == pytest.approx(extra, abs=compute)
    assert fast_round["sim_time_s"] > extra  # and it includes that transfer in the first place
    csv_header = (Path(cfg.out) / "rounds.csv").read_text().splitlines()[0].split(",")
    assert "sim_time_s" in csv_header


def test_dropped_clients_are_not_waited_for(tiny_cfg):
    from fedsqueeze.methods import RoundContext
    from fedsqueeze.runtime.faults import drops_out

    def cfg_for(seed):
        return tiny_cfg(
            method="head", rounds=1, clients=4, clients_per_round=4, dropout=0.5, seed=seed, train_size=60, test_size=20, local_steps=1
        )

    # a seed where some, not all, of the 4 clients drop out in round 1
    seed = next(s for s in range(100) if 0 < sum(drops_out(cfg_for(s), RoundContext(1, 1, s), c) for c in range(4)) < 4)
    cfg = cfg_for(seed)
    r = run_local(cfg, show_progress=False)["rounds"][0]
    dropped = {d["client"] for d in r["dropped"]}
    timed = {c["client"] for c in r["sim_clients"]}
    assert dropped and not dropped & timed and len(timed) == r["clients_uploaded"]
