"""Image arrays in memory: the :class:`ImageData` container, ``.npz`` loading and batching.

Images are kept as ``uint8`` numpy arrays (``N×H×W`` grey or ``N×H×W×C`` channels-last) until
:func:`to_tensor` turns them into the float ``N×C×H×W`` tensors in ``[0, 1]`` that the models take.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "ImageData",
    "NPZ_EXPECTED",
    "load_npz",
    "load_npz_images",
    "to_tensor",
    "batches",
    "Batches",
    "shuffled_order",
]

_SPLITS = ("x_train", "y_train", "x_test", "y_test")


@dataclass(frozen=True, eq=False)
class ImageData:
    """A labelled image classification data set, train and test split.

    Attributes:
        x_train: ``uint8`` training images, ``N×H×W`` (grey) or ``N×H×W×C`` (channels last).
        y_train: ``int64`` training labels, shape ``N``, values in ``0..num_classes-1``.
        x_test: ``uint8`` test images, ``M×H×W`` or ``M×H×W×C`` (same ``H, W, C`` as train).
        y_test: ``int64`` test labels, shape ``M``.
        name: a short name for reports (``"fashion-mnist"``, or the stem of an ``.npz`` file).

    Example:
        >>> import numpy as np
        >>> d = ImageData(np.zeros((4, 8, 8), np.uint8), np.array([0, 1, 2, 1]),
        ...               np.zeros((2, 8, 8), np.uint8), np.array([0, 3]), name="toy")
        >>> d.num_classes, d.in_channels, d.image_size
        (4, 1, (8, 8))
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str

    @property
    def num_classes(self) -> int:
        """Number of classes: the largest label over both splits, plus one."""
        top = -1
        for y in (self.y_train, self.y_test):
            if y.size:
                top = max(top, int(y.max()))
        return top + 1

    @property
    def in_channels(self) -> int:
        """Channels per image: 1 for ``N×H×W`` arrays, else the last dimension ``C``."""
        return 1 if self.x_train.ndim == 3 else int(self.x_train.shape[-1])

    @property
    def image_size(self) -> tuple[int, int]:
        """Spatial size ``(H, W)`` of every image."""
        return int(self.x_train.shape[1]), int(self.x_train.shape[2])

    def __repr__(self) -> str:
        return (
            f"ImageData(name={self.name!r}, train={self.x_train.shape}, test={self.x_test.shape}, "
            f"num_classes={self.num_classes})"
        )


def _check_images(name: str, x: np.ndarray, source: str) -> np.ndarray:
    """Validate one image array and return it as ``uint8``."""
    if x.ndim not in (3, 4):
        raise ValueError(
            f"{source}: array '{name}' must hold images N×H×W or N×H×W×C (channels last); "
            f"found {x.ndim} dimensions, shape {x.shape}."
        )
    if x.shape[0] == 0:
        raise ValueError(f"{source}: array '{name}' holds no images (shape {x.shape}).")
    if x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[3] > 4:
        raise ValueError(
            f"{source}: array '{name}' has shape {x.shape}, which looks channels-first (N×C×H×W); "
            f"expected channels last, N×H×W×C: convert with x.transpose(0, 2, 3, 1)."
        )
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.integer):
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise ValueError(
                f"{source}: array '{name}' has integer dtype {x.dtype} with values in "
                f"[{lo}, {hi}]; expected uint8 pixel values in 0..255."
            )
        return x.astype(np.uint8)
    raise TypeError(
        f"{source}: array '{name}' must hold uint8 pixel values 0..255; found dtype {x.dtype}. "
        f"If your images are floats in [0, 1], save np.round(x * 255).astype(np.uint8)."
    )


