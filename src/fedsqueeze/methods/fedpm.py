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

Uplink (``kind = "fedpm-up"``): the mask bits, grouped by the level of ``θ_global`` at each
position (both sides know it) and coded per group with a Bernoulli model at the group's
empirical frequency of ones (:func:`fedsqueeze.codecs.ans.encode_grouped_bits`); then the head
delta. The cost is about ``Σ_g n_g H(p_g)`` bits, far below one bit per weight when θ is near 1.

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

from typing import Any

import numpy as np

from fedsqueeze.codecs.ans import decode_grouped_bits, encode_grouped_bits
from fedsqueeze.errors import PayloadError
from fedsqueeze.methods.base import RoundContext, register_method
from fedsqueeze.methods.mask_method import AGGREGATES, EVAL_MASKS, INIT_LEVELS, MaskMethod, MaskOptions
from fedsqueeze.methods.updates import MaskUpdate, SampledMask

__all__ = ["AGGREGATES", "EVAL_MASKS", "INIT_LEVELS", "FedPM", "MaskMethod", "MaskOptions"]


@register_method
class FedPM(MaskMethod):
    name = "fedpm"
    summary = "probabilistic masks on a frozen model; whole sampled mask up, ANS-coded; Beta aggregation"

    # ---- mask coding: the whole sampled mask, entropy-coded per level of θ_global ------------------
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
        meta, body = encode_grouped_bits(mask, sym.astype(np.int64), levels + 1)
        return meta, body, {"mask_ones": float(mask.mean())}

    def decode_mask(self, meta: Any, body: memoryview, state: dict[str, Any], ctx: RoundContext) -> SampledMask:
        if not isinstance(meta, dict):
            raise PayloadError("client update has no mask header")
        levels = int(state["levels"])
        return SampledMask(decode_grouped_bits(meta, body, state["theta_sym"].astype(np.int64), levels + 1))

    def rebuild_mask(
        self,
        update: MaskUpdate,
        theta_start: np.ndarray,
        ref: np.ndarray | None,
        client: int,
        ctx: RoundContext,
    ) -> tuple[np.ndarray, dict[str, float]]:
        assert isinstance(update.mask, SampledMask)  # decode_mask made it
        return update.mask.bits.astype(np.int32), {}
