"""The budget controller: each client tunes its own knob every round so its upload lands on a byte target.

Run option ``budget_bpp`` = B sets the target of every client's upload, headers included, to
``B · model_params / 8`` bytes: the scale of the ``uplink_bpp`` the round record reports
(``uplink_bytes · 8 / (clients · model_params)``), so a round whose every client lands within ±10% of
its target reports an ``uplink_bpp`` within ±10% of B.

The size of a coded update depends on the data, so no feedback from earlier rounds can promise that.
Instead each client searches, deterministically, before it uploads (:func:`search_knob`): it encodes
at a starting knob, then steps by a secant on the sizes it measured (kept inside the bracket of the
sizes on either side of the target, bisecting when the secant would leave it), stops at the first
size within ``TOLERANCE`` (±5%, half the promise) and after at most ``MAX_TRIES`` encodes keeps the
one nearest the target. The knobs:

- fedsz: the SZ3 error bound, searched in log2 (:class:`SZ3Budget`). The bound is already in every
  sz3 header, so the server learns it with no extra byte; it accepts any bound within a factor 2^16
  of the configured ``sz3_bound`` (:class:`BudgetSZ3Codec`).
- deltamask, deltamask-exact: the number of flipped positions sent, the largest ``|θc − θref|`` first
  (the κ schedule's cap is replaced by the search; the server allows up to every masked position).
  The count is in the flip code already.

A target no knob value reaches (below the smallest upload, or above the largest) gets the nearest
upload the search found; the round record shows it (``uplink_bpp`` against ``budget_target_bpp``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from fedsqueeze.codecs import CodecContext, encode_tensors
from fedsqueeze.codecs.sz3 import SZ3Codec
from fedsqueeze.errors import PayloadError

T = TypeVar("T")

TOLERANCE = 0.05  # stop at the first upload within ±5% of the target (the promise is ±10%)
MAX_TRIES = 8  # encodes per client-round at most
SZ3_SPAN = 16  # the bound is searched within 2^±16 of the configured one (and the server accepts only that)


def target_bytes(budget_bpp: float, model_params: int) -> float:
    """A client's upload target in bytes: ``budget_bpp`` bits per model parameter."""
    return budget_bpp * model_params / 8.0


@dataclass(frozen=True)
class Trial(Generic[T]):
    """One encode of the search: the knob, the upload's size in bytes and what the encoder made."""

    knob: float
    size: int
    value: T


@dataclass(frozen=True)
class Choice(Generic[T]):
    """What the search kept and how many encodes it took."""

    knob: float
    size: int
    value: T
    tries: int


def _miss(size: float, target: float) -> float:
    """How far ``size`` is from ``target``, as |log(size / target)| (over and under weigh alike)."""
    return abs(math.log(max(size, 1e-9) / target))


def _secant(a: Trial[Any], b: Trial[Any], target: float) -> float | None:
    """The knob where the line through ``a`` and ``b`` meets ``target`` (None when it is flat)."""
    if a.size == b.size or a.knob == b.knob:
        return None
    return a.knob + (target - a.size) * (b.knob - a.knob) / (b.size - a.size)


def search_knob(
    encode: Callable[[float], tuple[int, T]],
    target: float,
    *,
    lo: float,
    hi: float,
    start: float,
    increasing: bool,
    integer: bool = False,
    first_step: Callable[[Trial[T]], float] | None = None,
    max_step: float = math.inf,
    tol: float = TOLERANCE,
    max_tries: int = MAX_TRIES,
) -> Choice[T]:
    """The knob in ``[lo, hi]`` whose ``encode(knob) -> (size, value)`` lands nearest ``target``.

    ``size`` is assumed monotone in the knob (``increasing`` or not); a little noise only costs tries.
    Stops at the first size within ``tol`` (relative) of ``target``; otherwise after ``max_tries``
    encodes, or once no untried knob is left between the bracket's ends (integers), or once the range
    end on the side the target lies on was tried, it keeps the trial nearest ``target``.
    ``first_step(trial)`` proposes the second knob from the first (default: a step of 1); an
    extrapolated step moves the knob by at most ``max_step``. ``integer`` knobs are rounded.
    """
    if not (target > 0 and lo <= hi and max_tries >= 1):
        raise ValueError(f"search_knob needs target > 0, lo <= hi and max_tries >= 1 (got {target}, [{lo}, {hi}], {max_tries})")

    def snap(x: float) -> float:
        x = min(max(x, lo), hi)
        return float(round(x)) if integer else x

    trials: list[Trial[T]] = []
    below: Trial[T] | None = None  # the tightest trial whose knob must rise to reach the target
    above: Trial[T] | None = None  # ... and the tightest whose knob must fall
    x = snap(start)
    for _ in range(max_tries):
        size, value = encode(x)
        trial = Trial(x, int(size), value)
        trials.append(trial)
        if abs(trial.size - target) <= tol * target:
            break
        if (trial.size < target) == increasing:
            below = trial if below is None or trial.knob > below.knob else below
        else:
            above = trial if above is None or trial.knob < above.knob else above
        nxt = _next_knob(trials, below, above, target, lo, hi, integer, first_step, max_step)
        if nxt is None:
            break
        x = snap(nxt)
    best = min(trials, key=lambda t: (_miss(t.size, target), t.knob))
    return Choice(best.knob, best.size, best.value, len(trials))


