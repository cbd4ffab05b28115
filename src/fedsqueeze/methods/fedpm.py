"""FedPM: federated probabilistic masks over a frozen pre-trained model (and the base of DeltaMask).

Clients learn mask scores ``s`` for every Linear weight of the backbone (see
:mod:`fedsqueeze.masking`) and train the classification head; the backbone weights never change.
After local training a client draws one binary mask ``m ~ Bernoulli(sigmoid(s))`` and uploads it
entropy-coded, with its head delta. The server aggregates the masks with a Beta posterior per
position: ``α = 1 + Σ m``, ``β = 1 + K − Σ m`` (priors reset each round; ``carry_priors=true``
keeps adding to them), ``θ = (α − 1) / (α + β − 2)``, and averages the head deltas.

The shared machinery (state, downlink, strata, aggregation, evaluation, the client's round) is
:class:`~fedsqueeze.methods.mask_method.MaskMethod`; the wire formats are in
:mod:`fedsqueeze.methods.mask_wire`. This module holds FedPM's own mask coding.

Downlink (``kind = "mask-down"``), the same body for every client, is *coded*, not 32 bpp:
``θ`` is sent as integer symbols ``θ · L`` with ``L`` levels (``L`` = the number of clients
aggregated when priors reset, so ``θ = Σm / K`` is exact; ``L = 255``, a uint8 quantisation,
before round 1 and with carried priors), entropy-coded with rANS under their own histogram
(:func:`fedsqueeze.codecs.ans.encode_symbols`). After a round most positions sit at ``θ = 1``, so
this costs well under one bit per masked weight. The head follows as float32 (or float16).
Body: ``[θ symbols ANS words][head weights]``; meta: ``levels``, the histogram, the head's
tensor table, the section lengths and the client's ``stratum`` ``[k, K]`` (see below). The body is
encoded once per round.

Uplink (``kind = "fedpm-up"``), mask code by ``coder``, then the head delta:

* ``context`` (default): the client's mask differs from the reference mask ``u < θ_start``, which
  the server rebuilds, only where ``u`` lies between θ_start and θ_client. The flips are coded with
  rANS per context ``(bin of |u − θ_start|, reference bit)`` at each context's empirical flip
  frequency (:mod:`fedsqueeze.codecs.sideinfo`): about ``n · H(flips | context)`` bits.
* ``levels`` (FedPM as published): the whole mask, grouped by the level of ``θ_global`` at each
  position and coded per group with a Bernoulli model at the group's empirical frequency of ones
  (:func:`fedsqueeze.codecs.ans.encode_grouped_bits`): about ``Σ_g n_g H(p_g)`` bits.

The mask is drawn as ``u < θ_client`` with uniforms ``u`` the server can rebuild: independent per
client by default, or stratified across the round's clients (``stratify=true``: the server gives
the k-th of the round's K participants, sorted, stratum ``[k, K]`` in its downlink header (the same
as the order a round contacts them in); see :meth:`MaskMethod.stratum` and :mod:`fedsqueeze.masking`). Stratification keeps the aggregated θ from
drifting by sampling noise alone; DeltaMask also needs ``u`` to rebuild the reference mask.

Delta aggregation (``aggregate=delta``, ours): the server rebuilds every client's reference mask
``ref = u < θ_start`` and sets ``θ = θ_start + Σ(m − ref) / K`` (clipped to [0, 1], sent as uint8
levels like the initial θ). With common random numbers ``E[m − ref] = θ_client − θ_start``, so
this is an unbiased average of the clients' probabilities, like ``Σm/K``; but ``m − ref`` is zero
wherever a client's probability stayed put, while ``Σm/K`` resamples every position each round
(at θ = 0.98 and K = 5 one position in ten falls to 0.8 by sampling noise alone).

Evaluation uses the expected weights ``W ⊙ θ`` (``eval_mask=expected``, the default: the same
scaling dropout applies at inference; the head was trained under random masks, so it expects
their mean), the deterministic mask ``θ_global > 0.5`` (``eval_mask=threshold``) or one draw from
``θ_global`` seeded by the round (``eval_mask=sample``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsqueeze.codecs.ans import decode_grouped_bits, encode_grouped_bits, grouped_bits_cap
from fedsqueeze.codecs.sideinfo import flips_cap_bytes, flips_meta_bytes
from fedsqueeze.errors import PayloadError
from fedsqueeze.methods.base import RoundContext, register_method
from fedsqueeze.methods.mask_method import AGGREGATES, EVAL_MASKS, INIT_LEVELS, MaskMethod, MaskOptions
from fedsqueeze.methods.mask_wire import MaskLimits
from fedsqueeze.methods.updates import ExactFlips, MaskUpdate, SampledMask
from fedsqueeze.options import option

__all__ = ["AGGREGATES", "EVAL_MASKS", "FEDPM_CODERS", "INIT_LEVELS", "FedPM", "FedPMOptions", "MaskMethod", "MaskOptions"]


FEDPM_CODERS = ("context", "levels")


@dataclass
class FedPMOptions(MaskOptions):
    coder: str = option(
        "context",
        "uplink mask code: context (the flips against the reference mask u < θ_start, ANS-coded per context of "
        "|u − θ_start|) or levels (the whole mask, ANS-coded per level of θ_global: FedPM as published)",
        choices=FEDPM_CODERS,
    )


@register_method
class FedPM(MaskMethod):
    name = "fedpm"
    summary = "probabilistic masks on a frozen model; the sampled mask up, ANS-coded against side information; Beta aggregation"
    Options = FedPMOptions

    def needs_reference(self) -> bool:
        return self.opts.coder == "context"

    # ---- mask coding -------------------------------------------------------------------------------
    def encode_mask(
        self,
        u: np.ndarray,
        theta_client: np.ndarray,
        theta_start: np.ndarray,
        sym: np.ndarray,
        levels: int,
        ctx: RoundContext,
    ) -> tuple[dict[str, Any], bytes, dict[str, float]]:
        mask = u < theta_client
        if self.opts.coder == "context":
            meta, body, stats = self.encode_context_flips(mask != (u < theta_start), u, theta_start)
            return meta, body, {**stats, "mask_ones": float(mask.mean())}
        meta, body = encode_grouped_bits(mask, sym.astype(np.int64), levels + 1)
        return meta, body, {"mask_ones": float(mask.mean())}

    def mask_limits(self, state: dict[str, Any], ctx: RoundContext) -> MaskLimits:
        if self.opts.coder == "context":
            return MaskLimits(flips_cap_bytes(self.n, self.n), flips_meta_bytes())
        # n mask bits hold at most n bits of content; the header is one count per level
        groups = int(state["levels"]) + 1
        return MaskLimits(grouped_bits_cap(float(self.n), groups), 32 + 21 * groups)

    def decode_mask(self, meta: Any, body: memoryview, state: dict[str, Any], ctx: RoundContext, client: int) -> SampledMask | ExactFlips:
        if not isinstance(meta, dict):
            raise PayloadError("client update has no mask header")
        if self.opts.coder == "context":
            return self.decode_context_flips(meta, body, state, ctx, client, self.n)
        levels = int(state["levels"])
        return SampledMask(decode_grouped_bits(meta, body, state["theta_sym"], levels + 1))  # uint8/uint16: no wide copy

    def rebuild_mask(
        self,
        update: MaskUpdate,
        theta_start: np.ndarray,
        ref: np.ndarray | None,
        client: int,
        ctx: RoundContext,
    ) -> tuple[np.ndarray, dict[str, float]]:
        if isinstance(update.mask, ExactFlips):
            mask, stats = self.apply_flips(update.mask, theta_start, ref, client, ctx)
            return mask, {k: stats[k] for k in ("keys", "mask_bits_per_key", "bound_bits_per_key")}
        assert isinstance(update.mask, SampledMask)  # decode_mask made it
        return update.mask.bits.astype(np.int32), {}
