"""Every server optimizer of methods/server_opt.py, step by step on hand-made numbers (Reddi et al. 2021,
Algorithm 2 as implemented: no bias correction, m starts at 0 and v at τ²). The first step's values
are worked out by hand in the comments; later steps against the recursions in float64.
(Mutation testing: benchmarks/mutants.py, section ``strategies_rules``.)
"""

from __future__ import annotations

import numpy as np
import pytest

from fedsqueeze.methods.server_opt import DEFAULT_LR, SERVER_OPTIMIZERS, STEPS, ServerOpt

# powers of two: the float32 arithmetic of the first step is exact
HYPER = dict(lr=0.25, momentum=0.5, beta1=0.5, beta2=0.75, tau=0.5)
DELTAS = [
    {"w": np.array([0.5, 2.0, -1.0, 0.0, 0.25], dtype=np.float32), "u": np.array([1.0], dtype=np.float32)},
    {"w": np.array([-0.5, 1.0, 0.25, 4.0, 0.25], dtype=np.float32), "u": np.array([-2.0], dtype=np.float32)},
    {"w": np.array([1.0, -3.0, 0.5, 0.0, 2.0], dtype=np.float32), "u": np.array([0.0], dtype=np.float32)},
]


def _weights() -> dict[str, np.ndarray]:
    return {"w": np.ones(5, dtype=np.float32), "u": np.array([2.0], dtype=np.float32), "frozen": np.array([7.0], dtype=np.float32)}


def _expected(rule: str, deltas: list[dict], lr: float, momentum: float, beta1: float, beta2: float, tau: float) -> list[dict]:
    """The weights after each step, by the published recursions in float64."""
    x = {n: a.astype(np.float64) for n, a in _weights().items()}
    m = {n: np.zeros_like(a) for n, a in x.items()}
    v = {n: np.full_like(a, tau**2) for n, a in x.items()}
    out = []
    for delta in deltas:
        for n, d in delta.items():
            d = d.astype(np.float64)
            if rule == "none":
                x[n] = x[n] + lr * d
            elif rule == "avgm":
                m[n] = momentum * m[n] + d
                x[n] = x[n] + lr * m[n]
            else:
                m[n] = beta1 * m[n] + (1 - beta1) * d
                if rule == "adagrad":
                    v[n] = v[n] + d * d
                elif rule == "adam":
                    v[n] = beta2 * v[n] + (1 - beta2) * d * d
                else:  # yogi
                    v[n] = v[n] - (1 - beta2) * d * d * np.sign(v[n] - d * d)
                x[n] = x[n] + lr * m[n] / (np.sqrt(v[n]) + tau)
        out.append({n: a.copy() for n, a in x.items()})
    return out


def test_rules_defaults_and_learning_rates():
    assert SERVER_OPTIMIZERS == ("none", "avgm", "adagrad", "adam", "yogi") and set(STEPS) == set(SERVER_OPTIMIZERS)
    assert DEFAULT_LR == {"none": 1.0, "avgm": 1.0, "adagrad": 1e-2, "adam": 1e-2, "yogi": 1e-2}
    opt = ServerOpt()
    assert (opt.rule, opt.lr, opt.momentum, opt.beta1, opt.beta2, opt.tau) == ("none", 0.0, 0.9, 0.9, 0.99, 1e-3)
    for rule, lr in DEFAULT_LR.items():
        assert ServerOpt(rule).eta == lr  # lr = 0: the rule's default
        assert ServerOpt(rule, lr=0.3).eta == 0.3


def test_initial_state():
    weights = _weights()
    assert ServerOpt("none").init_state(weights) == {}
    avgm = ServerOpt("avgm").init_state(weights)
    assert set(avgm) == {"m"} and set(avgm["m"]) == set(weights)
    for rule in ("adagrad", "adam", "yogi"):
        state = ServerOpt(rule, tau=0.5).init_state(weights)
        assert set(state) == {"m", "v"}
        for n, a in weights.items():
            assert state["m"][n].dtype == state["v"][n].dtype == np.float32
            np.testing.assert_array_equal(state["m"][n], np.zeros(a.shape))
            np.testing.assert_array_equal(state["v"][n], np.full(a.shape, 0.25))  # τ²
    for n, a in weights.items():
        assert avgm["m"][n].dtype == np.float32 and avgm["m"][n].shape == a.shape and not avgm["m"][n].any()
    wide = {n: a.astype(np.float64) for n, a in weights.items()}  # the state is float32 whatever the weights
    for rule in ("avgm", "adam"):
        assert all(a.dtype == np.float32 for part in ServerOpt(rule).init_state(wide).values() for a in part.values())


