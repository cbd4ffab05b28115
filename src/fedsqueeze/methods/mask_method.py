"""MaskMethod: the shared machinery of the mask methods (fedpm, deltamask, deltamask-exact).

A frozen pre-trained backbone whose Linear weights each get a mask score (see
:mod:`fedsqueeze.masking`); clients train the scores and the head, then upload a coded mask and
the head delta. This module holds what every mask method shares: options, model set-up, the
server state (θ as integer symbols), the coded downlink (:mod:`fedsqueeze.methods.mask_wire`),
the strata and uniforms of the mask draw, the Beta and delta aggregation rules, evaluation and the
client's round. How a client's mask is coded is each method's own: :meth:`MaskMethod.encode_mask`,
:meth:`~MaskMethod.decode_mask` and :meth:`~MaskMethod.rebuild_mask` (FedPM in
:mod:`fedsqueeze.methods.fedpm`, DeltaMask in :mod:`fedsqueeze.methods.deltamask`). The rules
themselves are described in :mod:`fedsqueeze.methods.fedpm`.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedsqueeze.codecs.ans import chunk_size
from fedsqueeze.codecs.positions import entropy_bound_bits
from fedsqueeze.codecs.sideinfo import chunked_contexts, decode_flips_counted, encode_flips, flip_bound_bits, flip_contexts
from fedsqueeze.errors import ConfigError, PayloadError
from fedsqueeze.masking import MaskedModel, clip_probs, logit, select_masked, shared_uniforms, stratified_uniforms, train_masked
from fedsqueeze.methods.base import OPTIMIZERS, ClientOutput, Method, RoundContext, RoundMemo, state_digest
from fedsqueeze.methods.downlink import MODES, VIEW_KEY, catch_up_meta_bytes
from fedsqueeze.methods.head import head_names
from fedsqueeze.methods.mask_downlink import PART_META_BYTES, MaskDeltaDownlink, SideInfo, change_contexts, symbol_dtype
from fedsqueeze.methods.mask_wire import MaskLimits, MaskWire, parse_stratum
from fedsqueeze.methods.robust import cap_flips, trimmed_votes
from fedsqueeze.methods.updates import ExactFlips, FilterFlips, MaskCode, MaskUpdate, stepped, weighted_mean
from fedsqueeze.methods.weights import evaluate_weights, load_weights, named_params, read_weights
from fedsqueeze.options import above, at_least, between, option
from fedsqueeze.seeding import SERVER, np_rng
from fedsqueeze.training import num_local_steps

EVAL_MASKS = ("expected", "threshold", "sample")
AGGREGATES = ("beta", "delta")
AGGREGATED_KEY = "aggregated"  # downlink=delta: the round and clients of the last aggregation
INIT_LEVELS = 255  # θ before round 1 (and with carried priors) travels as a uint8 level


@dataclass
class MaskOptions:
    theta_init: float = option(0.95, "initial keep probability of every masked weight", check=between(0.0, 1.0, lo_open=True))
    clip_eps: float = option(
        0.02, "clients start from θ_global clipped to [eps, 1-eps] (finite scores)", check=between(0.0, 0.5, lo_open=True, hi_open=True)
    )
    score_lr: float = option(0.1, "learning rate of the mask scores", check=above(0.0))
    head_lr: float = option(1e-2, "learning rate of the classification head", check=at_least(0.0))
    optimizer: str = option("adam", "local optimizer", choices=OPTIMIZERS)
    mask_embeddings: bool = option(False, "mask the embedding tables too (not only Linear weights)")
    carry_priors: bool = option(False, "keep the Beta priors across rounds instead of resetting them (aggregate=beta only)")
    eval_mask: str = option("expected", "evaluation mask: expected (W·θ), threshold (θ>0.5) or sample (seeded draw)", choices=EVAL_MASKS)
    head_dtype: str = option("float32", "head weights and deltas on the wire", choices=("float32", "float16"))
    stratify: bool = option(False, "stratified mask uniforms across a round's clients (no drift of θ from sampling noise)")
    aggregate: str = option("beta", "server rule: beta (θ = Σm/K, FedPM) or delta (θ += mean of m − reference mask)", choices=AGGREGATES)
    client_flip_cap: float = option(
        0.0,
        "robust: a client whose mask differs from its reference in more than this fraction of positions is ignored (0 = off)",
        check=between(0.0, 1.0),
    )
    vote_trim: float = option(
        0.0,
        "robust: per-position trimmed vote, dropping this fraction β of the votes at each end (0 = plain sum)",
        check=between(0.0, 0.5, hi_open=True),
    )

    downlink: str = option(
        "delta",
        "full: the whole coded θ every round; delta: only the θ symbols that changed since the client's view (replay or refresh)",
        choices=MODES,
    )

    def validate(self) -> None:
        if self.aggregate == "delta" and self.carry_priors:
            raise ConfigError("option 'carry_priors' applies to aggregate=beta only, not aggregate=delta")


def delta_symbols(theta_start: np.ndarray, counts: np.ndarray, k: int) -> np.ndarray:
    """The delta rule's θ symbols: ``θ_start + counts / k`` clipped to [0, 1], at ``INIT_LEVELS`` levels
    (elementwise float32, so the server's aggregation and the downlink's outcome table agree bit for bit)."""
    theta = np.clip(theta_start + counts.astype(np.float32) / np.float32(k), 0.0, 1.0)
    return np.rint(theta * INIT_LEVELS).astype(np.uint8)


class MaskMethod(Method):
    """Shared machinery of the mask methods: model, training, server state, downlink, aggregation.

    Subclasses code the client's mask: :meth:`encode_mask` (client) and :meth:`decode_mask`
    (server, validation only) and :meth:`rebuild_mask` (server, inside aggregation, where the
    client id is known).
    """

    Options = MaskOptions
    uplink_kind: str = "fedpm-up"

    def needs_reference(self) -> bool:
        """Whether :meth:`rebuild_mask` needs the reference mask ``u < θ_start`` (codes of flips do)."""
        return False

    # ---- setup ----------------------------------------------------------------------------------
    def setup(self, task) -> None:
        self.task = task
        self.layout = select_masked(task.model, self.opts.mask_embeddings)
        self.head_names = head_names(task.model)
        for n, p in task.model.named_parameters():
            p.requires_grad_(n in self.head_names)
        self.head_named = named_params(task.model, self.head_names)
        self.head_params = list(self.head_named.values())
        self.head_shapes = {n: tuple(p.shape) for n, p in self.head_named.items()}
        self.masked = MaskedModel(task.model, self.layout)
        self.n = self.layout.total
        self.wire = MaskWire(self.n, self.head_shapes, self.opts.head_dtype)
        # the round's downlink (meta, body), keyed by the θ and head it encodes
        self._downlink = RoundMemo()
        # θ has 255 levels, or K (the Beta rule's Σm/K) with K at most the round's clients
        self.max_levels = max(INIT_LEVELS, self.cfg.clients_per_round)
        delta = self.opts.downlink == "delta"
        self.delta_downlink = MaskDeltaDownlink(self.n, self.max_levels, self.cfg.clients_per_round) if delta else None

    def trainable_params(self) -> int:
        return self.n + sum(p.numel() for p in self.head_params)

    # ---- θ on both sides ------------------------------------------------------------------------
    @staticmethod
    def theta_of(sym: np.ndarray, levels: int) -> np.ndarray:
        """θ from its integer symbols; computed identically by server and clients."""
        return sym.astype(np.float32) / np.float32(levels)

    def start_theta(self, theta: np.ndarray) -> np.ndarray:
        """The probabilities a client starts from (and the reference mask is drawn from)."""
        return clip_probs(theta, self.opts.clip_eps)

    # ---- server ---------------------------------------------------------------------------------
    def initial_theta(self) -> np.ndarray:
        """θ's symbols before round 1 (``INIT_LEVELS`` levels): every party builds the same."""
        return np.full(self.n, round(self.opts.theta_init * INIT_LEVELS), dtype=np.uint8)

    def init_server(self) -> dict[str, Any]:
        sym = self.initial_theta()
        state: dict[str, Any] = {"theta_sym": sym, "levels": INIT_LEVELS, "head": read_weights(self.head_named)}
        if self.opts.carry_priors:
            state["alpha"] = np.ones(self.n, dtype=np.float32)
            state["beta"] = np.ones(self.n, dtype=np.float32)
        if self.delta_downlink is not None:
            state[VIEW_KEY] = self.delta_downlink.init_state(sym, INIT_LEVELS)
        return state

    def downlink_for(self, state: dict[str, Any], ctx: RoundContext, client: int, held: tuple[int, int] | None) -> bytes:
        if self.delta_downlink is None:
            return self.downlink(state, ctx, client)
        view = state[VIEW_KEY]
        # the first message of a round moves the server's view to this round's θ (and keeps the step)
        self.delta_downlink.advance(
            view, state["theta_sym"], int(state["levels"]), ctx.round, lambda: self._server_step_side(state, view["sym"], ctx.round)
        )
        catch_up, parts = self.delta_downlink.catch_up(view, 0 if held is None else int(held[0]))
        return self.wire.encode_delta_downlink(catch_up, parts, state["head"], self.stratum(ctx, client) if self.opts.stratify else None)

    def downlink(self, state: dict[str, Any], ctx: RoundContext, client: int) -> bytes:
        if self.delta_downlink is not None:  # a caller that does not say what the client holds: its initial view
            return self.downlink_for(state, ctx, client, None)
        shared = {k: state[k] for k in ("theta_sym", "levels", "head")}

        def encode() -> tuple[dict[str, Any], bytes]:
            return self.wire.encode_downlink_body(state["theta_sym"], int(state["levels"]), state["head"])

        meta, body = self._downlink.get((ctx.round, state_digest(shared)), encode)
        return self.wire.frame_downlink(meta, body, self.stratum(ctx, client) if self.opts.stratify else None)

    def stratum(self, ctx: RoundContext, client: int) -> tuple[int, int]:
        """``client``'s stratum ``(k, K)`` this round: a pure function of the round, never of call order.

        ``k`` is the client's index among ``ctx.participants`` (sorted) and ``K`` their number.
        Without participants (a caller that does not set them) ``K`` = clients_per_round and
        ``k = client mod K``: still the same on both sides, but two clients may share a stratum.
        """
        if not ctx.participants:
            k = self.cfg.clients_per_round
            return client % k, k
        if client not in ctx.participants:
            raise PayloadError(f"client {client} is not among this round's participants, so it has no stratum")
        return ctx.participants.index(client), len(ctx.participants)

    # ---- the delta downlink's side information: the last round's aggregated clients' draws ------------
    def step_side(self, round_: int, clients: list[int], strata: list[tuple[int, int]] | None, sym: np.ndarray, levels: int) -> SideInfo:
        """The side information of the step that round ``round_``'s aggregation of ``clients`` made of θ ``sym``.

        Both ends rebuild each client's uniforms and θ_start (as the server's aggregation did) and,
        per reference bit ``r``, the nearest bin ``b_r`` of ``|u − θ_start|`` over the clients with that
        bit (:func:`~fedsqueeze.codecs.sideinfo.flip_contexts`: a flip happens where ``u`` is near
        θ_start). With ``b`` the nearer of the two (ties: reference 1) and ``r`` its bit, a position's
        change context is ``2 · b + r`` (capped at 61), and its value group ``2 · r + o``, ``o`` = 1
        where a client of the other bit is within one octave (``b_{1−r} + 2 ≥ b``: the vote may go
        either way); a reference 1 can only flip down, a 0 only up. Positions whose θ the clip moved
        to another symbol (near 0 or 1: they move back unless voted) have contexts 62 and 63 and
        value group 4. Under the delta rule the values are the vote counts (:meth:`step_outcomes`).
        """
        ctx = RoundContext(round=round_, rounds=self.cfg.rounds, seed=self.cfg.seed)
        theta = self.theta_of(sym, levels)
        theta_start = self.start_theta(theta)
        nearest = np.zeros((2, self.n), dtype=np.uint8)  # per reference bit: 1 + the nearest bin (0: no client)
        for i, client in enumerate(clients):
            c = flip_contexts(self.uniforms(ctx, client, strata[i] if strata else None), theta_start)
            bins = (c >> 1) + 1
            for r in (0, 1):
                np.maximum(nearest[r], np.where((c & 1) == r, bins, 0), out=nearest[r])
        ref = (nearest[1] >= nearest[0]).astype(np.uint8)
        best = np.maximum(nearest[0], nearest[1]) - 1  # every position has some client: at least bin 0
        other = np.minimum(nearest[0], nearest[1])  # the other bit's 1 + bin (0: none)
        contexts = np.minimum((best << 1) | ref, 61).astype(np.uint8)
        groups = (ref << 1) | ((other > 0) & (other.astype(np.int16) + 1 >= best)).astype(np.uint8)
        clipped = np.rint(theta_start * np.float32(levels)) != sym  # the clip moved it to another symbol
        contexts[clipped] = 62 + (theta[clipped] < 0.5)
        groups[clipped] = 4
        return SideInfo(contexts, groups, self.step_outcomes(levels, len(clients)))

    def step_outcomes(self, levels: int, k: int) -> np.ndarray | None:
        """The delta rule's outcomes (:class:`~fedsqueeze.methods.mask_downlink.SideInfo`): for each held
        symbol and vote count 0, +1, −1, …, ±k of ``k`` clients, the symbol :meth:`_update_theta` makes
        (the same function, so both ends agree bit for bit); None for the Beta rule."""
        if self.opts.aggregate != "delta" or levels != INIT_LEVELS or k < 1:
            return None
        counts = np.array([0, *(c * s for c in range(1, k + 1) for s in (1, -1))], dtype=np.int32)
        held: np.ndarray = np.arange(levels + 1, dtype=symbol_dtype(levels))
        theta_start = self.start_theta(self.theta_of(held, levels))
        return delta_symbols(theta_start[:, None], counts[None, :], k)

    def _server_step_side(self, state: dict[str, Any], sym: np.ndarray, round_: int) -> tuple[SideInfo, dict[str, Any]] | None:
        """Server: the side information of round ``round_``'s step, when the last aggregation (round ``round_ − 1``) made it."""
        agg = state.get(AGGREGATED_KEY)
        if not isinstance(agg, dict) or agg.get("round") != round_ - 1:
            return None
        clients, strata = [int(c) for c in agg["clients"]], agg.get("strata")
        pairs = [(int(k), int(kk)) for k, kk in strata] if strata else None
        extra: dict[str, Any] = {"clients": clients, **({"strata": [list(p) for p in pairs]} if pairs else {})}
        return self.step_side(round_ - 1, clients, pairs, sym, int(state["levels"])), extra

    def _client_step_side(self, meta: dict[str, Any], sym: np.ndarray, levels: int, round_: int) -> SideInfo:
        """Client: the side information a step's header names, checked (clients, strata, the round)."""
        if "clients" not in meta:
            return SideInfo(change_contexts(sym, levels))
        clients, strata = meta.get("clients"), meta.get("strata")
        if not (
            isinstance(clients, list)
            and all(type(c) is int and 0 <= c < self.cfg.clients for c in clients)
            and 1 <= len(clients) <= self.cfg.clients_per_round
            and clients == sorted(set(clients))
            and round_ >= 2
        ):
            raise PayloadError(f"downlink step names invalid aggregated clients {str(clients)[:60]}")
        pairs = None
        if self.opts.stratify:
            if not isinstance(strata, list) or len(strata) != len(clients):
                raise PayloadError("downlink step names no stratum for each aggregated client")
            pairs = [parse_stratum({"stratum": s}) for s in strata]
        elif strata is not None:
            raise PayloadError("downlink step names strata, and this run's draws are not stratified")
        return self.step_side(round_ - 1, clients, pairs, sym, levels)  # type: ignore[arg-type]

    def decode_downlink(self, message: bytes) -> tuple[np.ndarray, int, dict[str, np.ndarray], tuple[int, int] | None]:
        """``(θ symbols, levels, head weights, stratum)`` from the server's message (``downlink=delta``:
        for a client that holds the initial view, i.e. has not taken part yet)."""
        if self.delta_downlink is not None:
            target = self.wire.decode_delta_downlink(message, *self._delta_caps(0, self.cfg.rounds))[0].get("target")
            return self.receive_downlink(message, None, target if type(target) is int else -1)[:4]
        msg = self.wire.decode_downlink(message)
        return msg.sym, msg.levels, msg.head, msg.stratum

    def receive_downlink(
        self, message: bytes, cstate: Any, round_: int
    ) -> tuple[np.ndarray, int, dict[str, np.ndarray], tuple[int, int] | None, Any]:
        """``(θ symbols, levels, head, stratum, client state)`` for a client holding ``cstate``.

        ``downlink=delta``: the θ view this client reaches from the one its state holds (the initial
        θ if none), which goes into the returned state (a new dict: a client that fails later in
        the round keeps the state the server believes it holds). Everything is bounded before it
        is parsed: the header by the rounds it may name, the parts by a refresh's worst case.
        """
        if self.delta_downlink is None:
            sym, levels, head, stratum = self.decode_downlink(message)
            return sym, levels, head, stratum, cstate
        own = dict(cstate) if isinstance(cstate, dict) else {}
        view = own.get(VIEW_KEY)
        if isinstance(view, dict):
            held, sym, levels = int(view["round"]), view["sym"], int(view["levels"])
            if sym.shape != (self.n,) or not 1 <= levels <= self.max_levels or sym.dtype != symbol_dtype(levels):
                raise PayloadError("the client's own θ view does not fit the model")
        else:
            held, sym, levels = 0, self.initial_theta(), INIT_LEVELS
        held = min(max(held, 0), round_)  # held == round_: a retry of this round, the client already holds its view
        meta, parts, head, stratum = self.wire.decode_delta_downlink(message, *self._delta_caps(held, round_))
        sym, levels = self.delta_downlink.receive(meta, parts, held, sym, levels, round_, self._client_step_side)
        own[VIEW_KEY] = {"round": round_, "sym": sym, "levels": levels}
        return sym, levels, head, stratum, own

    def _delta_caps(self, held: int, round_: int) -> tuple[int, int]:
        """Caps on a delta downlink's header and parts for a client holding view ``held`` in round ``round_``:
        the rounds its header may name; a refresh's worst case (a replay is never larger)."""
        meta_cap = catch_up_meta_bytes(held, round_) + 64
        refresh_cap = PART_META_BYTES + 64 + (self.max_levels + 1) * 8 + int(self.n * np.log2(self.max_levels + 1) * 1.02 / 8) + 4096
        return meta_cap, refresh_cap

    def uniforms(self, ctx: RoundContext, client: int, stratum: tuple[int, int] | None) -> np.ndarray:
        """The uniforms of ``client``'s mask draw this round, rebuildable by the server."""
        return next(self.uniform_chunks(ctx, client, stratum, max(self.n, 1)), np.zeros(0, np.float32))

    def uniform_chunks(self, ctx: RoundContext, client: int, stratum: tuple[int, int] | None, step: int) -> Iterator[np.ndarray]:
        """The same uniforms, ``step`` at a time (numpy's stream is the same drawn in pieces)."""
        rng = ctx.rng(client, "mask-draw") if stratum is None else ctx.rng(SERVER, "mask-draw")
        for lo in range(0, self.n, step):
            size = min(step, self.n - lo)
            yield shared_uniforms(rng, size) if stratum is None else stratified_uniforms(rng, size, *stratum)

    def server_uniforms(self, ctx: RoundContext, client: int) -> np.ndarray:
        """Server: the same uniforms, from the stratum it gave ``client`` this round."""
        return self.uniforms(ctx, client, self.stratum(ctx, client) if self.opts.stratify else None)

    def decode_update(self, payload: bytes, client: int, state: dict[str, Any], ctx: RoundContext) -> MaskUpdate:
        limits = self.mask_limits(state, ctx)
        up = self.wire.decode_uplink(self.uplink_kind, payload, client, self.task.client_sizes(), limits)
        return MaskUpdate(up.n, up.head_delta, self.decode_mask(up.mask_meta, up.mask_body, state, ctx, client))

    def aggregate(
        self, state: dict[str, Any], updates: dict[int, MaskUpdate], ctx: RoundContext
    ) -> tuple[dict[str, Any], dict[str, float]]:
        if not updates:
            return state, {}
        # Memory per masked weight, besides what rebuild_mask makes: θ_start (4 bytes), the counts
        # (2 bytes below 2^15 clients), one client's reference mask (1 byte, its uniforms drawn a
        # chunk at a time) and its rebuilt mask; no float uniforms or int32 vote over the mask.
        t0 = time.perf_counter()
        theta_start = self.start_theta(self.theta_of(state["theta_sym"], state["levels"]))
        delta = self.opts.aggregate == "delta"
        # Σm (beta) or Σ(m − ref) (delta): |count| ≤ K, so int16 holds it exactly (the same values as int32)
        counts: np.ndarray = np.zeros(self.n, dtype=np.int16 if len(updates) < 1 << 15 else np.int32)
        extra: dict[str, list[float]] = {}
        cap, trim = self.opts.client_flip_cap, self.opts.vote_trim
        votes = []  # per-client votes, kept only for a trimmed vote
        step = chunk_size(self.n)

        def reference(client: int, theta_start: np.ndarray) -> np.ndarray:
            """``client``'s reference mask u < θ_start: the server's uniforms, drawn ``step`` at a time."""
            ref = np.empty(self.n, dtype=bool)
            stratum = self.stratum(ctx, client) if self.opts.stratify else None
            lo = 0
            for u in self.uniform_chunks(ctx, client, stratum, step):
                np.less(u, theta_start[lo : lo + u.size], out=ref[lo : lo + u.size])
                lo += u.size
            return ref

        for client, upd in updates.items():
            ref = reference(client, theta_start) if (delta or self.needs_reference() or cap > 0) else None
            mask, stats = self.rebuild_mask(upd, theta_start, ref, client, ctx)
            if cap > 0:
                assert ref is not None  # drawn above whenever a cap is set
                mask, capped = cap_flips(mask, ref.astype(mask.dtype), cap)
                stats = {**stats, "flip_capped": float(capped)}
            if trim > 0:
                votes.append((mask - ref if delta else mask).astype(np.int8))
            else:  # counts += m (− ref), in place: integers, so exactly the vote's sum
                counts += mask
                if delta:
                    counts -= ref
            del mask, ref
            for k, v in stats.items():
                extra.setdefault(k, []).append(v)
        if trim > 0:
            counts = np.rint(trimmed_votes(np.stack(votes), trim)).astype(np.int32)
            del votes
        self._update_theta(state, counts, theta_start, len(updates))
        del counts, theta_start
        if self.delta_downlink is not None:  # who made this θ: the next step's side information
            strata = [list(self.stratum(ctx, c)) for c in sorted(updates)] if self.opts.stratify else None
            state[AGGREGATED_KEY] = {
                "round": ctx.round,
                "clients": sorted(int(c) for c in updates),
                **({"strata": strata} if strata else {}),
            }
        weights = [u.n for u in updates.values()]
        for name in self.head_names:
            state["head"][name] = stepped(state["head"][name], weighted_mean([u.head_delta[name] for u in updates.values()], weights))
        theta = self.theta_of(state["theta_sym"], state["levels"])
        metrics = {key: float(np.mean(v)) for key, v in extra.items()}
        metrics.update(self.downlink_metrics(state, ctx))
        metrics.update(
            {
                "mask_keep_frac": float((theta > 0.5).mean()),
                "theta_mean": float(theta.mean()),
                "aggregate_s": time.perf_counter() - t0,
            }
        )
        return state, metrics

    def downlink_metrics(self, state: dict[str, Any], ctx: RoundContext) -> dict[str, float]:
        """``downlink=delta``: this round's θ step (0: none, its levels changed) and a refresh (the whole
        coded θ), in bytes, side by side."""
        view = state.get(VIEW_KEY)
        if not isinstance(view, dict) or int(view["round"]) != ctx.round:
            return {}
        return {"theta_step_bytes": float(view["step_bytes"]), "theta_refresh_bytes": float(view["refresh_bytes"])}

    def _update_theta(self, state: dict[str, Any], counts: np.ndarray, theta_start: np.ndarray, k: int) -> None:
        """The new θ symbols and levels from ``k`` clients' ``counts`` (Σm, or Σ(m − ref) for aggregate=delta)."""
        if self.opts.aggregate == "delta":
            # θ += mean(m − ref): E[m − ref] = θ_client − θ_start, noise only where clients moved
            state["theta_sym"] = delta_symbols(theta_start, counts, k)
            state["levels"] = INIT_LEVELS
        elif self.opts.carry_priors:
            state["alpha"] += counts
            state["beta"] += k - counts
            theta = (state["alpha"] - 1) / np.maximum(state["alpha"] + state["beta"] - 2, 1e-9)
            state["theta_sym"] = np.rint(np.clip(theta, 0, 1) * INIT_LEVELS).astype(np.uint8)
            state["levels"] = INIT_LEVELS
        else:  # α = 1 + Σm, β = 1 + K − Σm  ⇒  θ = Σm / K exactly, sent as K + 1 levels
            state["theta_sym"] = counts.astype(np.uint8 if k <= 255 else np.uint16)
            state["levels"] = k

    def eval_mask(self, state: dict[str, Any]) -> torch.Tensor:
        theta = self.theta_of(state["theta_sym"], state["levels"])
        if self.opts.eval_mask == "sample":
            theta_s = self.start_theta(theta)
            u = shared_uniforms(np_rng(self.cfg.seed, 0, SERVER, "eval-mask"), self.n)
            return torch.from_numpy((u < theta_s).astype(np.float32))
        if self.opts.eval_mask == "expected":  # the mean of the masked model's weights, E[W ⊙ m] = W ⊙ θ
            return torch.from_numpy(theta.astype(np.float32))
        return torch.from_numpy((theta > 0.5).astype(np.float32))

    def evaluate(self, state: dict[str, Any]) -> tuple[float, float]:
        mask = self.eval_mask(state)
        return evaluate_weights(self.task, self.head_named, state["head"], lambda inputs: self.masked.forward(mask, inputs))

    # ---- client ---------------------------------------------------------------------------------
    def client_update(self, message: bytes, client: int, state: Any, ctx: RoundContext) -> ClientOutput:
        t0 = time.perf_counter()
        sym, levels, head, stratum, new_state = self.receive_downlink(message, state, ctx.round)
        theta_start = self.start_theta(self.theta_of(sym, levels))
        load_weights(self.head_named, head)
        codec_s = time.perf_counter() - t0

        data = self.task.client_data(client)
        steps = num_local_steps(len(data), self.cfg.batch_size, self.cfg.local_steps, self.cfg.local_epochs)
        scores = torch.from_numpy(logit(theta_start)).requires_grad_(True)
        t1 = time.perf_counter()
        torch.manual_seed(ctx.seed_for(client, "dropout-layers"))
        metrics = train_masked(
            self.masked,
            scores,
            self.head_params,
            data,
            steps=steps,
            batch_size=self.cfg.batch_size,
            score_lr=self.opts.score_lr,
            head_lr=self.opts.head_lr,
            generator=ctx.torch_gen(client, "batches"),
            mask_generator=ctx.torch_gen(client, "mask-train"),
            optimizer=self.opts.optimizer,
        )
        train_s = time.perf_counter() - t1

        t2 = time.perf_counter()
        theta_client = torch.sigmoid(scores.detach()).numpy()
        u = self.uniforms(ctx, client, stratum)
        after = read_weights(self.head_named)
        head_delta = {n: after[n] - head[n] for n in self.head_names}
        payload, stats = self.encode_upload(u, theta_client, theta_start, sym, levels, ctx, len(data), head_delta)
        codec_s += time.perf_counter() - t2
        return ClientOutput(payload, new_state, {**metrics, **stats, "train_s": train_s, "codec_s": codec_s})

    def encode_upload(
        self,
        u: np.ndarray,
        theta_client: np.ndarray,
        theta_start: np.ndarray,
        sym: np.ndarray,
        levels: int,
        ctx: RoundContext,
        n: int,
        head_delta: dict[str, np.ndarray],
    ) -> tuple[bytes, dict[str, float]]:
        """Client: the upload (``n`` examples, the coded mask, the head delta) and its statistics.

        deltamask's budget controller overrides it, to size the whole upload.
        """
        mask_meta, mask_body, stats = self.encode_mask(u, theta_client, theta_start, sym, levels, ctx)
        return self.wire.encode_uplink(self.uplink_kind, n, mask_meta, mask_body, head_delta), stats

    # ---- mask coding: each method's own ----------------------------------------------------------
    @abstractmethod
    def encode_mask(
        self,
        u: np.ndarray,
        theta_client: np.ndarray,
        theta_start: np.ndarray,
        sym: np.ndarray,
        levels: int,
        ctx: RoundContext,
    ) -> tuple[dict[str, Any], bytes, dict[str, float]]:
        """Client: code its mask (drawn as ``u < θ_client``); returns ``(meta, body, stats)``."""

    @abstractmethod
    def mask_limits(self, state: dict[str, Any], ctx: RoundContext) -> MaskLimits:
        """Server: the largest mask section and header an honest client sends this round (see :class:`MaskLimits`)."""

    @abstractmethod
    def decode_mask(self, meta: Any, body: memoryview, state: dict[str, Any], ctx: RoundContext, client: int) -> MaskCode:
        """Server: validate and decode ``client``'s mask section (within :meth:`mask_limits`)."""

    @abstractmethod
    def rebuild_mask(
        self,
        update: MaskUpdate,
        theta_start: np.ndarray,
        ref: np.ndarray | None,
        client: int,
        ctx: RoundContext,
    ) -> tuple[np.ndarray, dict[str, float]]:
        """Server: the client's binary mask (int32 0/1) and per-client statistics for the round record.

        ``ref`` is the client's reference mask ``u < θ_start`` (None unless ``needs_reference`` or
        ``aggregate=delta``).
        """

    # ---- flips against the reference mask: shared by every method that codes them ----------------
    def encode_context_flips(
        self, flips: np.ndarray, u: np.ndarray, theta_start: np.ndarray
    ) -> tuple[dict[str, Any], bytes, dict[str, float]]:
        """Client: the bool ``flips`` coded given the side information (:mod:`fedsqueeze.codecs.sideinfo`)."""
        contexts = flip_contexts(u, theta_start)
        meta, body = encode_flips(flips, contexts)
        bound = flip_bound_bits(flips, contexts)
        return meta, body, {"mask_bits": 8.0 * len(body), "mask_bound_bits": bound}

    def decode_context_flips(
        self, meta: Any, body: memoryview, state: dict[str, Any], ctx: RoundContext, client: int, max_flips: int
    ) -> ExactFlips:
        """Server: ``client``'s context-coded flips, from the uniforms and θ_start it rebuilds.

        Memory: one byte of context per position and the decoded positions; the uniforms and θ_start
        are rebuilt a chunk at a time (never a float array over the whole mask).
        """
        positions, bound = decode_flips_counted(meta, body, self.server_contexts(state, ctx, client), max_flips)
        return ExactFlips(positions, len(body), bound)

    def server_contexts(self, state: dict[str, Any], ctx: RoundContext, client: int) -> np.ndarray:
        """Server: the flip contexts of ``client``'s draw (:func:`~fedsqueeze.codecs.sideinfo.flip_contexts`
        of its uniforms and θ_start), built a chunk at a time."""
        sym, levels, step = state["theta_sym"], int(state["levels"]), chunk_size(self.n)
        stratum = self.stratum(ctx, client) if self.opts.stratify else None
        chunks = self.uniform_chunks(ctx, client, stratum, step)
        return chunked_contexts(
            self.n, ((u, self.start_theta(self.theta_of(sym[lo : lo + u.size], levels))) for lo, u in zip(range(0, self.n, step), chunks))
        )

    def apply_flips(
        self, code: FilterFlips | ExactFlips, theta_start: np.ndarray, ref: np.ndarray | None, client: int, ctx: RoundContext
    ) -> tuple[np.ndarray, dict[str, float]]:
        """The client's mask: its reference ``u < θ_start`` with the coded positions flipped, and statistics.

        A filter's false positives flip too; its header states how many keys it holds, so they are
        counted exactly (``fp_flips = hits − keys``). ``bound_bits_per_key`` is the code's bound:
        ``H(flips | context)`` for a context code, ``log2 C(n, N)`` for the others.
        """
        mask = (self.server_uniforms(ctx, client) < theta_start) if ref is None else ref.copy()
        flips, keys = code.flips(self.n), code.keys
        mask[flips] ^= True
        hits = int(flips.sum()) if flips.dtype == bool else int(flips.size)
        stats = {"keys": float(keys), "fp_flips": float(hits - keys), "mask_bits_per_key": 8.0 * code.nbytes / keys if keys else 0.0}
        if isinstance(code, ExactFlips):
            bound = code.bound_bits if code.bound_bits is not None else entropy_bound_bits(keys, self.n)
            stats["bound_bits_per_key"] = bound / keys if keys else 0.0
        return mask.astype(np.int32), stats