def _check_labels(name: str, y: np.ndarray, n_images: int, source: str) -> np.ndarray:
    """Validate one label array and return it as ``int64``."""
    if y.ndim != 1:
        raise ValueError(
            f"{source}: array '{name}' must be a 1-D vector of class indices; found shape {y.shape}."
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise TypeError(
            f"{source}: array '{name}' must hold integer class indices; found dtype {y.dtype}. "
            f"Save y.astype(np.int64) (one-hot labels: y.argmax(1))."
        )
    if len(y) != n_images:
        x_name = "x_" + name.split("_", 1)[1]
        raise ValueError(
            f"{source}: '{name}' has {len(y)} labels but '{x_name}' has {n_images} images; "
            f"expected one label per image."
        )
    if y.size and int(y.min()) < 0:
        raise ValueError(
            f"{source}: array '{name}' has negative labels (min {int(y.min())}); expected class "
            f"indices 0..num_classes-1."
        )
    return y.astype(np.int64)


#: What a data ``.npz`` holds, for messages (``"... expected " + NPZ_EXPECTED``).
NPZ_EXPECTED = (
    "an .npz with arrays x_train, y_train, x_test, y_test (uint8 images, integer labels), saved "
    "with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)"
)


@contextmanager
def _open_npz(path: Path, expected: str) -> Iterator[np.lib.npyio.NpzFile]:
    """``np.load`` an ``.npz`` without pickle, as a context manager.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an ``.npz`` archive; the message says ``expected``.
    """
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}: expected {expected}.")
    try:
        npz = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, EOFError, OSError) as err:
        raise ValueError(
            f"{path}: not a readable .npz file ({type(err).__name__}: {err}); expected {expected}."
        ) from err
    except ValueError as err:  # numpy: neither a zip archive nor an .npy array (so: pickle)
        raise ValueError(f"{path}: not an .npz file (no zip archive); expected {expected}.") from err
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: holds one array (an .npy file), not an .npz archive; expected {expected}.")
    with npz:
        yield npz


def _read_arrays(npz: np.lib.npyio.NpzFile, keys: tuple[str, ...], source: str, expected: str) -> dict:
    """The arrays ``keys`` of an open ``.npz``.

    Raises:
        KeyError: an array is missing; the message lists the arrays expected and found.
        TypeError: an array is stored as Python objects.
        ValueError: an array cannot be read (a damaged file).
    """
    missing = [k for k in keys if k not in npz.files]
    if missing:
        found = ", ".join(sorted(npz.files)) or "none"
        raise KeyError(
            f"{source}: missing array(s) {', '.join(missing)} (found: {found}); expected {expected}."
        )
    try:
        return {k: npz[k] for k in keys}
    except ValueError as err:  # object arrays need pickle
        raise TypeError(
            f"{source}: an array is stored as Python objects ({err}); expected numeric arrays."
        ) from err
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:
        raise ValueError(f"{source}: an array cannot be read ({type(err).__name__}: {err}).") from err


def load_npz(path: str | Path) -> ImageData:
    """Load a data set from an ``.npz`` file with arrays ``x_train, y_train, x_test, y_test``.

    Images must be ``N×H×W`` or ``N×H×W×C`` (channels last) of ``uint8``; integer arrays with values
    in ``0..255`` are accepted and converted. Labels must be 1-D non-negative integers, one per image.
    The file is read with ``allow_pickle=False``, so it cannot execute code. :func:`load_npz_images`
    reads one image array alone (``dmc fit`` needs only ``x_train``).

    Args:
        path: the ``.npz`` file.

    Returns:
        An :class:`ImageData` named after the file stem; images ``uint8``, labels ``int64``.

    Raises:
        FileNotFoundError: the file does not exist.
        KeyError: an array is missing (the message lists the arrays found).
        TypeError, ValueError: not an ``.npz`` file, or an array has the wrong dtype, rank, length
            or values.
    """
    path = Path(path)
    source = str(path)
    with _open_npz(path, NPZ_EXPECTED) as npz:
        arrays = _read_arrays(npz, _SPLITS, source, NPZ_EXPECTED)
    x_train = _check_images("x_train", arrays["x_train"], source)
    x_test = _check_images("x_test", arrays["x_test"], source)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(
            f"{source}: train images have shape {x_train.shape[1:]} but test images "
            f"{x_test.shape[1:]}; expected the same H×W(×C) in both splits."
        )
    y_train = _check_labels("y_train", arrays["y_train"], len(x_train), source)
    y_test = _check_labels("y_test", arrays["y_test"], len(x_test), source)
    return ImageData(x_train, y_train, x_test, y_test, name=path.stem)