def _next_knob(
    trials: list[Trial[Any]],
    below: Trial[Any] | None,
    above: Trial[Any] | None,
    target: float,
    lo: float,
    hi: float,
    integer: bool,
    first_step: Callable[[Trial[Any]], float] | None,
    max_step: float,
) -> float | None:
    """The next knob to try, or None when none is worth an encode."""
    tried = {t.knob for t in trials}
    if below is not None and above is not None:  # bracketed: a secant, kept inside the bracket
        left, right = sorted((below.knob, above.knob))
        width = right - left
        if integer and width <= 1:
            return None
        guess = _secant(below, above, target)
        margin = 0.1 * width  # the bracket shrinks by at least a tenth every step
        if guess is None or not left + margin <= guess <= right - margin:
            guess = left + width / 2
        if integer:
            guess = float(round(guess))
            if guess <= left or guess >= right or guess in tried:
                guess = float(math.floor(left + width / 2))
            if guess <= left or guess >= right:
                return None
        return guess
    last = trials[-1]
    edge = hi if (below is not None) else lo  # the end of the range the target lies towards
    if last.knob == edge:
        return None  # the target is out of reach
    guess = _secant(trials[-2], last, target) if len(trials) >= 2 else None
    if guess is None:
        guess = first_step(last) if first_step is not None and len(trials) == 1 else last.knob + (1 if edge == hi else -1)
    step = min(max(guess - last.knob, -max_step), max_step)
    if (step > 0) != (edge == hi) or step == 0:  # a secant through noisy sizes pointing backwards
        step = (1 if edge == hi else -1) * min(max_step, max(abs(step), 1.0))
    guess = min(max(last.knob + step, lo), hi)
    if integer:
        guess = float(round(guess))
        if guess == last.knob:
            guess = last.knob + (1 if edge == hi else -1)
    return guess


# ---- fedsz: the SZ3 error bound ------------------------------------------------------------------
def bound_range(base: SZ3Codec) -> tuple[float, float]:
    """The bounds a budgeted fedsz may use: within 2^±16 of the configured one (REL: at most 1)."""
    b = base.opts.bound
    hi = b * 2.0**SZ3_SPAN
    return b * 2.0**-SZ3_SPAN, min(hi, 1.0) if base.opts.mode == "rel" else hi


def short_bound(log2_bound: float) -> float:
    """``2^log2_bound`` to 4 significant digits: a short, exact JSON number in the header."""
    return float(f"{2.0**log2_bound:.4g}")


class BudgetSZ3Codec(SZ3Codec):
    """The server's sz3 decoder under a budget: any error bound in :func:`bound_range` is accepted.

    SZ3 streams carry what decoding needs, so the bound a client chose is only checked, not used.
    """

    def check_header(self, meta: dict[str, Any]) -> None:
        bound, (lo, hi) = meta.get("bound"), bound_range(self)
        if meta.get("mode") != self.opts.mode:
            raise PayloadError(f"sz3 payload declares mode={meta.get('mode')!r}; this side uses mode={self.opts.mode!r}")
        if type(bound) is not float or not lo <= bound <= hi:
            raise PayloadError(f"sz3 payload declares bound={bound!r}; a budgeted run takes bounds in [{lo:.4g}, {hi:.4g}]")


@dataclass(frozen=True)
class SZ3Budget:
    """A client's search for the SZ3 error bound whose upload is ``target`` bytes."""

    base: SZ3Codec  # the configured codec: its options, and its bound as the starting point
    target: float  # bytes
    model_params: int

    def encode(self, delta: dict[str, Any], ctx: CodecContext, n: int) -> Choice[bytes]:
        """The upload nearest the target (within ``TOLERANCE`` unless out of reach); its knob is log2 of the bound."""
        lo, hi = bound_range(self.base)

        def encode_at(log2_bound: float) -> tuple[int, bytes]:
            codec = SZ3Codec(**{**self.base.config, "bound": short_bound(log2_bound)})
            payload = encode_tensors(codec, delta, ctx, n=n)
            return len(payload), payload

        def first_step(trial: Trial[bytes]) -> float:
            # SZ3 codes about one bit less per value when the bound doubles: move by the missing bits per parameter
            return trial.knob + (trial.size - self.target) * 8.0 / self.model_params

        return search_knob(
            encode_at,
            self.target,
            lo=math.log2(lo),
            hi=math.log2(hi),
            start=math.log2(self.base.opts.bound),
            increasing=False,
            first_step=first_step,
            max_step=4.0,
        )
