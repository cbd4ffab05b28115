"""DeltaMask: only the mask positions that moved travel, in a binary fuse filter (and an exact variant).

Everything but the uplink mask coding is FedPM's (:mod:`fedsqueeze.methods.fedpm`: frozen model,
mask scores, Beta aggregation, coded downlink of θ).

Client, after local training (probabilities ``θc``; start/global probabilities ``θg``):

1. Draws its mask ``u < θc`` and the reference mask ``u < θg`` with the *same* uniforms ``u``
   (from the round's shared seed and the client's stratum, :meth:`MaskMethod.uniforms`); the server
   can rebuild the reference. The masks differ only where ``u`` lies between ``θg`` and ``θc``.
2. Keeps, of those flipped positions, the top ``κ_r · n`` by ``|θc − θg|`` (``n`` = masked
   weights). ``κ_r`` follows a schedule from ``kappa_start`` (round 1) to ``kappa_end`` (last
   round): ``linear`` or ``geometric``.
3. ``deltamask``: inserts the kept positions as uint64 keys into a binary fuse filter (Fuse8 by
   default; ``filter=fuse16|xor8``) built by pyfusefilter's C code and sends its fingerprints.
   ``deltamask-exact``: codes the sorted positions exactly (Golomb-Rice gaps by default;
   ``coder=elias-fano``), no false positives, at ~``log2 C(n, N)`` bits.

Server: rebuilds the reference mask, queries every position ``0..n−1`` against the filter with the
vectorized query (:func:`fedsqueeze.codecs.fusefilter.query_universe`), flips the hits (false
positives included) and aggregates with the delta rule by default (``θ = θ_start + Σ(m − ref)/K``,
:mod:`fedsqueeze.methods.fedpm`; ``aggregate=beta`` is the paper's FedPM rule). The filter header states how many keys it holds, so
the false-positive flips are counted exactly: ``fp_flips = hits − keys`` (a filter has no false
negatives). The round record carries ``fp_flips``, ``keys`` (means per client) and ``mask_bits_per_key``.

Uplink body: ``[filter fingerprints | position code][head delta]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsqueeze.codecs.fusefilter import FILTER_KINDS, build_filter, parse_filter
from fedsqueeze.codecs.positions import POSITION_CODERS, decode_positions, encode_positions, entropy_bound_bits
from fedsqueeze.errors import ConfigError, PayloadError
from fedsqueeze.methods.base import RoundContext, register_method
from fedsqueeze.methods.mask_method import AGGREGATES, MaskMethod, MaskOptions
from fedsqueeze.methods.updates import ExactFlips, FilterFlips, MaskUpdate
from fedsqueeze.options import between, option

KAPPA_SCHEDULES = ("linear", "geometric")


@dataclass
class DeltaMaskOptions(MaskOptions):
    # Defaults measured on the default task (docs/masks.md): the delta rule gained 3.4 points over
    # FedPM's Beta rule, and starting nearer the pre-trained model cut the downlink by 42%.
    theta_init: float = option(0.98, "initial keep probability of every masked weight", check=between(0.0, 1.0, lo_open=True))
    aggregate: str = option("delta", "server rule: delta (θ += mean of m − reference mask) or beta (θ = Σm/K, FedPM)", choices=AGGREGATES)
    kappa_start: float = option(0.02, "round-1 cap on the flipped positions sent, as a fraction of masked weights", check=between(0.0, 1.0))
    kappa_end: float = option(0.01, "last-round cap (the schedule goes from kappa_start to kappa_end)", check=between(0.0, 1.0))
    kappa_schedule: str = option("linear", "how κ moves over the rounds", choices=KAPPA_SCHEDULES)
    filter: str = option("fuse8", "filter for the flipped positions", choices=FILTER_KINDS)
    coder: str = option("rice", "deltamask-exact position coder", choices=POSITION_CODERS)

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


@register_method
class DeltaMask(MaskMethod):
    name = "deltamask"
    summary = "masks on a frozen model; top-κ flips vs a shared reference mask sent in a Fuse8 filter"
    Options = DeltaMaskOptions
    uplink_kind = "deltamask-up"
    needs_reference = True

    # ---- client ---------------------------------------------------------------------------------
    def encode_mask(self, u, theta_client, theta_start, sym, levels, ctx: RoundContext):
        cap = int(kappa_at(self.opts, ctx.round, ctx.rounds) * self.n)
        keys, total = top_flips(u, theta_client, theta_start, cap)
        meta, body = self.encode_positions(keys)
        return meta, body, {"flips_total": float(total), "keys": float(keys.size)}

    def encode_positions(self, keys: np.ndarray) -> tuple[dict[str, Any], bytes]:
        flt = build_filter(keys, self.opts.filter)
        return flt.meta(), flt.body()

    # ---- server ---------------------------------------------------------------------------------
    def decode_mask(self, meta: Any, body: memoryview, state: dict[str, Any], ctx: RoundContext) -> FilterFlips | ExactFlips:
        if not isinstance(meta, dict):
            raise PayloadError("client update has no filter header")
        return FilterFlips(parse_filter(meta, body, max_keys=self.n))

    def rebuild_mask(
        self,
        update: MaskUpdate,
        theta_start: np.ndarray,
        ref: np.ndarray | None,
        client: int,
        ctx: RoundContext,
    ) -> tuple[np.ndarray, dict[str, float]]:
        code = update.mask
        assert isinstance(code, (FilterFlips, ExactFlips))  # decode_mask made it
        mask = (self.server_uniforms(ctx, client) < theta_start) if ref is None else ref.copy()
        flips, keys = code.flips(self.n), code.keys
        mask[flips] ^= True
        hits = int(flips.sum()) if flips.dtype == bool else int(flips.size)
        return mask.astype(np.int32), {
            "keys": float(keys),
            "fp_flips": float(hits - keys),
            "mask_bits_per_key": 8.0 * code.nbytes / keys if keys else 0.0,
        }


@register_method
class DeltaMaskExact(DeltaMask):
    name = "deltamask-exact"
    summary = "deltamask with the flipped positions coded exactly (Golomb-Rice gaps): no false positives"
    uplink_kind = "deltamask-exact-up"

    def encode_positions(self, keys: np.ndarray) -> tuple[dict[str, Any], bytes]:
        return encode_positions(keys, self.n, self.opts.coder)

    def decode_mask(self, meta: Any, body: memoryview, state: dict[str, Any], ctx: RoundContext) -> ExactFlips:
        if not isinstance(meta, dict):
            raise PayloadError("client update has no position header")
        positions = decode_positions(meta, body, max_universe=self.n)
        if meta["universe"] != self.n:
            raise PayloadError(f"position set is over {meta['universe']} positions, the mask has {self.n}")
        return ExactFlips(positions.astype(np.int64), len(body))

    def rebuild_mask(
        self,
        update: MaskUpdate,
        theta_start: np.ndarray,
        ref: np.ndarray | None,
        client: int,
        ctx: RoundContext,
    ) -> tuple[np.ndarray, dict[str, float]]:
        mask, stats = super().rebuild_mask(update, theta_start, ref, client, ctx)
        assert isinstance(update.mask, (FilterFlips, ExactFlips))  # decode_mask makes nothing else
        keys = update.mask.keys
        stats["bound_bits_per_key"] = entropy_bound_bits(keys, self.n) / keys if keys else 0.0
        return mask, stats
