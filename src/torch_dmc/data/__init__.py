"""Data sets and corruptions: Fashion-MNIST, ``.npz`` files, reproducible common corruptions.

Images travel as ``uint8`` numpy arrays (``N×H×W`` or ``N×H×W×C``); :func:`to_tensor` makes the
float ``N×C×H×W`` tensors in ``[0, 1]`` that the models take.

Example:
    >>> from torch_dmc.data import load_fashion_mnist, CorruptionCache, to_tensor
    >>> data = load_fashion_mnist()                                   # doctest: +SKIP
    >>> x = to_tensor(CorruptionCache().get(data.x_test, "fog", 5))   # doctest: +SKIP
"""

from .arrays import Batches, ImageData, batches, load_npz, to_tensor
from .corruptions import (
    ALL_CORRUPTIONS,
    COMMON_CORRUPTIONS,
    VALIDATION_CORRUPTIONS,
    CorruptionCache,
    corrupt,
    protocol_info,
    resolve_corruptions,
)
from .fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist, read_idx

__all__ = [
    "ImageData",
    "load_npz",
    "to_tensor",
    "batches",
    "Batches",
    "load_fashion_mnist",
    "read_idx",
    "FASHION_MNIST_CLASSES",
    "COMMON_CORRUPTIONS",
    "VALIDATION_CORRUPTIONS",
    "ALL_CORRUPTIONS",
    "resolve_corruptions",
    "corrupt",
    "protocol_info",
    "CorruptionCache",
]
