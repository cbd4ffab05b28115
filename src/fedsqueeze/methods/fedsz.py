"""FedSZ (Wilkins et al., 2024): FedAvg whose client updates travel SZ3-compressed.

The uplink codec is ``sz3`` (see :mod:`fedsqueeze.codecs.sz3`): float tensors with more than
1024 values whose name contains "weight" go through SZ3 with a per-tensor REL bound, the rest
(biases, norms, small tensors) losslessly through zstd, as in the paper's partition. Defaults here:
REL 2e-2 on the *update* (the paper compressed weights at REL 1e-2; on MiniLM's update REL 1e-2
gave 11× and 2e-2 13.5×, see docs/codecs.md), with SZ3's ``nopred`` predictor: a fine-tuning
update is close to noise, so SZ3's interpolation/Lorenzo prediction buys nothing on it; without
it the stream is smaller (14.8× vs 13.7× on a real MiniLM update) and encodes 1.7× faster. ``compress_weights=true`` uploads the trained
weights instead, as the paper did; tune with ``--set sz3_bound=... sz3_mode=abs``.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedsqueeze.errors import ConfigError
from fedsqueeze.methods.base import register_method
from fedsqueeze.methods.fedavg import FedAvg
from fedsqueeze.methods.tensor import TensorOptions, codec_ids
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

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.uplink_sends_weights = self.opts.compress_weights
        if self.uplink_sends_weights and self.opts.downlink == "delta" and cfg.attack != "none":
            # an attacker rewrites the change its upload makes to the weights it started from,
            # which with downlink=delta only the client's own state holds
            raise ConfigError("fedsz: compress_weights=true with downlink=delta does not support attack= (attack the update instead)")
