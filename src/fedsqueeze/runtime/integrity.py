"""Integrity of the server's model: a guard around every method's ``aggregate``, and the cap on
the example counts clients report.

**Example counts.** A client's count is its weight in the mean. ``decode_update`` rejects a count
above the partition the server assigned that client (the server builds the same task as its
clients, in every runtime). ``max_client_examples`` > 0 also clips every count to that cap
(:func:`clip_examples`), for deployments whose nodes hold data the server did not assign, or to
bound any one client's share; the round record lists each clipped count (``clipped_examples``).

**Finite model.** The server never adopts a non-finite model.

Every decoded update is finite (``decode_update`` checks it), and the tensor means are taken in
float64 (:func:`fedsqueeze.methods.updates.weighted_mean`), yet finite values can still leave the
training dtype's range: a float32 update near 3.4e38 times ``server_lr`` = 2, a server optimizer's
step, a zeroth-order step. The rule, for every method and runtime alike:

1. Aggregate the round's updates on a copy of the server state. If every float in the new state
   is finite, adopt it.
2. Otherwise aggregate each client's update alone, from the same previous state. A client whose
   update alone gives a non-finite state is dropped for the round, with the reason (which part of
   the state it broke), as a bad payload would be.
3. Aggregate the remaining clients (at least ``min_clients`` of them). If that is finite, adopt it.
4. Otherwise the fault cannot be pinned on any one client (only their combination overflows), or
   too few clients are left: the round keeps the previous model, and its record says why
   (``aggregate_rejected``).

For FedAvg's weighted mean step 3 always succeeds: the new model is a convex combination of the
single-client models of step 2 (``w + lr·Σ p_i Δ_i = Σ p_i (w + lr·Δ_i)``, Σ p_i = 1), each finite.
Huge but representable updates (the model is finite, yet useless) are what ``max_update_norm`` and
the robust aggregation rules are for.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedsqueeze.methods import Method, RoundContext

log = logging.getLogger("fedsqueeze")


def nonfinite_part(tree: Any, where: str = "state") -> str | None:
    """The path of the first float array or number in ``tree`` holding NaN or infinity, else None."""
    if isinstance(tree, np.ndarray):
        if np.issubdtype(tree.dtype, np.floating) and not np.all(np.isfinite(tree)):
            return where
        return None
    if isinstance(tree, (float, np.floating)):
        return None if np.isfinite(tree) else where
    if isinstance(tree, dict):
        items: Any = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return None
    for key, value in items:
        found = nonfinite_part(value, f"{where}[{key!r}]")
        if found is not None:
            return found
    return None


@dataclass
class Aggregated:
    """What the guarded aggregation of one round decided."""

    state: Any
    metrics: dict[str, Any]
    aggregated: int  # how many clients' updates the adopted state holds (0: the previous model was kept)
    dropped: dict[int, str] = field(default_factory=dict)  # client: why its update was refused
    rejected: str | None = None  # why the previous model was kept, if it was


def _try(method: Method, state: Any, updates: dict[int, Any], ctx: RoundContext) -> tuple[Any, dict[str, Any], str | None]:
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is what the check below is for
        new, metrics = method.aggregate(copy.deepcopy(state), updates, ctx)
    return new, metrics, nonfinite_part(new)


def aggregate_finite(method: Method, state: Any, updates: dict[int, Any], ctx: RoundContext, min_clients: int = 1) -> Aggregated:
    """``method.aggregate`` under the rule of this module; ``state`` itself is never modified."""
    new, metrics, bad = _try(method, state, updates, ctx)
    if bad is None:
        return Aggregated(new, metrics, len(updates))
    dropped = {}
    for client in sorted(updates):
        alone = _try(method, state, {client: updates[client]}, ctx)[2]
        if alone is not None:
            dropped[client] = f"update would make the global model non-finite (at {alone})"
    rest = {c: u for c, u in updates.items() if c not in dropped}
    if dropped and rest and len(rest) >= min_clients:
        new, metrics, bad = _try(method, state, rest, ctx)
        if bad is None:
            return Aggregated(new, metrics, len(rest), dropped)
    if not dropped:
        reason = (
            f"the aggregate of clients {sorted(updates)} is not finite (at {bad}), though each update alone is; kept the previous model"
        )
    elif rest and len(rest) >= min_clients:
        reason = f"the aggregate of the other clients {sorted(rest)} is not finite either (at {bad}); kept the previous model"
    else:
        reason = f"{len(rest)} clients left after dropping {sorted(dropped)}, min_clients={min_clients}; kept the previous model"
    log.warning("round %d: %s", ctx.round, reason)
    return Aggregated(state, {}, 0, dropped, reason)


def clip_examples(update: Any, cap: int) -> tuple[Any, int | None]:
    """``update`` with its example count ``n`` clipped to ``cap`` (0: no cap), and the count it
    reported if that was clipped (else None). An update without a count (DeComFL's zeroth-order
    scalars, averaged unweighted) is returned as it is."""
    n = getattr(update, "n", None)
    if cap <= 0 or not isinstance(n, int) or n <= cap:
        return update, None
    return dataclasses.replace(update, n=cap), n
