"""A small Vision Transformer for 28×28 to 32×32 images, with LayerNorm and no BatchNorm."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import input_normalization

__all__ = ["Attention", "Mlp", "TransformerBlock", "SmallViT"]


class Attention(nn.Module):
    """Multi-head self-attention on ``B×N×C`` tokens (one ``qkv`` Linear, one ``proj`` Linear).

    Args:
        dim: token width ``C``.
        heads: attention heads; ``dim`` must be divisible by ``heads``.

    Shapes:
        ``B×N×C`` → ``B×N×C``.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim must be divisible by heads; found dim={dim}, heads={heads}.")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B×N×C`` → ``B×N×C``."""
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # B×h×N×(C/h)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """``Linear(C, hidden) - GELU - Linear(hidden, C)`` on the last axis."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B×N×C`` → ``B×N×C``."""
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    ``norm1`` and ``norm2`` are ``nn.LayerNorm(C)`` applied to ``B×N×C`` tensors: the channels are
    the last axis of their inputs and outputs.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(round(dim * mlp_ratio)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B×N×C`` → ``B×N×C``."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SmallViT(nn.Module):
    """Vision Transformer for small images (Fashion-MNIST, CIFAR-sized inputs), LayerNorm only.

    Layout: input normalisation ``(x - mean) / std`` (buffers), patch embedding
    ``Conv2d(C, dim, patch, stride=patch)`` (28×28 with patch 4 → 7×7 = 49 tokens; a side that is
    not a multiple of the patch is zero-padded, after normalisation, at the bottom/right), an optional
    class token, learned position embeddings, ``depth`` pre-norm :class:`TransformerBlock` s, a final
    ``norm`` (LayerNorm), mean pooling over the tokens (``pool="mean"``) or the class token
    (``pool="cls"``), linear ``head``. Every LayerNorm (``blocks.{i}.norm1``, ``blocks.{i}.norm2``,
    ``norm``) sees and returns ``B×N×dim`` tensors. With the defaults (dim 64, depth 6, 2 heads,
    MLP ratio 2) it has 13 LayerNorm layers and about 0.21 M parameters (0.8 MB as float32).

    Args:
        in_channels: image channels ``C``.
        num_classes: number of outputs ``K``.
        image_size: input height and width (square images).
        patch_size: side of the square patches.
        dim: token width.
        depth: transformer blocks.
        heads: attention heads per block.
        mlp_ratio: hidden width of the MLPs / ``dim``.
        pool: ``"mean"`` (average of the patch tokens) or ``"cls"`` (a learned class token).
        mean: per-channel mean of the inputs in ``[0, 1]`` units; one value or ``C`` values.
        std: per-channel standard deviation, likewise.

    Shapes:
        input ``B×C×image_size×image_size`` float in ``[0, 1]``; output ``B×K`` logits.

    Example:
        >>> model = SmallViT(in_channels=1, num_classes=10)
        >>> model(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        patch_size: int = 4,
        dim: int = 64,
        depth: int = 6,
        heads: int = 2,
        mlp_ratio: float = 2.0,
        pool: str = "mean",
        mean: float | Sequence[float] = 0.5,
        std: float | Sequence[float] = 0.5,
    ) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 1:
            raise ValueError(f"in_channels and num_classes must be >= 1; found {in_channels}, {num_classes}.")
        if patch_size < 1 or image_size < 1:
            raise ValueError(
                f"image_size and patch_size must be >= 1; found {image_size}, {patch_size}."
            )
        if dim < 1 or depth < 0 or heads < 1 or dim % heads or mlp_ratio <= 0:
            raise ValueError(
                f"need dim >= 1 divisible by heads, depth >= 0, mlp_ratio > 0; found dim={dim}, "
                f"heads={heads}, depth={depth}, mlp_ratio={mlp_ratio}."
            )
        if pool not in ("mean", "cls"):
            raise ValueError(f"pool must be 'mean' or 'cls'; found {pool!r}.")
        mean_t, std_t = input_normalization(mean, std, in_channels)
        self.config = {
            "in_channels": int(in_channels),
            "num_classes": int(num_classes),
            "image_size": int(image_size),
            "patch_size": int(patch_size),
            "dim": int(dim),
            "depth": int(depth),
            "heads": int(heads),
            "mlp_ratio": float(mlp_ratio),
            "pool": pool,
            "mean": mean_t.tolist(),
            "std": std_t.tolist(),
        }
        self.image_size = int(image_size)
        self.pad = (-self.image_size) % patch_size
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1))
        self.register_buffer("std", std_t.view(1, -1, 1, 1))
        tokens = ((image_size + patch_size - 1) // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + (pool == "cls"), dim))
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.trunc_normal_(w.view(w.shape[0], -1), std=(1.0 / w[0].numel()) ** 0.5)
        nn.init.zeros_(self.patch_embed.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B×C×H×W`` images in ``[0, 1]`` → ``B×K`` logits."""
        c, s = self.mean.shape[1], self.image_size
        if x.dim() != 4 or x.shape[1] != c or x.shape[2] != s or x.shape[3] != s:
            raise ValueError(f"SmallViT expects N×{c}×{s}×{s} images; found shape {tuple(x.shape)}.")
        x = (x - self.mean) / self.std
        if self.pad:
            x = F.pad(x, (0, self.pad, 0, self.pad))
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # B×N×dim
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        x = x[:, 0] if self.cls_token is not None else x.mean(dim=1)
        return self.head(x)
