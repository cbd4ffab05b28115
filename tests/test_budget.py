"""The budget controller (run option budget_bpp): the search pinned on hand-made sizes, the server's
check of a chosen SZ3 bound, refusals, and tiny runs whose every client lands within ±10% of the target."""

from __future__ import annotations

import math

import pytest

from fedsqueeze.config import RunConfig, build_config
from fedsqueeze.errors import ConfigError, PayloadError
from fedsqueeze.methods import get_method
from fedsqueeze.methods.budget import BudgetSZ3Codec, bound_range, search_knob, short_bound, target_bytes
from fedsqueeze.runtime import run_local


def sizes(f):
    """An encoder whose upload size is ``f(knob)``; it records the knobs it was asked for."""
    asked: list[float] = []

    def encode(x: float) -> tuple[int, str]:
        asked.append(x)
        return int(f(x)), f"payload@{x:g}"

    return encode, asked


# ---- the search on hand-made monotone sizes ---------------------------------------------------------
def test_a_linear_size_is_hit_exactly_by_the_secant_after_the_first_step():
    encode, asked = sizes(lambda k: 100 + 3 * k)
    # 50 -> 250 bytes; first step: 50 · 1000/250 = 200 -> 700; secant through (50, 250), (200, 700): 300 -> 1000
    choice = search_knob(encode, 1000, lo=0, hi=1000, start=50, increasing=True, integer=True, first_step=lambda t: t.knob * 1000 / t.size)
    assert asked == [50, 200, 300]
    assert (choice.knob, choice.size, choice.value, choice.tries) == (300, 1000, "payload@300", 3)


def test_a_decreasing_size_without_a_first_step_moves_one_unit_then_follows_the_secant():
    encode, asked = sizes(lambda x: 1000 - 100 * x)
    # 0 -> 1000 (too big, the knob must rise); +1 -> 900; secant: 0 + (500 - 1000) · 1 / (900 - 1000) = 5 -> 500
    choice = search_knob(encode, 500, lo=-10, hi=10, start=0, increasing=False)
    assert asked == [0, 1, 5] and (choice.knob, choice.size, choice.tries) == (5, 500, 3)


def test_a_convex_size_is_bracketed_and_the_secant_kept_inside_the_bracket():
    encode, asked = sizes(lambda k: k * k)
    # target 2500 (k = 50), ±5%: 2375..2625
    #  10 -> 100; +1 -> 121; secant 11 + 2379/21 = 124.3, clipped to 100 -> 10000 (bracket [11, 100])
    #  regula falsi 11 + 2379·89/9879 = 32.4 -> 32 (1024); 32 + 1476·68/8976 = 43.2 -> 43 (1849)
    #  43 + 651·57/8151 = 47.6 is within a tenth of the bracket [43, 100] of its end: bisect, 71.5 -> 72 (5184)
    #  43 + 651·29/3335 = 48.7 -> 49: 2401, within 5%
    choice = search_knob(encode, 2500, lo=0, hi=100, start=10, increasing=True, integer=True)
    assert asked == [10, 11, 100, 32, 43, 72, 49]
    assert (choice.knob, choice.size, choice.tries) == (49, 2401, 7)


def test_an_unreachable_target_stops_at_the_range_end_and_keeps_the_nearest():
    encode, asked = sizes(lambda k: 100 + 3 * k)
    # 10 -> 130 > 50: down one, 9 -> 127; secant 9 - 77/3 < 0, clipped to 0 -> 100; the end is tried: stop
    choice = search_knob(encode, 50, lo=0, hi=1000, start=10, increasing=True, integer=True)
    assert asked == [10, 9, 0] and (choice.knob, choice.size, choice.tries) == (0, 100, 3)


def test_a_flat_size_costs_at_most_max_tries_and_keeps_the_smallest_knob_of_the_ties():
    encode, asked = sizes(lambda k: 10)
    choice = search_knob(encode, 1000, lo=0, hi=10**6, start=0, increasing=True, integer=True, max_tries=3)
    assert asked == [0, 1, 2] and (choice.knob, choice.tries) == (0, 3)


def test_the_search_stops_at_the_first_size_within_tolerance():
    encode, asked = sizes(lambda k: 100 + 3 * k)
    choice = search_knob(encode, 1000, lo=0, hi=1000, start=290, increasing=True, integer=True, tol=0.05)  # 970: 3% under
    assert asked == [290] and (choice.size, choice.tries) == (970, 1)


@pytest.mark.parametrize("target, lo, hi, tries", [(0, 0, 1, 1), (-1, 0, 1, 1), (1, 2, 1, 1), (1, 0, 1, 0)])
def test_a_search_without_a_target_or_a_range_is_a_value_error(target, lo, hi, tries):
    with pytest.raises(ValueError, match="search_knob needs"):
        search_knob(lambda x: (1, None), target, lo=lo, hi=hi, start=0, increasing=True, max_tries=tries)


def test_the_target_is_the_reported_bpp_scale():
    assert target_bytes(1.0, 8_000) == 1000.0 and target_bytes(0.25, 998_874) == 998_874 * 0.25 / 8