# the first step by hand (Δ = DELTAS[0]["w"] = 0.5, 2, -1, 0, 0.25; x = 1; η = 0.25, τ = 0.5, v₀ = 0.25):
# none:    x + ηΔ                       = 1.125, 1.5, 0.75, 1, 1.0625
# avgm:    m = Δ; x + ηm                = the same
# adaptive: m = 0.5Δ = 0.25, 1, -0.5, 0, 0.125
#   adagrad v = 0.25 + Δ²               = 0.5, 4.25, 1.25, 0.25, 0.3125
#   adam    v = 0.75·0.25 + 0.25·Δ²     = 0.25, 1.1875, 0.4375, 0.1875, 0.203125
#   yogi    v = 0.25 − 0.25·Δ²·sign(0.25 − Δ²) = 0.25 (Δ² = v: sign 0), 1.25, 0.5, 0.25, 0.234375
FIRST_V = {
    "adagrad": [0.5, 4.25, 1.25, 0.25, 0.3125],
    "adam": [0.25, 1.1875, 0.4375, 0.1875, 0.203125],
    "yogi": [0.25, 1.25, 0.5, 0.25, 0.234375],
}


@pytest.mark.parametrize("rule", ["none", "avgm"])
def test_first_step_plain_and_momentum(rule):
    opt = ServerOpt(rule, **HYPER)
    weights = _weights()
    state = opt.init_state(weights)
    opt.step(weights, DELTAS[0], state)
    np.testing.assert_array_equal(weights["w"], [1.125, 1.5, 0.75, 1.0, 1.0625])
    np.testing.assert_array_equal(weights["u"], [2.25])
    assert weights["frozen"][0] == 7.0  # a tensor without a delta stays
    if rule == "avgm":
        np.testing.assert_array_equal(state["m"]["w"], DELTAS[0]["w"])


@pytest.mark.parametrize("rule", ["adagrad", "adam", "yogi"])
def test_first_step_adaptive(rule):
    opt = ServerOpt(rule, **HYPER)
    weights = _weights()
    state = opt.init_state(weights)
    opt.step(weights, DELTAS[0], state)
    np.testing.assert_array_equal(state["m"]["w"], [0.25, 1.0, -0.5, 0.0, 0.125])
    np.testing.assert_allclose(state["v"]["w"], FIRST_V[rule], rtol=1e-7)
    v = np.array(FIRST_V[rule])
    np.testing.assert_allclose(weights["w"], 1 + 0.25 * np.array([0.25, 1.0, -0.5, 0.0, 0.125]) / (np.sqrt(v) + 0.5), rtol=1e-6)
    assert weights["frozen"][0] == 7.0


@pytest.mark.parametrize("rule", SERVER_OPTIMIZERS)
def test_three_steps_follow_the_recursion(rule):
    opt = ServerOpt(rule, **HYPER)
    weights = _weights()
    state = opt.init_state(weights)
    for delta, expected in zip(DELTAS, _expected(rule, DELTAS, **HYPER)):
        opt.step(weights, delta, state)
        for n in weights:
            assert weights[n].dtype == np.float32, n
            np.testing.assert_allclose(weights[n], expected[n], rtol=2e-6, atol=1e-7, err_msg=f"{rule} {n}")
    for part in state.values():
        assert all(a.dtype == np.float32 for a in part.values())


def test_momentum_accumulates():
    # μ = 0.5: m₁ = 1, m₂ = 0.5 + 1 = 1.5, m₃ = 0.75 + 1 = 1.75; x = 0 + 0.25·(1 + 1.5 + 1.75)
    opt = ServerOpt("avgm", lr=0.25, momentum=0.5)
    weights = {"x": np.zeros(1, dtype=np.float32)}
    state = opt.init_state(weights)
    for _ in range(3):
        opt.step(weights, {"x": np.ones(1, dtype=np.float32)}, state)
    assert weights["x"][0] == 0.25 * 4.25 and state["m"]["x"][0] == 1.75


def test_a_float64_delta_is_rounded_to_float32_before_the_step():
    # 2^-24 + 2^-50 rounds to 2^-24 in float32; 1 + 2^-24 is then a tie that rounds to even (1.0). Taken in
    # float64 instead, 1 + 2^-24 + 2^-50 would round up to 1 + 2^-23.
    opt = ServerOpt("none", lr=1.0)
    weights = {"x": np.ones(1, dtype=np.float32)}
    opt.step(weights, {"x": np.array([2.0**-24 + 2.0**-50], dtype=np.float64)}, {})
    assert weights["x"].dtype == np.float32 and weights["x"][0] == 1.0
