"""EfficientNet-Lite0 as a backbone for small grey images (Fashion-MNIST).

The network is the ``efficientnet-lite-pytorch`` package's (installed by ``make models``); its
ImageNet weights are a ``.pth`` state dict loaded with ``weights_only=True``. Its 1000-class
classifier is dropped: the backbone returns the last feature map as tokens ``[batch, h·w, 1280]``,
so the Classifier's mean over tokens is the network's own global average pooling.

Inputs arrive as the task encodes Fashion-MNIST (standardised with its pixel mean and std, one
channel, 28×28). The backbone undoes the standardisation, resizes bilinearly to the network's
224×224 input, replicates the grey channel three times and scales to [-1, 1] (EfficientNet-Lite's
TensorFlow preprocessing: (x − 127.5) / 127.5 on 0..255 pixels). Resizing happens per batch, so the
encoded data stay 28×28 in memory.

Batch normalisation stays in inference mode (running statistics frozen) in training too: the
model is then a pure function of its parameters, which every federated method assumes, and the
simulator's one model does not leak one client's batch statistics to the next.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers.modeling_outputs import BaseModelOutput

from fedsqueeze.errors import ConfigError

# the standardisation every grey image enters a model with (Fashion-MNIST's pixel mean and std of
# 0..1 pixels; applied by the task's encoding, undone here)
PIXEL_MEAN, PIXEL_STD = 0.2860, 0.3530

WEIGHTS_FILE = "efficientnet-lite0.pth"
INPUT_SIZE = 224
FEATURES = 1280


class EffNetBackbone(nn.Module):
    """EfficientNet-Lite feature extractor taking standardised 1-channel images of any size."""

    def __init__(self, net: Any, input_size: int = INPUT_SIZE) -> None:
        super().__init__()
        self.net = net
        self.input_size = input_size
        self.train(self.training)  # batch norm in inference mode from the start

    def forward(self, pixel_values: torch.Tensor) -> BaseModelOutput:
        x = pixel_values * PIXEL_STD + PIXEL_MEAN  # back to [0, 1]
        x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = x * 2.0 - 1.0
        feats = self.net.extract_features(x)  # [batch, 1280, 7, 7]
        return BaseModelOutput(last_hidden_state=feats.flatten(2).transpose(1, 2))

    def train(self, mode: bool = True) -> EffNetBackbone:
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()  # frozen running statistics (see the module docstring)
        return self


def plain_pointwise(net: nn.Module) -> None:
    """Replace the package's 1×1, stride-1 "same padding" convolutions by plain ``nn.Conv2d`` (same weights).

    They pad nothing, so the function is unchanged; but a tuner (peft LoRA) builds its low-rank
    factors as ``type(layer)(...)``, which the package's padding class cannot be.
    """
    targets = [
        (name, m)
        for name, m in net.named_modules()
        if isinstance(m, nn.Conv2d) and type(m) is not nn.Conv2d and m.kernel_size == (1, 1) and m.stride == (1, 1)
    ]
    for name, m in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        plain = nn.Conv2d(m.in_channels, m.out_channels, 1, groups=m.groups, bias=m.bias is not None)
        plain.weight = m.weight
        if m.bias is not None:
            plain.bias = m.bias
        setattr(parent, attr, plain)


def load_effnet_lite0(folder: Path, image_size: int = 0) -> tuple[nn.Module, int]:
    """The pre-trained EfficientNet-Lite0 backbone from an installed folder, and its feature width.

    ``image_size`` > 0 resizes to that side instead of the network's 224 (cheaper, less accurate).
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ConfigError("model 'effnet-lite0' needs the efficientnet-lite-pytorch package: run `make models`") from exc
    net = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    del net._fc  # the ImageNet classifier: the Classifier brings its own head
    plain_pointwise(net)
    return EffNetBackbone(net, image_size or INPUT_SIZE).eval(), FEATURES
