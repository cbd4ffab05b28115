"""FedSZ (Wilkins et al., 2024): FedAvg whose client updates travel SZ3-compressed.

The uplink codec is ``sz3`` (see :mod:`fedsqueeze.codecs.sz3`): float tensors with more than
1024 values whose name contains "weight" go through SZ3 with a per-tensor REL bound, the rest
(biases, norms, small tensors) losslessly through zstd, as in the paper's partition. Defaults here:
REL 2e-2 on the *update* (the paper compressed weights at REL 1e-2; on MiniLM's update REL 1e-2
gave 11× and 2e-2 13.5×, see docs/codecs.md), with SZ3's ``nopred`` predictor: a fine-tuning
update is close to noise, so SZ3's interpolation/Lorenzo prediction buys nothing on it; without
it the stream is smaller (14.8× vs 13.7× on a real MiniLM update) and encodes 1.7× faster. ``compress_weights=true`` uploads the trained
weights instead, as the paper did; tune with ``--set sz3_bound=... sz3_mode=abs``.

``budget_bpp=X`` (a run option) makes each client search the bound every round so that its upload
is X bits per model parameter within ±10% (:mod:`fedsqueeze.methods.budget`); the server takes the
bound each sz3 header declares, within 2^±16 of ``sz3_bound``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsqueeze.codecs import CodecContext
from fedsqueeze.codecs.framing import unframe
from fedsqueeze.codecs.sz3 import SZ3Codec
from fedsqueeze.errors import ConfigError
from fedsqueeze.methods.base import RoundContext, register_method
from fedsqueeze.methods.budget import BudgetSZ3Codec, SZ3Budget, target_bytes
from fedsqueeze.methods.fedavg import FedAvg
from fedsqueeze.methods.tensor import TensorOptions, Tensors, codec_ids
from fedsqueeze.methods.updates import TensorUpdate
from fedsqueeze.options import option


@dataclass
class FedSZOptions(TensorOptions):
    uplink_codec: str = option("sz3", "codec for the client upload (sz3: error-bounded lossy)", choices=codec_ids)
    compress_weights: bool = option(False, "upload the trained weights, not the update (as the FedSZ paper)")


@register_method
class FedSZ(FedAvg):
    name = "fedsz"
    summary = "FedAvg with SZ3 error-bounded lossy compression of the upload (REL 2e-2 per tensor)"
    Options = FedSZOptions
    uplink_codec_defaults = {"sz3": {"bound": 2e-2, "name_filter": "weight", "algo": "nopred"}}
    budget_knob = "the SZ3 error bound (searched from sz3_bound)"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.budget: SZ3Budget | None = None  # set with the model (its parameter count sets the target)
        if cfg.budget_bpp > 0:
            if not isinstance(self.up_codec, SZ3Codec):
                raise ConfigError(
                    f"fedsz: budget_bpp tunes the sz3 error bound, so it needs uplink_codec=sz3 (got {self.opts.uplink_codec!r})"
                )
            if self.opts.scaffold:
                raise ConfigError("fedsz: budget_bpp does not compose with scaffold=true (its raw control section is not budgeted)")
            self.up_codec = BudgetSZ3Codec(**self.up_codec.config)  # the server takes the bound each upload declares
        self.uplink_sends_weights = self.opts.compress_weights
        if self.uplink_sends_weights and self.opts.downlink == "delta" and cfg.attack != "none":
            # an attacker rewrites the change its upload makes to the weights it started from,
            # which with downlink=delta only the client's own state holds
            raise ConfigError("fedsz: compress_weights=true with downlink=delta does not support attack= (attack the update instead)")

    def setup(self, task) -> None:
        super().setup(task)
        if self.cfg.budget_bpp > 0:
            assert isinstance(self.up_codec, SZ3Codec)  # __init__ refused any other codec under a budget
            self.budget = SZ3Budget(self.up_codec, target_bytes(self.cfg.budget_bpp, task.model_params), task.model_params)

    def encode_upload(self, delta: Tensors, cctx: CodecContext, n: int) -> bytes:
        if self.budget is None:
            return super().encode_upload(delta, cctx, n)
        return self.budget.encode(delta, cctx, n).value

    def decode_update(self, payload: bytes, client: int, state: dict[str, Any], ctx: RoundContext) -> TensorUpdate:
        update = super().decode_update(payload, client, state, ctx)
        if self.budget is None:
            return update
        _, meta, _ = unframe(payload, expect_kind="sz3")  # decoded above, so its header is valid: read its bound
        return BoundedUpdate(update.delta, update.n, float(meta["bound"]))

    def aggregate(
        self, state: dict[str, Any], updates: dict[int, TensorUpdate], ctx: RoundContext
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        state, metrics = super().aggregate(state, updates, ctx)
        if self.budget is not None and updates:
            bounds = [u.bound for u in updates.values() if isinstance(u, BoundedUpdate)]
            metrics = {**metrics, "budget_target_bpp": self.cfg.budget_bpp}
            if bounds:  # the geometric mean: the search moves the bound in octaves
                metrics["budget_bound"] = float(np.exp(np.mean(np.log(bounds))))
                metrics["budget_bound_min"], metrics["budget_bound_max"] = min(bounds), max(bounds)
        return state, metrics


@dataclass(frozen=True)
class BoundedUpdate(TensorUpdate):
    """A budgeted fedsz update: the change and example count, and the SZ3 bound its client chose."""

    bound: float = 0.0
