"""A small ResNet for 28×28 to 32×32 images, with BatchNorm (default) or GroupNorm layers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["BasicBlock", "SmallResNet", "build_default", "NORMS", "norm_layer"]

#: The normalization layers :class:`SmallResNet` can use.
NORMS = ("batch", "group")
#: Most groups of a GroupNorm layer (fewer when the channels are not divisible).
MAX_GROUPS = 8


def norm_layer(norm: str, channels: int) -> nn.Module:
    """The normalization layer of ``channels`` channels for ``norm``.

    Args:
        norm: ``"batch"`` (``BatchNorm2d``) or ``"group"`` (``GroupNorm`` with the largest number of
            groups ``<= 8`` that divides ``channels``; 8 for every default width).
        channels: ``C``.

    Returns:
        The layer, ``N×C×H×W`` → ``N×C×H×W``.
    """
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        groups = max(g for g in range(1, min(MAX_GROUPS, channels) + 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"norm must be one of {NORMS}; found {norm!r}.")


class BasicBlock(nn.Module):
    """ResNet basic block: ``conv3×3-BN-ReLU-conv3×3-BN`` plus shortcut, then ReLU.

    The shortcut is the identity, or ``conv1×1-BN`` (``downsample``) when the stride or the width
    changes. With ``norm="group"`` every BN is a GroupNorm; the submodules keep their names
    (``bn1``, ``bn2``, ``downsample.1``).

    Args:
        in_ch: input channels ``C_in``.
        out_ch: output channels ``C_out``.
        stride: stride of the first convolution (2 halves ``H`` and ``W``).
        norm: ``"batch"`` or ``"group"`` (see :func:`norm_layer`).

    Shapes:
        ``N×C_in×H×W`` → ``N×C_out×⌈H/stride⌉×⌈W/stride⌉``.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, norm: str = "batch") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(norm, out_ch)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(norm, out_ch)
        self.relu2 = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), norm_layer(norm, out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``N×C_in×H×W`` → ``N×C_out×H'×W'``."""
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + short)


class SmallResNet(nn.Module):
    """ResNet-style classifier for small images (Fashion-MNIST, CIFAR-sized inputs).

    Layout: input normalisation ``(x - mean) / std`` (buffers), stem ``conv3×3-BN-ReLU``, three
    stages of one :class:`BasicBlock` each (strides 1, 2, 2), global average pooling, linear head.
    With the default widths it has 9 BatchNorm2d layers (``stem.bn``, ``layer{1,2,3}.bn{1,2}``,
    ``layer{2,3}.downsample.1``) and about 0.17 M parameters (0.7 MB as float32). With
    ``norm="group"`` the same 9 sites are ``GroupNorm`` layers (8 groups each at the default
    widths) and the model has no BatchNorm: its outputs do not depend on the batch.

    Args:
        in_channels: image channels ``C`` (1 for grey, 3 for RGB).
        num_classes: number of outputs ``K``.
        widths: channels of the stem/stage 1, stage 2 and stage 3.
        mean: per-channel mean of the inputs in ``[0, 1]`` units; one value or ``C`` values.
        std: per-channel standard deviation, likewise.
        norm: ``"batch"`` (default; ``BatchNorm2d``) or ``"group"`` (``GroupNorm``, see
            :func:`norm_layer`). The default builds exactly the BatchNorm model of earlier
            versions (same state_dict keys, same initialisation for a given seed).

    Shapes:
        input ``N×C×H×W`` float in ``[0, 1]`` (as made by :func:`torch_dmc.data.to_tensor`);
        output ``N×K`` logits.

    Example:
        >>> model = SmallResNet(in_channels=1, num_classes=10)
        >>> model(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: Sequence[int] = (24, 48, 96),
        mean: float | Sequence[float] = 0.5,
        std: float | Sequence[float] = 0.5,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}; found {norm!r}.")
        if in_channels < 1 or num_classes < 1:
            raise ValueError(f"in_channels and num_classes must be >= 1; found {in_channels}, {num_classes}.")
        widths = [int(w) for w in widths]
        if len(widths) != 3 or min(widths) < 1:
            raise ValueError(f"widths must be 3 positive integers; found {widths}.")
        mean_t, std_t = input_normalization(mean, std, in_channels)
        self.config = {
            "in_channels": int(in_channels),
            "num_classes": int(num_classes),
            "widths": widths,
            "mean": mean_t.tolist(),
            "std": std_t.tolist(),
            "norm": norm,
        }
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1))
        self.register_buffer("std", std_t.view(1, -1, 1, 1))
        w1, w2, w3 = widths
        self.stem = nn.Sequential()
        self.stem.add_module("conv", nn.Conv2d(in_channels, w1, 3, 1, 1, bias=False))
        self.stem.add_module("bn", norm_layer(norm, w1))
        self.stem.add_module("relu", nn.ReLU())
        self.layer1 = BasicBlock(w1, w1, 1, norm)
        self.layer2 = BasicBlock(w1, w2, 2, norm)
        self.layer3 = BasicBlock(w2, w3, 2, norm)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w3, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for block in (self.layer1, self.layer2, self.layer3):  # residual branch starts near zero
            nn.init.zeros_(block.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``N×C×H×W`` images in ``[0, 1]`` → ``N×K`` logits."""
        if x.dim() != 4 or x.shape[1] != self.mean.shape[1]:
            raise ValueError(
                f"SmallResNet expects N×{self.mean.shape[1]}×H×W images; found shape {tuple(x.shape)}."
            )
        x = (x - self.mean) / self.std
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def build_default(
    in_channels: int,
    num_classes: int,
    *,
    mean: float | Sequence[float] = 0.5,
    std: float | Sequence[float] = 0.5,
) -> SmallResNet:
    """The default architecture of this package: :class:`SmallResNet` with default widths.

    Args:
        in_channels: image channels ``C``.
        num_classes: number of classes ``K``.
        mean: input mean per channel (``[0, 1]`` units), stored in the model.
        std: input standard deviation per channel, stored in the model.

    Returns:
        A freshly initialised model, ``N×C×H×W`` → ``N×K``.
    """
    return SmallResNet(in_channels=in_channels, num_classes=num_classes, mean=mean, std=std)


def input_normalization(mean: float | Sequence[float], std: float | Sequence[float],
                        channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``mean`` and ``std`` tensors (``C`` each) from one value or ``C`` values.

    Raises:
        ValueError: not 1 or ``channels`` values, or a ``std`` that is not positive.
    """
    def per_channel(name: str, value: float | Sequence[float]) -> torch.Tensor:
        t = torch.as_tensor(value, dtype=torch.float32).flatten()
        if t.numel() == 1:
            t = t.repeat(channels)
        if t.numel() != channels:
            raise ValueError(f"{name} must have 1 or in_channels={channels} values; found {t.numel()}.")
        return t

    mean_t, std_t = per_channel("mean", mean), per_channel("std", std)
    if (std_t <= 0).any():
        raise ValueError(f"std must be positive; found {std_t.tolist()}.")
    return mean_t, std_t
