"""Byzantine-robust aggregation rules: how the server combines a round's client updates.

Tensor rules (option ``robust`` of every tensor method), found by name in :data:`TENSOR_RULES`;
each takes the clients' deltas and example counts and returns one combined delta:

- ``mean``         — the example-weighted mean (FedAvg; not robust: one client can move it anywhere).
- ``median``       — coordinate-wise median (Yin et al. 2018), unweighted.
- ``trimmed_mean`` — coordinate-wise β-trimmed mean (Yin et al. 2018): per coordinate, drop the
  ⌊β·k⌋ largest and ⌊β·k⌋ smallest of the k values and average the rest, unweighted.
- ``krum``         — Krum (Blanchard et al. 2017): the one delta whose summed squared distance to
  its k − f − 2 nearest other deltas is smallest (f = ``krum_f``, the attackers tolerated).
- ``multi_krum``   — the ``krum_m`` deltas with the best Krum scores (0 = k − f), example-weighted mean.
- ``centered_clip`` — centered clipping (Karimireddy, He, Jaggi, ICML 2021): from v = the coordinate
  median, ``cclip_iters`` times v ← v + (1/k)·Σ clip_τ(δ_i − v), where clip_τ scales a vector over all
  its tensors down to L2 norm τ (``cclip_tau``; 0 = the median of the clients' ‖δ_i − v₀‖).

``norm_bound`` (Sun et al. 2019, "Can you really backdoor FL?") composes with any of them: each
client's delta is first scaled down to at most that L2 norm over all its tensors.

Vote and scalar rules for the other method families live here too: :func:`cap_flips` (a mask
client may flip at most a fraction of the positions) and :func:`trimmed_votes` (per-position
trimmed vote counts) for the mask methods, and :data:`SCALAR_RULES` (mean, median, trimmed mean,
multi-Krum) for DeComFL's zeroth-order scalars.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedsqueeze.methods.updates import weighted_mean_f32 as mean_f32
from fedsqueeze.privacy import clip_update

Tensors = dict[str, np.ndarray]
CHUNK = 1 << 20  # values per tensor chunk when computing Krum's distances


@dataclass(frozen=True)
class RobustRule:
    """A tensor rule by name and its hyper-parameters."""

    rule: str = "mean"
    beta: float = 0.1  # trimmed_mean: fraction trimmed from each end
    f: int = 1  # krum / multi_krum: attackers tolerated
    m: int = 0  # multi_krum: deltas averaged (0 = k - f)
    norm_bound: float = 0.0  # clip each delta to this L2 norm first (0 = off)
    tau: float = 0.0  # centered_clip: clipping radius (0 = the median distance to the start)
    iters: int = 3  # centered_clip: clipping iterations

    def combine(self, deltas: list[Tensors], counts: list[int]) -> tuple[Tensors, dict[str, float]]:
        """The combined delta of the clients' ``deltas`` (example counts ``counts``) and the rule's metrics."""
        metrics: dict[str, float] = {}
        if self.norm_bound > 0:
            clipped = [clip_update(d, self.norm_bound) for d in deltas]
            deltas = [d for d, _ in clipped]
            metrics["norm_bounded"] = float(sum(norm > self.norm_bound for _, norm in clipped))
        combined, extra = TENSOR_RULES[self.rule](self, deltas, counts)
        return combined, {**metrics, **extra}


def _mean(deltas: list[Tensors], counts: list[int]) -> Tensors:
    """Σ (n_i / Σn) · δ_i, tensor by tensor, in float32 (see :func:`weighted_mean`)."""
    return {name: mean_f32([d[name] for d in deltas], counts) for name in deltas[0]}


def weighted_mean(rule: RobustRule, deltas: list[Tensors], counts: list[int]) -> tuple[Tensors, dict[str, float]]:
    """Σ (n_i / Σn) · δ_i, tensor by tensor (FedAvg's rule): summed in float64, so finite float32 deltas
    never overflow it (updates.weighted_mean), then float32 (a convex combination stays in range);
    in blocks of coordinates, so the float64 sum never spans a whole tensor (updates.weighted_mean_f32)."""
    return _mean(deltas, counts), {}


def coordinate_median(rule: RobustRule, deltas: list[Tensors], counts: list[int]) -> tuple[Tensors, dict[str, float]]:
    """The median of each coordinate over the clients (the mean of the two middle values for even k)."""
    return {name: np.median(np.stack([d[name] for d in deltas]), axis=0).astype(np.float32) for name in deltas[0]}, {}


def trim_count(k: int, beta: float) -> int:
    """Values dropped from each end of k: ⌊β·k⌋, but always leaving at least one."""
    return min(int(np.floor(beta * k)), (k - 1) // 2)


def trimmed_mean_of(values: np.ndarray, beta: float) -> np.ndarray:
    """The β-trimmed mean along axis 0 of ``values`` (k × ...), in float64."""
    t = trim_count(values.shape[0], beta)
    ordered = np.sort(values, axis=0)  # in the input's dtype: no float64 copy of a k × 11M stack
    return ordered[t : values.shape[0] - t].mean(axis=0, dtype=np.float64)


def trimmed_mean(rule: RobustRule, deltas: list[Tensors], counts: list[int]) -> tuple[Tensors, dict[str, float]]:
    """Coordinate-wise β-trimmed mean over the clients."""
    combined = {name: trimmed_mean_of(np.stack([d[name] for d in deltas]), rule.beta).astype(np.float32) for name in deltas[0]}
    return combined, {"trimmed_each_end": float(trim_count(len(deltas), rule.beta))}


def pairwise_sq_distances(deltas: list[Tensors]) -> np.ndarray:
    """k × k squared L2 distances between the deltas over all tensors, accumulated tensor by tensor (float64)."""
    k = len(deltas)
    dist = np.zeros((k, k), dtype=np.float64)
    for name in deltas[0]:
        size = deltas[0][name].size
        for lo in range(0, size, CHUNK):  # float64 a chunk at a time: exact enough, bounded memory
            flat = np.stack([d[name].reshape(-1)[lo : lo + CHUNK].astype(np.float64) for d in deltas])
            for i in range(k):
                dist[i] += np.einsum("ij,ij->i", flat - flat[i], flat - flat[i])
    return dist


def krum_scores(deltas: list[Tensors], f: int) -> np.ndarray:
    """Each delta's Krum score: the sum of its squared distances to its k − f − 2 nearest others (at least 1)."""
    k = len(deltas)
    dist = pairwise_sq_distances(deltas)
    nearest = min(max(1, k - f - 2), max(k - 1, 0))
    scores = np.zeros(k)
    for i in range(k):
        others = np.sort(np.delete(dist[i], i))
        scores[i] = others[:nearest].sum()
    return scores


def _krum_select(f: int, deltas: list[Tensors], counts: list[int], m: int) -> tuple[Tensors, dict[str, float]]:
    """The example-weighted mean of the ``m`` deltas with the lowest Krum scores (f attackers tolerated)."""
    order = np.argsort(krum_scores(deltas, f), kind="stable")[:m]
    chosen = [int(i) for i in sorted(order)]
    combined = _mean([deltas[i] for i in chosen], [counts[i] for i in chosen])
    return combined, {"krum_selected": float(len(chosen)), "krum_first": float(order[0])}


def krum(rule: RobustRule, deltas: list[Tensors], counts: list[int]) -> tuple[Tensors, dict[str, float]]:
    """The single delta with the lowest Krum score (ties: the lower position)."""
    return _krum_select(rule.f, deltas, counts, 1)


def multi_krum(rule: RobustRule, deltas: list[Tensors], counts: list[int]) -> tuple[Tensors, dict[str, float]]:
    """The example-weighted mean of the ``m`` deltas with the lowest Krum scores (m = 0: k − f)."""
    k = len(deltas)
    m = rule.m if rule.m > 0 else k - rule.f
    return _krum_select(rule.f, deltas, counts, min(max(m, 1), k))


def _sq_distance(delta: Tensors, center: dict[str, np.ndarray]) -> float:
    """‖δ − v‖² over all tensors, in float64."""
    total = 0.0
    for name, value in center.items():
        diff = delta[name].astype(np.float64) - value
        total += float(np.einsum("i,i->", diff.reshape(-1), diff.reshape(-1)))
    return total


def centered_clip(rule: RobustRule, deltas: list[Tensors], counts: list[int]) -> tuple[Tensors, dict[str, float]]:
    """Centered clipping from the coordinate median, unweighted (an attacker moves v by at most τ/k per iteration)."""
    k = len(deltas)
    center = {name: np.median(np.stack([d[name] for d in deltas]), axis=0).astype(np.float64) for name in deltas[0]}
    tau = rule.tau if rule.tau > 0 else float(np.median(np.sqrt([_sq_distance(d, center) for d in deltas])))
    clipped = 0
    for _ in range(rule.iters):
        dists = np.sqrt([_sq_distance(d, center) for d in deltas])
        scales = [min(1.0, tau / dist) if dist > 0 else 1.0 for dist in dists]
        clipped = sum(s < 1.0 for s in scales)
        center = {
            name: value + sum(s * (d[name].astype(np.float64) - value) for d, s in zip(deltas, scales)) / k
            for name, value in center.items()
        }
    combined = {name: value.astype(np.float32) for name, value in center.items()}
    return combined, {"cclip_tau": tau, "cclip_clipped": float(clipped)}


TENSOR_RULES: dict[str, Callable[[RobustRule, list[Tensors], list[int]], tuple[Tensors, dict[str, float]]]] = {
    "mean": weighted_mean,
    "median": coordinate_median,
    "trimmed_mean": trimmed_mean,
    "krum": krum,
    "multi_krum": multi_krum,
    "centered_clip": centered_clip,
}


# ---- ZO scalars ---------------------------------------------------------------------------------


def scalar_mean(stacked: np.ndarray, beta: float, f: int) -> np.ndarray:
    """The mean over clients (axis 0)."""
    return stacked.mean(axis=0, dtype=np.float64)  # a float32 sum of scalars near 3.4e38 would be inf


def scalar_median(stacked: np.ndarray, beta: float, f: int) -> np.ndarray:
    """The median over clients (axis 0)."""
    return np.median(stacked, axis=0)


def scalar_trimmed_mean(stacked: np.ndarray, beta: float, f: int) -> np.ndarray:
    """The β-trimmed mean over clients (axis 0)."""
    return trimmed_mean_of(stacked, beta).astype(stacked.dtype)


def scalar_multi_krum(stacked: np.ndarray, beta: float, f: int) -> np.ndarray:
    """Multi-Krum over the clients' scalar blocks (rows of axis 0): the unweighted mean of the k − f best-scored."""
    k = stacked.shape[0]
    blocks = [{"g": row} for row in stacked]
    combined, _ = _krum_select(f, blocks, [1] * k, min(max(k - f, 1), k))
    return combined["g"]


# each rule takes (stacked k × ... scalars, trim_beta, krum_f) and reads what it needs
SCALAR_RULES: dict[str, Callable[[np.ndarray, float, int], np.ndarray]] = {
    "mean": scalar_mean,
    "median": scalar_median,
    "trimmed_mean": scalar_trimmed_mean,
    "multi_krum": scalar_multi_krum,
}


# ---- mask votes ---------------------------------------------------------------------------------


def cap_flips(mask: np.ndarray, ref: np.ndarray, cap: float) -> tuple[np.ndarray, bool]:
    """A client's mask, or ``ref`` (no vote for any change) if it differs from ``ref`` in more than
    ``cap`` of the positions; and whether it was capped. ``cap <= 0`` caps nothing."""
    if cap <= 0:
        return mask, False
    flips = int(np.count_nonzero(mask != ref))
    if flips > cap * mask.size:
        return ref.copy(), True
    return mask, False


def trimmed_votes(votes: np.ndarray, beta: float) -> np.ndarray:
    """Per-position trimmed vote sum of k clients' votes (k × n): the β-trimmed mean times k.

    With votes in {0, 1} (or {−1, 0, 1} for delta votes), trimming ⌊β·k⌋ from each end drops the
    extreme voters position by position, so a few clients voting the same way everywhere cannot
    move a position the others agree on.
    """
    k = votes.shape[0]
    return trimmed_mean_of(votes, beta) * k
