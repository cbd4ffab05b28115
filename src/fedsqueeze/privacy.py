"""Client-level differential privacy for tensor methods (DP-FedAvg, McMahan et al. 2018).

Each round the server clips every client's update to L2 norm ``C`` over *all* its tensors together,
sums the clipped updates, adds Gaussian noise of standard deviation ``σ·C`` to the sum, and divides
by the *expected* number of participants ``K = clients_per_round`` (a fixed denominator, so one
client's influence on the average is bounded by ``C/K`` whatever happens to the others; clients
that drop out simply contribute nothing). Updates are weighted uniformly, not by example count,
because example-count weights would break that bound.

The privacy loss is tracked with Google's ``dp_accounting`` RDP accountant, composing one
Poisson-sampled Gaussian mechanism per round with sampling rate ``q = clients_per_round / clients``
and noise multiplier ``σ``. The simulator samples a fixed-size subset without replacement; treating
it as Poisson sampling at the same rate is the usual approximation (as in TensorFlow Federated's
DP-FedAvg accounting) and is stated in the docs.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

Tensors = dict[str, np.ndarray]

# Integer Rényi orders only: fractional orders with large q make the accountant's series fail to
# converge (it warns and drops them); integers up to 256 cover every (q, σ, rounds) we run.
RDP_ORDERS = tuple(range(2, 65)) + (80, 96, 128, 160, 192, 256)


@lru_cache(maxsize=1024)
def dp_epsilon(sampling_rate: float, noise_multiplier: float, rounds: int, delta: float) -> float:
    """ε of ``rounds`` compositions of the Poisson-sampled Gaussian mechanism, at ``delta``.

    Returns ``inf`` without noise. Raises ValueError on out-of-range arguments.
    """
    if not 0.0 < sampling_rate <= 1.0:
        raise ValueError(f"sampling rate must be in (0, 1], got {sampling_rate}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if rounds < 0 or noise_multiplier < 0:
        raise ValueError("rounds and noise multiplier must be >= 0")
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    import dp_accounting
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant(orders=list(RDP_ORDERS))
    event = dp_accounting.PoissonSampledDpEvent(sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    accountant.compose(event, count=rounds)
    return float(accountant.get_epsilon(delta))


def global_norm(tensors: Tensors) -> float:
    """L2 norm of all tensors taken together."""
    return math.sqrt(sum(float(np.dot(a.ravel().astype(np.float64), a.ravel().astype(np.float64))) for a in tensors.values()))


def clip_update(tensors: Tensors, clip: float) -> tuple[Tensors, float]:
    """Scale ``tensors`` so their global L2 norm is at most ``clip``; return them and the norm before."""
    norm = global_norm(tensors)
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return {n: (a * scale).astype(np.float32) for n, a in tensors.items()}, norm


def private_mean(
    updates: list[Tensors],
    like: Tensors,
    clip: float,
    noise_multiplier: float,
    denominator: int,
    rng: np.random.Generator,
) -> tuple[Tensors, dict[str, float]]:
    """``(Σ clip(update) + N(0, (σ·C)²)) / denominator``, tensor by tensor.

    ``like`` gives the names and shapes (so a round where every client dropped still gets its noise).
    """
    total = {n: np.zeros(a.shape, dtype=np.float64) for n, a in like.items()}
    norms = []
    for update in updates:
        clipped, norm = clip_update(update, clip)
        norms.append(norm)
        for n in total:
            total[n] += clipped[n]
    std = noise_multiplier * clip
    mean = {}
    for n, s in total.items():
        noise = rng.normal(0.0, std, size=s.shape) if std > 0 else 0.0
        mean[n] = ((s + noise) / denominator).astype(np.float32)
    metrics = {
        "dp_clipped_fraction": float(np.mean([x > clip for x in norms])) if norms else 0.0,
        "dp_mean_update_norm": float(np.mean(norms)) if norms else 0.0,
    }
    return mean, metrics
