"""Small classifiers with normalization layers, their training, and pickle-free save/load.

Shipped Fashion-MNIST models: ``load("resnet")`` (= ``load_default()``, BatchNorm),
``load("resnet-gn")`` (GroupNorm) and ``load("vit")`` (LayerNorm).

Example:
    >>> from torch_dmc.models import load_default
    >>> model = load_default()            # Fashion-MNIST SmallResNet, eval mode
    >>> model(torch.rand(4, 1, 28, 28)).shape  # doctest: +SKIP
    torch.Size([4, 10])
"""

from .resnet import BasicBlock, SmallResNet, build_default
from .store import SHIPPED, default_files, load, load_default, load_model, save_model, sha256_file
from .training import (
    ARCH_DEFAULTS,
    ARCHS,
    DEFAULT_EPOCHS,
    DEFAULT_LR,
    build_arch,
    evaluate_error,
    train_main,
    train_model,
)
from .vit import SmallViT

__all__ = [
    "SmallResNet",
    "BasicBlock",
    "SmallViT",
    "build_default",
    "build_arch",
    "ARCHS",
    "ARCH_DEFAULTS",
    "SHIPPED",
    "load",
    "save_model",
    "load_model",
    "load_default",
    "default_files",
    "sha256_file",
    "train_model",
    "evaluate_error",
    "train_main",
    "DEFAULT_EPOCHS",
    "DEFAULT_LR",
]