# ---- the server's check of the bound a fedsz client chose ------------------------------------------
def test_a_budgeted_sz3_decoder_takes_bounds_within_its_range_only():
    codec = BudgetSZ3Codec(bound=2e-2, mode="rel")
    lo, hi = bound_range(codec)
    assert (lo, hi) == (2e-2 / 65536, 1.0)  # REL: never beyond the whole range
    assert bound_range(BudgetSZ3Codec(bound=1e-3, mode="abs")) == (1e-3 / 65536, 1e-3 * 65536)
    for bound in (lo, 0.05, 1.0):
        codec.check_header({"mode": "rel", "bound": bound})
    for meta, words in [
        ({"mode": "rel", "bound": 1.5}, "bound=1.5"),
        ({"mode": "rel", "bound": lo / 2}, "a budgeted run takes bounds in"),
        ({"mode": "rel", "bound": 1}, "bound=1;"),  # an int is not what the encoder writes
        ({"mode": "rel", "bound": "0.1"}, "bound='0.1'"),
        ({"mode": "abs", "bound": 0.05}, "mode='abs'"),
        ({"mode": "rel"}, "bound=None"),
    ]:
        with pytest.raises(PayloadError, match=words):
            codec.check_header(meta)


def test_short_bounds_are_four_significant_digits():
    assert short_bound(math.log2(0.0123456789)) == 0.01235 and short_bound(-1.0) == 0.5


# ---- refusals ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["fedavg", "fedpm", "lora", "topk"])
def test_a_method_without_a_controller_refuses_a_budget(tiny_cfg, method):
    with pytest.raises(ConfigError, match=f"method '{method}' has no budget controller.*deltamask, deltamask-exact, fedsz"):
        get_method(method)(tiny_cfg(method=method, budget_bpp=0.5))


@pytest.mark.parametrize(
    "options, words",
    [
        ({"uplink_codec": "qsgd"}, "needs uplink_codec=sz3 \\(got 'qsgd'\\)"),
        ({"scaffold": True}, "does not compose with scaffold=true"),
    ],
)
def test_fedsz_refuses_a_budget_it_cannot_honour(tiny_cfg, options, words):
    with pytest.raises(ConfigError, match=words):
        get_method("fedsz")(tiny_cfg(method="fedsz", budget_bpp=0.5, options=options))


@pytest.mark.parametrize("value, words", [("-1", ">= 0"), ("nan", "finite"), ("inf", "finite"), ("lots", "a number")])
def test_a_budget_must_be_a_finite_non_negative_number(value, words):
    with pytest.raises(ConfigError, match=f"option 'budget_bpp' of the run must be .*{words}"):
        build_config(None, None, {"budget_bpp": value})


def test_the_budget_is_off_by_default_and_listed_with_the_run_options():
    assert RunConfig().budget_bpp == 0.0 and "budget_bpp" in RunConfig.field_names()
    assert get_method("fedsz").budget_knob and get_method("deltamask").budget_knob and get_method("fedpm").budget_knob is None


# ---- tiny runs: every client of every round within ±10% ------------------------------------------
def client_bpps(record: dict, model_params: int) -> list[float]:
    """Each uploading client's bits per model parameter (the link model lists every client's bytes)."""
    return [c["uplink_bytes"] * 8 / model_params for c in record["sim_clients"]]


def assert_on_budget(res: dict, target: float) -> None:
    for r in res["rounds"]:
        assert r["budget_target_bpp"] == target
        assert abs(r["uplink_bpp"] / target - 1) <= 0.10, r["uplink_bpp"]
        per_client = client_bpps(r, res["model_params"])
        assert len(per_client) == r["clients_uploaded"] == 2
        assert all(abs(b / target - 1) <= 0.10 for b in per_client), per_client


def test_fedsz_lands_on_its_budget_every_round(tiny_cfg):
    # the tiny model's fedsz uploads span about 0.30 (bound 1) to 0.61 bpp (bound 3e-7); 0.36 at the default 2e-2
    res = run_local(tiny_cfg(method="fedsz", budget_bpp=0.45, threads=1), show_progress=False)
    assert_on_budget(res, 0.45)
    for r in res["rounds"]:
        assert r["budget_bound_min"] <= r["budget_bound"] <= r["budget_bound_max"] < 2e-2  # more bytes: a finer bound


def test_deltamask_lands_on_its_budget_every_round(tiny_cfg):
    # more flips than the default tiny run makes (~50): uploads span ~0.017 (no flip, the head) to ~0.032 bpp
    options = {"score_lr": 5.0, "theta_init": 0.6, "head_dtype": "float16"}
    res = run_local(tiny_cfg(method="deltamask", budget_bpp=0.024, threads=1, options=options), show_progress=False)
    assert_on_budget(res, 0.024)
    for r in res["rounds"]:
        assert r["budget_flips"] == r["keys"] > 0


def test_a_deltamask_budget_out_of_reach_sends_every_flip_as_the_run_without_one(tiny_cfg):
    # the tiny run flips ~50 positions, far under the κ cap, so without a budget every flip travels too
    plain = run_local(tiny_cfg(method="deltamask", threads=1), show_progress=False)
    budgeted = run_local(tiny_cfg(method="deltamask", budget_bpp=1.0, threads=1), show_progress=False)
    for a, b in zip(plain["rounds"], budgeted["rounds"], strict=True):
        assert [c["uplink_bytes"] for c in a["sim_clients"]] == [c["uplink_bytes"] for c in b["sim_clients"]]
        assert (a["accuracy"], a["keys"]) == (b["accuracy"], b["budget_flips"]) and b["uplink_bpp"] < 0.9
