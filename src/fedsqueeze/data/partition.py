"""Partitioners: which training examples each client holds. Seeded; every client gets >= 1 example."""

from __future__ import annotations

import numpy as np

from fedsqueeze.errors import ConfigError


def iid_partition(n_examples: int, n_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle and cut into ``n_clients`` nearly equal parts."""
    return [np.sort(p) for p in np.array_split(rng.permutation(n_examples), n_clients)]


def dirichlet_partition(labels: np.ndarray, n_clients: int, alpha: float, rng: np.random.Generator, min_size: int = 1) -> list[np.ndarray]:
    """Label skew: each class is split over clients with proportions ~ Dirichlet(alpha).

    Resamples (up to 100 times) until every client has at least ``min_size`` examples.
    """
    classes = np.unique(labels)
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(n_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = rng.dirichlet(np.full(n_clients, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ConfigError(f"could not give each of {n_clients} clients {min_size} example(s) with alpha={alpha}; raise alpha or train_size")


def partition(labels: np.ndarray, n_clients: int, scheme: str, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Dispatch on ``scheme`` ('iid' or 'dirichlet')."""
    if scheme == "iid":
        return iid_partition(len(labels), n_clients, rng)
    if scheme == "dirichlet":
        return dirichlet_partition(labels, n_clients, alpha, rng)
    raise ConfigError(f"unknown partition {scheme!r}; choose 'iid' or 'dirichlet'")
