"""Attacks: which clients are malicious in a run, and the data poisoning they do.

Run options ``attack``, ``attack_fraction`` and ``attack_scale`` (see docs/strategies.md). The
attackers are a fixed set for the whole run, ⌊attack_fraction · clients + ½⌋ clients drawn
without replacement from ``(run seed, round 0, SERVER, "attackers")``, so every party (server,
local clients, Flower client nodes) knows the same set without talking.

Model poisoning (sign flips, scaling, noise, a mask over every position, huge ZO scalars, inflated
example counts) rewrites an attacker's upload: :func:`fedsqueeze.runtime.faults.with_injected_faults`
wraps the client call, in every runtime. Data poisoning (``label_flip``) is the one data hook:
:func:`poison_labels` maps an attacker's training labels ``y → C − 1 − y`` when the task is built,
so the attacker trains honestly on wrong labels.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from fedsqueeze.config import ATTACKS, RunConfig, attacker_count
from fedsqueeze.seeding import SERVER, np_rng
from fedsqueeze.training import Encoded

__all__ = ["ATTACKS", "attacker_count", "attackers", "poison_labels"]


@lru_cache(maxsize=64)
def _attackers(seed: int, fraction: float, clients: int) -> frozenset[int]:
    k = attacker_count(fraction, clients)
    chosen = np_rng(seed, 0, SERVER, "attackers").choice(clients, size=k, replace=False)
    return frozenset(int(c) for c in chosen)


def attackers(cfg: RunConfig) -> frozenset[int]:
    """The run's attacking clients (empty without an attack)."""
    if cfg.attack == "none":
        return frozenset()
    return _attackers(cfg.seed, cfg.attack_fraction, cfg.clients)


def poison_labels(cfg: RunConfig, train: Encoded, client_indices: list[np.ndarray], num_classes: int) -> Encoded:
    """``train`` with every label-flipping attacker's examples relabelled ``y → C − 1 − y`` (a copy)."""
    if cfg.attack != "label_flip":
        return train
    labels = train.labels.clone()
    for client in sorted(attackers(cfg)):
        idx = torch.from_numpy(client_indices[client])
        labels[idx] = num_classes - 1 - labels[idx]
    return Encoded(train.inputs, labels)