def load_npz_images(path: str | Path, key: str = "x_train") -> np.ndarray:
    """Load one image array of an ``.npz`` file; the file's other arrays are neither needed nor read.

    Args:
        path: the ``.npz`` file.
        key: the array, e.g. ``"x_train"`` (what ``dmc fit`` needs).

    Returns:
        ``uint8`` images ``N×H×W`` or ``N×H×W×C``, checked as by :func:`load_npz`.

    Raises:
        FileNotFoundError: the file does not exist.
        KeyError: the file has no array ``key``.
        TypeError, ValueError: not an ``.npz`` file, or the images have the wrong dtype, rank or
            values.
    """
    path = Path(path)
    expected = f"an .npz with array {key} (uint8 images N×H×W or N×H×W×C), e.g. np.savez(path, {key}=...)"
    with _open_npz(path, expected) as npz:
        x = _read_arrays(npz, (key,), str(path), expected)[key]
    return _check_images(key, x, str(path))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """Turn ``uint8`` images into the float tensor the models take.

    Args:
        images: ``uint8`` array, ``N×H×W`` (grey) or ``N×H×W×C`` (channels last).

    Returns:
        ``float32`` tensor ``N×C×H×W`` with values in ``[0, 1]`` (pixel / 255).

    Example:
        >>> to_tensor(np.zeros((2, 28, 28), np.uint8)).shape
        torch.Size([2, 1, 28, 28])
    """
    if not isinstance(images, np.ndarray):
        raise TypeError(f"to_tensor expects a numpy array; found {type(images).__name__}.")
    if images.dtype != np.uint8:
        raise TypeError(
            f"to_tensor expects uint8 images (0..255); found dtype {images.dtype}. "
            f"Convert with np.round(x * 255).astype(np.uint8) if they are floats in [0, 1]."
        )
    if images.ndim == 3:
        t = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)
    elif images.ndim == 4:
        t = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    else:
        raise ValueError(f"to_tensor expects images N×H×W or N×H×W×C; found shape {images.shape}.")
    return t.float().div_(255.0).contiguous()


def shuffled_order(n: int, seed: int) -> torch.Tensor:
    """The seeded random order of ``n`` samples: ``torch.randperm(n)`` from a ``torch.Generator``
    seeded with ``seed`` (``int64``, shape ``n``). The order of shuffled :func:`batches` and of
    the benchmark's ``iid`` stream."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=gen)


class Batches:
    """Re-iterable mini-batches over tensors; built by :func:`batches`.

    Every pass yields the same order (a pure function of ``seed``), so a test stream is identical
    for every method that reads it. For a new order per training epoch pass ``seed=seed + epoch``.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; found {batch_size!r}.")
        if y is not None and len(y) != len(x):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}; expected one label per sample.")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed

    def __len__(self) -> int:
        return (len(self.x) + self.batch_size - 1) // self.batch_size

    def order(self) -> torch.Tensor:
        """The sample order of every pass: ``int64`` tensor of shape ``N``."""
        n = len(self.x)
        if not self.shuffle:
            return torch.arange(n)
        return shuffled_order(n, self.seed)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor] | torch.Tensor]:
        idx = self.order()
        for start in range(0, len(idx), self.batch_size):
            b = idx[start : start + self.batch_size]
            if not self.shuffle:  # contiguous slices: views, no copy
                sl = slice(start, start + len(b))
                xb = self.x[sl]
                yb = None if self.y is None else self.y[sl]
            else:
                xb = self.x[b]
                yb = None if self.y is None else self.y[b]
            yield xb if yb is None else (xb, yb)


def batches(
    x: torch.Tensor,
    y: torch.Tensor | None,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
) -> Batches:
    """Mini-batches over ``x`` (and ``y``), re-iterable, with a seeded order.

    Args:
        x: inputs, first dimension ``N`` (e.g. ``N×C×H×W``).
        y: labels of shape ``N``, or ``None`` to yield inputs only.
        batch_size: samples per batch; the last batch may be smaller.
        shuffle: permute the samples with ``torch.randperm`` from a ``torch.Generator`` seeded with
            ``seed``; every pass yields the same order.
        seed: the seed of that order.

    Returns:
        A :class:`Batches` object: ``len()`` is the number of batches; iterating yields
        ``(x_batch, y_batch)`` tuples (``B×…`` and ``B``), or ``x_batch`` tensors when ``y`` is None.

    Example:
        >>> xs = torch.zeros(5, 1, 2, 2)
        >>> [b.shape[0] for b in batches(xs, None, 2)]
        [2, 2, 1]
    """
    return Batches(x, y, batch_size, shuffle=shuffle, seed=seed)
