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

A streamed round (:class:`StreamGuard`, the engine's path for the rules that fold one update at a
time) applies the same rule with the same results: each update's step-2 trial is made as it
arrives, and the sum without the failing clients is kept aside from the first failure on.

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
from fedsqueeze.methods.updates import Accumulator, nonfinite_part

log = logging.getLogger("fedsqueeze")


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
            dropped[client] = _alone_reason(alone)
    rest = {c: u for c, u in updates.items() if c not in dropped}
    if dropped and rest and len(rest) >= min_clients:
        new, metrics, bad = _try(method, state, rest, ctx)
        if bad is None:
            return Aggregated(new, metrics, len(rest), dropped)
    return _kept(state, ctx, sorted(updates), dropped, sorted(rest), bad, min_clients)


def _alone_reason(where: str) -> str:
    return f"update would make the global model non-finite (at {where})"


def _kept(
    state: Any, ctx: RoundContext, clients: list[int], dropped: dict[int, str], rest: list[int], bad: str | None, min_clients: int
) -> Aggregated:
    """The round keeps the previous model: why (step 4 of the rule)."""
    if not dropped:
        reason = f"the aggregate of clients {clients} is not finite (at {bad}), though each update alone is; kept the previous model"
    elif rest and len(rest) >= min_clients:
        reason = f"the aggregate of the other clients {rest} is not finite either (at {bad}); kept the previous model"
    else:
        reason = f"{len(rest)} clients left after dropping {sorted(dropped)}, min_clients={min_clients}; kept the previous model"
    log.warning("round %d: %s", ctx.round, reason)
    return Aggregated(state, {}, 0, dropped, reason)


class StreamGuard:
    """:func:`aggregate_finite` over a method's :class:`~fedsqueeze.methods.updates.Accumulator`:
    each update is folded in as it arrives, then dropped, with the very decisions and bits of the
    list path.

    Step 2 of the rule needs each update alone, which is gone by the end of the round, so each
    update's single-client trial is made when it arrives (``Accumulator.alone``, a blockwise pass
    over it). Step 3 needs the sum without the clients step 2 drops: from the first update whose
    trial fails, a second accumulator holds the others (a copy of the sum so far, then every
    update whose trial passes), so in the usual round nothing is held twice.
    """

    def __init__(self, acc: Accumulator, ctx: RoundContext, min_clients: int = 1) -> None:
        self.all, self.ctx, self.min_clients = acc, ctx, min_clients
        self.rest: Accumulator | None = None  # the sum without the clients whose trial failed
        self.clients: list[int] = []
        self.failed: dict[int, str] = {}  # client: why its update alone breaks the model

    def add(self, client: int, update: Any) -> None:
        """Fold one client's decoded update in (clients in increasing order)."""
        prepared = self.all.prepare(client, update)
        with np.errstate(over="ignore", invalid="ignore"):
            alone = self.all.alone(client, prepared)
        if alone is not None:
            self.failed[client] = _alone_reason(alone)
            if self.rest is None:
                self.rest = self.all.copy()
        elif self.rest is not None:
            self.rest.add(client, prepared)
        self.all.add(client, prepared)
        self.clients.append(client)

    def finish(self, state: Any) -> Aggregated:
        """The guarded aggregate of every update folded in; ``state`` (the round's start) is never modified."""
        new, metrics, bad = _finish(self.all)
        if bad is None:
            return Aggregated(new, metrics, len(self.clients))
        rest = [c for c in self.clients if c not in self.failed]
        if self.failed and rest and len(rest) >= self.min_clients and self.rest is not None:
            new, metrics, bad = _finish(self.rest)
            if bad is None:
                return Aggregated(new, metrics, len(rest), dict(self.failed))
        return _kept(state, self.ctx, sorted(self.clients), dict(self.failed), rest, bad, self.min_clients)


def _finish(acc: Accumulator) -> tuple[Any, dict[str, Any], str | None]:
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is what the check is for
        new, metrics = acc.finish()
    return new, metrics, nonfinite_part(new)


def clip_examples(update: Any, cap: int) -> tuple[Any, int | None]:
    """``update`` with its example count ``n`` clipped to ``cap`` (0: no cap), and the count it
    reported if that was clipped (else None). An update without a count (DeComFL's zeroth-order
    scalars, averaged unweighted) is returned as it is."""
    n = getattr(update, "n", None)
    if cap <= 0 or not isinstance(n, int) or n <= cap:
        return update, None
    return dataclasses.replace(update, n=cap), n
