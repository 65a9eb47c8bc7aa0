"""Small classifiers with normalization layers, their training, and pickle-free save/load.

Example:
    >>> from torch_dmc.models import load_default
    >>> model = load_default()            # Fashion-MNIST SmallResNet, eval mode
    >>> model(torch.rand(4, 1, 28, 28)).shape  # doctest: +SKIP
    torch.Size([4, 10])
"""

from .resnet import BasicBlock, SmallResNet, build_default
from .store import default_files, load_default, load_model, save_model, sha256_file
from .training import DEFAULT_EPOCHS, DEFAULT_LR, evaluate_error, train_main, train_model

__all__ = [
    "SmallResNet",
    "BasicBlock",
    "build_default",
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
