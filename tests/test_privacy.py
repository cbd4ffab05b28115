"""DP-FedAvg: clipping, noise, and the RDP accountant's ε."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from handmade import assert_accuracy_is_real

from fedsqueeze.errors import ConfigError
from fedsqueeze.privacy import clip_update, dp_epsilon, global_norm, private_mean
from fedsqueeze.runtime import run_local


def test_epsilon_rises_with_rounds_and_falls_with_noise():
    eps_rounds = [dp_epsilon(0.5, 1.0, r, 1e-5) for r in (1, 5, 10, 50)]
    assert all(a < b for a, b in zip(eps_rounds, eps_rounds[1:]))
    eps_noise = [dp_epsilon(0.5, s, 10, 1e-5) for s in (0.5, 1.0, 2.0, 4.0)]
    assert all(a > b for a, b in zip(eps_noise, eps_noise[1:]))
    assert dp_epsilon(0.1, 1.0, 10, 1e-5) < dp_epsilon(0.5, 1.0, 10, 1e-5)  # sampling amplifies privacy
    assert dp_epsilon(0.5, 1.0, 0, 1e-5) == 0.0
    assert dp_epsilon(0.5, 0.0, 10, 1e-5) == math.inf


def test_epsilon_is_below_the_classic_rdp_bound_without_sampling():
    # q = 1: T Gaussian mechanisms have RDP T·α/(2σ²); the textbook conversion gives an upper bound
    sigma, rounds, delta = 2.0, 10, 1e-5
    classic = min(rounds * a / (2 * sigma**2) + math.log(1 / delta) / (a - 1) for a in range(2, 257))
    eps = dp_epsilon(1.0, sigma, rounds, delta)
    assert 0.6 * classic < eps <= classic


def test_clip_bounds_the_global_norm():
    rng = np.random.default_rng(0)
    update = {"a": rng.normal(size=(10, 10)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}
    clipped, norm = clip_update(update, 1.0)
    assert norm == pytest.approx(global_norm(update)) and norm > 1
    assert global_norm(clipped) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(clipped["a"] / update["a"], clipped["b"][0] / update["b"][0], rtol=1e-5)  # one scale
    small = {"a": update["a"] * 1e-3}
    np.testing.assert_array_equal(clip_update(small, 1.0)[0]["a"], small["a"])


def test_private_mean_noise_has_std_sigma_clip_over_k():
    like = {"w": np.zeros(200_000, np.float32)}
    mean, _ = private_mean([], like, clip=0.5, noise_multiplier=2.0, denominator=4, rng=np.random.default_rng(1))
    assert mean["w"].std() == pytest.approx(2.0 * 0.5 / 4, rel=0.02)
    ups = [{"w": np.full(3, 10.0, np.float32)}, {"w": np.full(3, 0.1, np.float32)}]
    mean, metrics = private_mean(ups, {"w": np.zeros(3, np.float32)}, 1.0, 0.0, 2, np.random.default_rng(0))
    np.testing.assert_allclose(mean["w"], (1 / math.sqrt(3) + 0.1) / 2, rtol=1e-6)
    assert metrics["dp_clipped_fraction"] == 0.5


def test_dp_run_reports_epsilon(tiny_cfg):
    torch.set_num_threads(1)
    opts = {"dp_clip": 0.5, "dp_noise": 1.0, "dp_delta": 1e-5}
    cfg = tiny_cfg(method="bitfit", rounds=3, local_steps=2, options=opts)
    res = run_local(cfg, show_progress=False)
    eps = [r["dp_epsilon"] for r in res["rounds"]]
    assert all(e > 0 for e in eps) and eps == sorted(eps) and len(set(eps)) == 3
    assert eps[-1] == pytest.approx(dp_epsilon(2 / 4, 1.0, 3, 1e-5))  # q = clients_per_round / clients
    assert res["final"]["dp_epsilon"] == eps[-1] and res["final"]["dp_delta"] == 1e-5
    assert_accuracy_is_real(cfg, res)


def test_dp_noise_needs_a_clip(tiny_cfg):
    with pytest.raises(ConfigError, match="dp_clip"):
        run_local(tiny_cfg(method="lora", options={"dp_noise": 1.0}), show_progress=False)
