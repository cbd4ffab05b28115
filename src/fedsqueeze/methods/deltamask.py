"""DeltaMask: only the mask positions that moved travel, coded against side information or in a fuse filter.

Everything but the uplink mask coding is FedPM's (:mod:`fedsqueeze.methods.fedpm`: frozen model,
mask scores, Beta aggregation, coded downlink of θ).

Client, after local training (probabilities ``θc``; start/global probabilities ``θg``):

1. Draws its mask ``u < θc`` and the reference mask ``u < θg`` with the *same* uniforms ``u``
   (from the round's shared seed and the client's stratum, :meth:`MaskMethod.uniforms`); the server
   can rebuild the reference. The masks differ only where ``u`` lies between ``θg`` and ``θc``.
2. Keeps, of those flipped positions, the top ``κ_r · n`` by ``|θc − θg|`` (``n`` = masked
   weights). ``κ_r`` follows a schedule from ``kappa_start`` (round 1) to ``kappa_end`` (last
   round): ``linear`` or ``geometric``. Under an uplink budget (run option ``budget_bpp``,
   :mod:`fedsqueeze.methods.budget`) the client searches the count instead, so that its whole
   upload lands on the target; the server then allows up to ``n`` flips.
3. Codes the kept positions. By default exactly, against the side information the server has
   (``coder=context``: rANS of the flip bits per context of ``|u − θg|``, about ``n·H(F | C)`` bits,
   :mod:`fedsqueeze.codecs.sideinfo`; or ``coder=rice|elias-fano``: the sorted positions at about
   ``log2 C(n, N)`` bits). ``deltamask --set filter=fuse8`` (the paper; ``fuse16|xor8``) inserts
   them as uint64 keys into a binary fuse filter built by pyfusefilter's C code and sends its
   fingerprints. ``deltamask-exact`` never uses a filter.

Server: rebuilds the reference mask, decodes the positions (a filter: queries every position
``0..n−1`` with the vectorized query (:func:`fedsqueeze.codecs.fusefilter.query_universe`)), flips them (a filter's false
positives included) and aggregates with the delta rule by default (``θ = θ_start + Σ(m − ref)/K``,
:mod:`fedsqueeze.methods.fedpm`; ``aggregate=beta`` is the paper's FedPM rule). The filter header states how many keys it holds, so
the false-positive flips are counted exactly: ``fp_flips = hits − keys`` (a filter has no false
negatives). The round record carries ``fp_flips``, ``keys`` (means per client) and ``mask_bits_per_key``.

Uplink body: ``[context code | position code | filter fingerprints][head delta]``. Every length
its header claims is bounded by :meth:`DeltaMask.mask_limits` (the round's cap κ_r·n) before
anything is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsqueeze.codecs.fusefilter import FILTER_KINDS, build_filter, filter_bytes, parse_filter
from fedsqueeze.codecs.positions import POSITION_CODERS, code_bytes_cap, decode_positions, encode_positions
from fedsqueeze.codecs.sideinfo import encode_flips, flip_contexts, flips_cap_bytes, flips_meta_bytes
from fedsqueeze.errors import ConfigError, PayloadError
from fedsqueeze.methods.base import RoundContext, register_method
from fedsqueeze.methods.budget import search_knob, target_bytes
from fedsqueeze.methods.mask_method import AGGREGATES, MaskMethod, MaskOptions
from fedsqueeze.methods.mask_wire import MaskLimits
from fedsqueeze.methods.updates import ExactFlips, FilterFlips, MaskUpdate
from fedsqueeze.options import between, option

KAPPA_SCHEDULES = ("linear", "geometric")
DELTAMASK_FILTERS = (*FILTER_KINDS, "none")
FLIP_CODERS = ("context", *POSITION_CODERS)


@dataclass
class DeltaMaskOptions(MaskOptions):
    # Defaults measured on the default task (docs/masks.md): the delta rule gained 3.4 points over
    # FedPM's Beta rule, and starting nearer the pre-trained model cut the downlink by 42%.
    theta_init: float = option(0.98, "initial keep probability of every masked weight", check=between(0.0, 1.0, lo_open=True))
    aggregate: str = option("delta", "server rule: delta (θ += mean of m − reference mask) or beta (θ = Σm/K, FedPM)", choices=AGGREGATES)
    kappa_start: float = option(0.02, "round-1 cap on the flipped positions sent, as a fraction of masked weights", check=between(0.0, 1.0))
    kappa_end: float = option(0.01, "last-round cap (the schedule goes from kappa_start to kappa_end)", check=between(0.0, 1.0))
    kappa_schedule: str = option("linear", "how κ moves over the rounds", choices=KAPPA_SCHEDULES)
    filter: str = option(
        "none",
        "deltamask: filter for the flipped positions (fuse8 = the paper's); none = code them exactly with `coder`",
        choices=DELTAMASK_FILTERS,
    )
    coder: str = option(
        "context",
        "exact flip coder: context (ANS given |u − θ_start|, the server's side information), rice or elias-fano (positions)",
        choices=FLIP_CODERS,
    )

    def validate(self) -> None:
        super().validate()
        if self.kappa_schedule == "geometric" and min(self.kappa_start, self.kappa_end) <= 0:
            raise ConfigError("kappa_schedule=geometric needs kappa_start > 0 and kappa_end > 0")


def kappa_at(opts: DeltaMaskOptions, round_: int, rounds: int) -> float:
    """κ for ``round_`` (1-based) of ``rounds``."""
    t = (round_ - 1) / max(rounds - 1, 1)
    if opts.kappa_schedule == "linear":
        return opts.kappa_start + t * (opts.kappa_end - opts.kappa_start)
    if opts.kappa_schedule == "geometric":
        return float(opts.kappa_start * (opts.kappa_end / opts.kappa_start) ** t)
    raise ValueError(f"kappa_schedule must be 'linear' or 'geometric', got {opts.kappa_schedule!r}")


def top_flips(u: np.ndarray, theta_client: np.ndarray, theta_ref: np.ndarray, cap: int) -> tuple[np.ndarray, int]:
    """Sorted positions where ``u < θc`` and ``u < θref`` disagree, at most ``cap`` of them, largest ``|θc − θref|`` first kept."""
    flipped = np.flatnonzero((u < theta_client) != (u < theta_ref))
    total = int(flipped.size)
    if total > cap:
        moved = np.abs(theta_client[flipped] - theta_ref[flipped])
        flipped = flipped[np.argpartition(-moved, cap - 1)[:cap]] if cap > 0 else flipped[:0]
        flipped.sort()
    return flipped.astype(np.uint64), total


def ranked_flips(u: np.ndarray, theta_client: np.ndarray, theta_ref: np.ndarray) -> np.ndarray:
    """Every position where ``u < θc`` and ``u < θref`` disagree, largest ``|θc − θref|`` first (ties: lower position first)."""
    flipped = np.flatnonzero((u < theta_client) != (u < theta_ref))
    moved = np.abs(theta_client[flipped] - theta_ref[flipped])
    return flipped[np.argsort(-moved, kind="stable")]


@register_method
class DeltaMask(MaskMethod):
    name = "deltamask"
    summary = "masks on a frozen model; top-κ flips vs a shared reference mask, coded against side information (or a Fuse8 filter)"
    Options = DeltaMaskOptions
    uplink_kind = "deltamask-up"
    budget_knob = "the number of flips sent (replaces the κ schedule's cap)"

    def needs_reference(self) -> bool:
        return True

    def setup(self, task) -> None:
        super().setup(task)
        # the budget controller's target for each client's upload, in bytes (None: no budget)
        self.budget_target = target_bytes(self.cfg.budget_bpp, task.model_params) if self.cfg.budget_bpp > 0 else None

    @property
    def filter_kind(self) -> str | None:
        """The filter the flips travel in, or None when they are coded exactly."""
        return None if self.opts.filter == "none" else self.opts.filter

    def flip_cap(self, ctx: RoundContext) -> int:
        """The most flipped positions a client may send this round: ``κ_r · n`` (under a budget: any number)."""
        if self.cfg.budget_bpp > 0:
            return self.n
        return self.kappa_cap(ctx)

    def kappa_cap(self, ctx: RoundContext) -> int:
        """``κ_r · n``: the κ schedule's cap this round."""
        return int(kappa_at(self.opts, ctx.round, ctx.rounds) * self.n)

    # ---- client ---------------------------------------------------------------------------------
    def encode_mask(self, u, theta_client, theta_start, sym, levels, ctx: RoundContext):
        keys, total = top_flips(u, theta_client, theta_start, self.flip_cap(ctx))
        meta, body, stats = self.encode_keys(keys, u, theta_start)
        return meta, body, {"flips_total": float(total), **stats}

    def encode_keys(
        self, keys: np.ndarray, u: np.ndarray, theta_start: np.ndarray, contexts: np.ndarray | None = None
    ) -> tuple[dict[str, Any], bytes, dict[str, float]]:
        """The code of the sorted flipped positions ``keys``: ``(meta, body, stats)``.

        ``contexts``: the flip contexts of ``u`` and θ_start, when the caller already has them (the
        budget controller codes several key sets against the same contexts).
        """
        stats = {"keys": float(keys.size)}
        if self.filter_kind is not None:
            flt = build_filter(keys, self.filter_kind)
            return flt.meta(), flt.body(), stats
        if self.opts.coder == "context":
            flips = np.zeros(self.n, dtype=bool)
            flips[keys.astype(np.int64)] = True
            if contexts is not None:
                meta, body = encode_flips(flips, contexts)
                return meta, body, {**stats, "mask_bits": 8.0 * len(body)}
            meta, body, more = self.encode_context_flips(flips, u, theta_start)
            return meta, body, {**stats, **more}
        meta, body = encode_positions(keys, self.n, self.opts.coder)
        return meta, body, stats

    def encode_upload(self, u, theta_client, theta_start, sym, levels, ctx: RoundContext, n: int, head_delta):
        if self.budget_target is None:
            return super().encode_upload(u, theta_client, theta_start, sym, levels, ctx, n, head_delta)
        target = self.budget_target
        ranked = ranked_flips(u, theta_client, theta_start)
        contexts = flip_contexts(u, theta_start) if self.filter_kind is None and self.opts.coder == "context" else None

        def encode_at(count: float) -> tuple[int, tuple[bytes, dict[str, float]]]:
            keys = np.sort(ranked[: int(count)]).astype(np.uint64)
            meta, body, stats = self.encode_keys(keys, u, theta_start, contexts)
            payload = self.wire.encode_uplink(self.uplink_kind, n, meta, body, head_delta)
            return len(payload), (payload, stats)

        choice = search_knob(
            encode_at,
            target,
            lo=0,
            hi=ranked.size,
            start=min(self.kappa_cap(ctx), ranked.size),  # the κ schedule's count first
            increasing=True,
            integer=True,
            first_step=lambda t: t.knob * target / max(t.size, 1),  # the code's size is about proportional to the count
        )
        payload, stats = choice.value
        return payload, {**stats, "flips_total": float(ranked.size), "budget_tries": float(choice.tries)}

    # ---- server ---------------------------------------------------------------------------------
    def mask_limits(self, state: dict[str, Any], ctx: RoundContext) -> MaskLimits:
        cap = self.flip_cap(ctx)
        if self.filter_kind is not None:
            return MaskLimits(filter_bytes(self.filter_kind, cap), 256)
        if self.opts.coder == "context":
            return MaskLimits(flips_cap_bytes(self.n, cap), flips_meta_bytes())
        return MaskLimits(code_bytes_cap(cap, self.n), 256)

    def decode_mask(self, meta: Any, body: memoryview, state: dict[str, Any], ctx: RoundContext, client: int) -> FilterFlips | ExactFlips:
        if not isinstance(meta, dict):
            raise PayloadError("client update has no filter header" if self.filter_kind else "client update has no position header")
        cap = self.flip_cap(ctx)
        if self.filter_kind is not None:
            return FilterFlips(parse_filter(meta, body, max_keys=cap, kind=self.filter_kind))
        if self.opts.coder == "context":
            return self.decode_context_flips(meta, body, state, ctx, client, cap)
        if meta.get("universe") != self.n:
            raise PayloadError(f"position set is over {meta.get('universe')!r} positions, the mask has {self.n}")
        positions = decode_positions(meta, body, max_universe=self.n, max_n=cap, coder=self.opts.coder)
        return ExactFlips(positions.astype(np.int64), len(body))

    def rebuild_mask(
        self,
        update: MaskUpdate,
        theta_start: np.ndarray,
        ref: np.ndarray | None,
        client: int,
        ctx: RoundContext,
    ) -> tuple[np.ndarray, dict[str, float]]:
        assert isinstance(update.mask, (FilterFlips, ExactFlips))  # decode_mask made it
        mask, stats = self.apply_flips(update.mask, theta_start, ref, client, ctx)
        if self.cfg.budget_bpp > 0:
            stats["budget_flips"] = float(update.mask.keys)  # the count the client's search chose
        return mask, stats

    def aggregate(
        self, state: dict[str, Any], updates: dict[int, MaskUpdate], ctx: RoundContext
    ) -> tuple[dict[str, Any], dict[str, float]]:
        state, metrics = super().aggregate(state, updates, ctx)
        if self.cfg.budget_bpp > 0 and updates:
            metrics["budget_target_bpp"] = self.cfg.budget_bpp
        return state, metrics


@register_method
class DeltaMaskExact(DeltaMask):
    name = "deltamask-exact"
    summary = "deltamask with the flipped positions always coded exactly (context ANS, Rice or Elias-Fano): no false positives"
    uplink_kind = "deltamask-exact-up"

    @property
    def filter_kind(self) -> str | None:
        return None
