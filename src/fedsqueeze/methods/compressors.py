"""Classic compressed-FedAvg baselines: full fine-tuning with a lossy codec on the upload.

Each is FedAvg whose ``uplink_codec`` defaults to one codec of :mod:`fedsqueeze.codecs`; its
options are set with ``--set <codec>_<option>=value`` (e.g. ``topk_k=0.001``). The same codecs
compose with any tensor method through ``--set uplink_codec=ID``.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedsqueeze.methods.base import register_method
from fedsqueeze.methods.fedavg import FedAvg
from fedsqueeze.methods.tensor import TensorOptions, codec_ids
from fedsqueeze.options import option


@dataclass
class TopKOptions(TensorOptions):
    uplink_codec: str = option("topk", "codec for the client upload (topk: largest k fraction + error feedback)", choices=codec_ids)


@dataclass
class QSGDOptions(TensorOptions):
    uplink_codec: str = option("qsgd", "codec for the client upload (qsgd: stochastic s-level quantization)", choices=codec_ids)


@dataclass
class SignOptions(TensorOptions):
    uplink_codec: str = option("sign", "codec for the client upload (sign: scaled sign + error feedback)", choices=codec_ids)


@dataclass
class EdenOptions(TensorOptions):
    uplink_codec: str = option("eden", "codec for the client upload (eden: random rotation + 1 bit)", choices=codec_ids)


@register_method
class TopK(FedAvg):
    name = "topk"
    summary = "FedAvg + top-k sparsified update (k=1%) with error feedback"
    Options = TopKOptions


@register_method
class QSGD(FedAvg):
    name = "qsgd"
    summary = "FedAvg + QSGD stochastic quantization of the update (16 levels, buckets of 512), zstd-coded"
    Options = QSGDOptions


@register_method
class SignSGD(FedAvg):
    name = "signsgd"
    summary = "FedAvg + scaled sign of the update (1 bit) with error feedback"
    Options = SignOptions


@register_method
class Eden(FedAvg):
    name = "eden"
    summary = "FedAvg + EDEN: randomized Hadamard rotation, 1 bit per value, a scale per block"
    Options = EdenOptions
